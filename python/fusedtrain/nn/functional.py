"""Functional dropout family, and the fused cross-entropy: the forms behind :mod:`fusedtrain.nn`'s modules.

``cross_entropy`` (softmax cross-entropy with label smoothing, loss and gradient in one pass) lives in
``_cross_entropy.py`` and is re-exported here; everything below is about dropout.

Every function here draws one 63-bit seed per call (Note [seeds] below), and the kernel decides the fate of
the element of logical row-major index ``i`` from ``(seed, i)`` alone with counter-based Philox-4x32-10
(``csrc/include/fusedtrain/philox.h``). The backward pass regenerates the same decisions from the saved
seed: autograd keeps a one-element seed tensor and **no mask** (torch keeps 1 byte per element on CUDA and
a full tensor of the input's dtype on the CPU).

Note [seeds]:
    ``seed=None`` (the default) draws the seed from ``generator``, or from torch's default **CPU**
    generator when ``generator`` is None, for inputs on every device. So ``torch.manual_seed(s)`` makes
    runs reproducible, the same call gives the same mask on the CPU and on a GPU, and nothing waits for a
    GPU. ``seed=<int>`` (or a one-element int64 tensor, on the CPU or on the input's device) fixes the mask:
    the same seed value gives the same mask for inputs of the same shape, on any device, in any dtype,
    wherever the seed tensor lives. ``generator`` may also be a generator of the input's GPU: the seed is
    then drawn on the device and read there by the kernel (no synchronization either).

    CUDA graphs. A captured graph replays its kernels with the arguments they had at capture time, so a
    seed drawn on the host would repeat one mask on every replay. While ``torch.cuda.graph`` (or
    ``make_graphed_callables``) captures a call on a CUDA input with ``seed=None`` and no generator, the
    seed is therefore drawn as a one-element tensor on the input's device by torch's CUDA generator, whose
    Philox offset torch advances on every replay, and the kernels read it from device memory: each replay
    gets a fresh mask, governed by ``torch.cuda.manual_seed``, and the backward pass reads the same saved
    seed tensor, so forward and backward agree within each replay. Under ``torch.compile`` (which traces
    outside any capture; ``mode="reduce-overhead"`` captures the compiled code afterwards) the CPU draw is
    kept, so compiled and eager code give the same masks, and copied to the device inside the graph: the
    captured kernels read a seed that the non-captured copy refreshes on every call. An explicit
    ``seed=`` or a CPU ``generator=`` under capture is drawn once, at capture time: every replay then
    repeats that fixed mask, which is what a fixed seed asks for (pass a CUDA ``generator=`` registered with
    the graph, ``graph.register_generator_state(g)``, for fresh masks from your own stream).

Note [keep rule]:
    element (or channel, or sample) ``d`` is dropped iff ``u_d < t`` where ``u_d`` is its uint32 Philox
    word and ``t = min(floor(p * 2**32 + 1/2), 2**32 - 1)``: the dropped fraction is ``p`` to within
    ``2**-32``. Kept elements are multiplied by ``1 / (1 - p)`` computed as torch's CPU dropout does
    (``float32(1) / float32(1 - p)`` in single precision, in double for float64), dropped ones by 0.
    float16/bfloat16 are multiplied in float32 and rounded once (torch's CPU kernel rounds the scale to
    the half type first; its CUDA kernel works as we do).

Non-contiguous inputs are processed through ``.contiguous()`` (one extra copy) and give exactly the mask
of their contiguous copy; outputs are contiguous.
"""

from __future__ import annotations

import math
import warnings
from typing import Union

import torch
from torch import Tensor

from .. import _ops
from .._capture import stream_capturing
from ._cross_entropy import cross_entropy

__all__ = ["dropout", "dropout2d", "drop_path", "bias_dropout_add", "cross_entropy", "SeedLike"]

SeedLike = Union[int, Tensor, None]

_INT64 = 1 << 64


def _check_p(p: float, name: str = "dropout probability") -> float:
    value = float(p)
    if math.isnan(value) or value < 0.0 or value > 1.0:
        raise ValueError(f"{name} has to be between 0 and 1, but got {p}")
    return value


_SEED_HIGH = _INT64 // 2 - 1  # randint's exclusive upper bound: 63 random bits


def _seed_tensor(seed: SeedLike, generator: torch.Generator | None, input: Tensor) -> Tensor:
    """The one-element int64 seed tensor the ops take for ``input`` (Note [seeds])."""
    device = input.device
    if seed is None:
        if generator is not None:
            gen_device = torch.device(generator.device)
            if gen_device.type != "cpu":
                if gen_device != device:
                    raise ValueError("fusedtrain dropout: generator must be a CPU torch.Generator or one on the "
                                     f"input's device ({device}), got one on {gen_device}")
                return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, generator=generator, device=device)
        elif device.type == "cuda" and stream_capturing():
            # drawn on the device: a host draw would be frozen into the graph (Note [seeds])
            return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device=device)
        # out of place (torch.compile traces randint, not random_)
        value = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, generator=generator)
        if device.type == "cuda" and torch.compiler.is_compiling():
            value = value.to(device, non_blocking=True)  # Note [seeds]: a copy in the graph, not a host read
        return value
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64 or not (seed.device.type == "cpu" or seed.device == device):
            raise ValueError("fusedtrain dropout: a seed tensor must be a one-element int64 tensor on the CPU or on "
                             f"the input's device ({device}), got {seed.dtype} {tuple(seed.shape)} on {seed.device}")
        return seed.reshape(())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"fusedtrain dropout: seed must be an int, a one-element int64 tensor or None, "
                        f"got {type(seed).__name__}")
    value = seed % _INT64  # any Python int, as its 64-bit two's-complement pattern
    if value >= _INT64 // 2:
        value -= _INT64
    return torch.tensor(value, dtype=torch.int64)


class _DropoutInplace(torch.autograd.Function):
    """In-place dropout; the backward pass recomputes the multipliers from the saved seed."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, input: Tensor, seed: Tensor, p: float, group: int,
                rescale: bool) -> Tensor:
        _ops.dropout_(input, seed, 0, p, group, rescale)
        ctx.mark_dirty(input)
        ctx.save_for_backward(seed)
        ctx.args = (p, group, rescale)
        return input

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
        (seed,) = ctx.saved_tensors
        p, group, rescale = ctx.args
        return _ops.dropout(grad, seed, 0, p, group, rescale), None, None, None, None


def _apply(input: Tensor, p: float, group: int, rescale: bool, inplace: bool, seed: SeedLike,
           generator: torch.Generator | None) -> Tensor:
    s = _seed_tensor(seed, generator, input)
    if inplace:
        return _DropoutInplace.apply(input, s, p, group, rescale)
    return _ops.dropout(input, s, 0, p, group, rescale)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            seed: SeedLike = None, generator: torch.Generator | None = None) -> Tensor:
    r"""Inverted dropout (Srivastava et al. 2014), a drop-in for :func:`torch.nn.functional.dropout`.

    .. math:: y_i = x_i \cdot z_i / (1 - p), \qquad z_i \sim \mathrm{Bernoulli}(1 - p)

    Args:
        input: a float32, float64, float16 or bfloat16 tensor of any shape and layout, CPU or CUDA.
        p: probability of an element to be zeroed, in [0, 1].
        training: apply dropout if ``True``; otherwise return ``input`` itself.
        inplace: write the result into ``input`` (and return it).
        seed: fixes the mask (see the module's Note [seeds]); ``None`` draws a fresh one per call.
        generator: generator to draw the seed from when ``seed`` is None: a CPU one, or one of the input's
            GPU (module Note [seeds]).

    Returns:
        The dropped-out tensor (``input`` itself when ``training`` is False, ``p`` is 0 or it is empty, as
        torch does). Autograd keeps only the seed: the backward pass recomputes the mask.

    Raises:
        ValueError: ``p`` outside [0, 1] (torch's message).
    """
    p = _check_p(p)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    return _apply(input, p, 1, True, inplace, seed, generator)


_DROPOUT2D_DIM_WARNING = (
    "dropout2d: Received a {}-D input to dropout2d, which is deprecated and will result in an error in a future "
    "release. To retain the behavior and silence this warning, please use dropout instead. Note that dropout2d "
    "exists to provide channel-wise dropout on inputs with 2 spatial dimensions, a channel dimension, and an optional "
    "batch dimension (i.e. 3D or 4D inputs).")
_DROPOUT2D_3D_WARNING = (
    "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D dropout behavior is desired - "
    "input is interpreted as shape (N, C, L), where C is the channel dim. This behavior will change in a future "
    "release to interpret the input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
    "channel-wise dropout behavior, please switch to using dropout1d instead.")


def dropout2d(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: SeedLike = None, generator: torch.Generator | None = None) -> Tensor:
    r"""Channel dropout (Tompson et al. 2015), a drop-in for :func:`torch.nn.functional.dropout2d`.

    One keep decision per ``(input[n, c])`` slice, broadcast over the remaining dimensions:

    .. math:: y_{n,c,\dots} = x_{n,c,\dots} \cdot z_{n,c} / (1 - p), \qquad z_{n,c} \sim \mathrm{Bernoulli}(1 - p)

    Exactly like torch (whose behaviour, warnings included, this follows), a 3-D input is read as
    ``(N, C, L)``: one decision per ``input[i, j]`` row. To drop whole channels of one unbatched
    ``(C, H, W)`` image, pass ``input.unsqueeze(0)``.

    Args:
        input: ``(N, C, H, W)`` (or any tensor of at least 2 dimensions, with torch's warning).
        p: probability of a channel to be zeroed, in [0, 1].
        training: apply dropout if ``True``; otherwise return ``input`` itself.
        inplace: write the result into ``input``.
        seed: fixes the mask (module Note [seeds]).
        generator: generator to draw the seed from when ``seed`` is None: a CPU one, or one of the input's
            GPU (module Note [seeds]).

    Returns:
        The result; autograd keeps only the seed.
    """
    p = _check_p(p)
    if input.dim() not in (3, 4):
        warnings.warn(_DROPOUT2D_DIM_WARNING.format(input.dim()), stacklevel=2)
    if input.dim() == 3:
        warnings.warn(_DROPOUT2D_3D_WARNING, stacklevel=2)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if input.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    group = input.numel() // (input.shape[0] * input.shape[1])
    return _apply(input, p, group, True, inplace, seed, generator)


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True, *,
              seed: SeedLike = None, generator: torch.Generator | None = None) -> Tensor:
    r"""Stochastic depth (Huang et al. 2016) per sample, a drop-in for ``timm.layers.drop_path``.

    One keep decision per sample (index along dimension 0), broadcast over the rest:

    .. math:: y_{n,\dots} = x_{n,\dots} \cdot z_n / (1 - p), \qquad z_n \sim \mathrm{Bernoulli}(1 - p)

    (without the ``1 / (1 - p)`` when ``scale_by_keep`` is False). Defaults follow timm: note
    ``training=False``.

    Args:
        x: a tensor of at least one dimension (the residual branch's output).
        drop_prob: probability of a sample's path to be dropped, in [0, 1].
        training: apply stochastic depth if ``True``; otherwise return ``x`` itself.
        scale_by_keep: divide kept samples by the keep probability ``1 - drop_prob``.
        seed: fixes the mask (module Note [seeds]).
        generator: generator to draw the seed from when ``seed`` is None: a CPU one, or one of the input's
            GPU (module Note [seeds]).

    Returns:
        The result; autograd keeps only the seed.
    """
    drop_prob = _check_p(drop_prob, "drop_prob")
    if not training or drop_prob == 0.0 or x.numel() == 0:
        return x
    if x.dim() == 0:
        raise ValueError("drop_path: x must have a batch dimension (got a 0-dim tensor)")
    return _apply(x, drop_prob, x.numel() // x.shape[0], scale_by_keep, False, seed, generator)


_NO_SEED = torch.zeros((), dtype=torch.int64)  # what p = 0 passes: no word is looked at


def bias_dropout_add(x: Tensor, bias: Tensor, residual: Tensor, p: float, training: bool = True, *,
                     seed: SeedLike = None, generator: torch.Generator | None = None) -> Tensor:
    r"""``residual + dropout(x + bias, p)`` in one pass (the transformer block's epilogue).

    .. math:: y = r + (x + b) \cdot z / (1 - p)

    with ``b`` broadcast along the last dimension. The mask is the one :func:`dropout` draws for the same
    seed and shape. Forward: one pass over ``x``, ``residual`` and the output. Backward: ``grad_residual``
    is the incoming gradient itself, ``grad_x = grad * z / (1 - p)`` and ``grad_bias = grad_x`` summed over
    the leading dimensions; on the CPU the bias sum is fused into the ``grad_x`` pass, on CUDA it is one
    extra reduction over ``grad_x`` (``torch.sum``).

    Args:
        x: ``(..., H)`` float tensor.
        bias: ``(H,)``, on ``x``'s device.
        residual: ``x``'s shape, on its device.

    Mixed dtypes promote as ``residual + dropout(x + bias)`` does in torch (e.g. under autocast a bfloat16
    ``x`` from a linear layer with a float32 bias and residual gives a float32 result): the inputs are
    converted to the promoted dtype first, and their gradients come back in their own dtypes.
        p: dropout probability in [0, 1].
        training: apply dropout if ``True``; otherwise return ``residual + x + bias`` (still one pass).
        seed: fixes the mask (module Note [seeds]).
        generator: generator to draw the seed from when ``seed`` is None: a CPU one, or one of the input's
            GPU (module Note [seeds]).

    Returns:
        A new contiguous tensor of ``x``'s shape.
    """
    p = _check_p(p)
    if isinstance(x, Tensor) and isinstance(bias, Tensor) and isinstance(residual, Tensor) \
            and not x.dtype == bias.dtype == residual.dtype:
        dtype = torch.promote_types(torch.promote_types(x.dtype, bias.dtype), residual.dtype)
        x, bias, residual = x.to(dtype), bias.to(dtype), residual.to(dtype)
    if not training or p == 0.0:
        return _ops.bias_dropout_add(x, bias, residual, _NO_SEED, 0, 0.0)
    return _ops.bias_dropout_add(x, bias, residual, _seed_tensor(seed, generator, x), 0, p)
