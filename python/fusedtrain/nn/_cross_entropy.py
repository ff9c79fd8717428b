"""Fused softmax cross-entropy with label smoothing: the function behind ``fusedtrain.nn.functional.cross_entropy``
and ``fusedtrain.nn.CrossEntropyLoss``.

One pass over each row of logits computes the loss **and** the gradient of the logits (Note [fused cross-entropy]
in ``csrc/include/fusedtrain/cross_entropy.h``); autograd keeps that gradient instead of torch's log_softmax (the
same memory), and the backward pass is a scale by ``grad_output`` (nothing at all for ``loss.backward()`` on a
CPU loss: the kept gradient is returned as is).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ops

__all__ = ["cross_entropy"]

_REDUCTIONS = ("none", "mean", "sum")


def _check(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str, label_smoothing: float) -> None:
    if weight is not None:
        raise NotImplementedError("fusedtrain cross_entropy: weight= (per-class weights) is not supported; use "
                                  "torch.nn.functional.cross_entropy for class weights")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fusedtrain cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if not isinstance(input, Tensor) or input.dtype not in (torch.float32, torch.float64, torch.float16,
                                                            torch.bfloat16):
        what = input.dtype if isinstance(input, Tensor) else type(input).__name__
        raise TypeError(f"fusedtrain cross_entropy: input must be a float32, float64, float16 or bfloat16 tensor, "
                        f"got {what}")
    if target.is_floating_point() or target.is_complex():
        raise NotImplementedError(
            "fusedtrain cross_entropy: probability (soft) targets are not supported, only class indices (an int64 "
            f"target of shape [N]); got a {target.dtype} target of shape {tuple(target.shape)}. Use "
            "torch.nn.functional.cross_entropy for probability targets, or label_smoothing= for smoothed one-hot "
            "targets")
    if target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"expected target dtype to be Long or Byte, but got {target.dtype} (fusedtrain "
                        "cross_entropy: pass target.long())")
    if input.dim() == 0:
        raise ValueError("fusedtrain cross_entropy: input must have the classes along dimension 1 ([N, C], "
                         "[N, C, d1, ...]) or be one unbatched row [C]; got a 0-dim tensor")
    expected = (input.shape[0],) + tuple(input.shape[2:]) if input.dim() >= 2 else ()
    if tuple(target.shape) != expected:
        raise ValueError(f"fusedtrain cross_entropy: target must have shape {expected} for input of shape "
                         f"{tuple(input.shape)} (one class index per row), got {tuple(target.shape)}")


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    r"""Softmax cross-entropy over class indices with label smoothing, fused: a drop-in for
    :func:`torch.nn.functional.cross_entropy` with class-index targets and no class weights.

    For a row of logits :math:`x` with target :math:`t` and smoothing :math:`\varepsilon` over :math:`C` classes
    (Szegedy et al. 2016: the target distribution is :math:`(1 - \varepsilon)\,\mathrm{onehot}(t) + \varepsilon / C`):

    .. math::
        \ell = (1 - \varepsilon)\,(-\log \mathrm{softmax}(x)_t)
               + \frac{\varepsilon}{C} \sum_c -\log \mathrm{softmax}(x)_c, \qquad
        \frac{\partial \ell}{\partial x_c} = \mathrm{softmax}(x)_c - \frac{\varepsilon}{C}
               - (1 - \varepsilon)\,[c = t]

    Rows whose target is ``ignore_index`` contribute nothing; ``"mean"`` divides by the number of the other rows
    (nan when every target is ignored, as torch). The forward pass computes the loss and the gradient of the
    logits in one pass over each row (one exp per logit) and keeps the gradient; the backward pass scales it by
    ``grad_output``.

    Args:
        input: logits ``[N, C]``, ``[N, C, d1, ...]`` (classes along dimension 1, as torch; copied once to rows)
            or one unbatched row ``[C]``; float32, float64, float16 or bfloat16, CPU or CUDA, any strides.
        target: class indices, int64 (or uint8), of shape ``[N]`` / ``[N, d1, ...]`` / ``[]``, each in
            ``[0, C)`` or equal to ``ignore_index``.
        weight: not supported (per-class weights): must be None.
        ignore_index: a target value whose rows are skipped.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (one loss per row, 0 for ignored rows).
        label_smoothing: :math:`\varepsilon` in [0, 1].

    Returns:
        The loss in the input's dtype, computed in float32 (float64 for float64 input); under autocast
        (float16/bfloat16 logits) in float32, as torch's autocast runs ``cross_entropy`` in float32. The gradient
        of the input comes back in the input's dtype.

    Raises:
        RuntimeError: a target outside ``[0, C)`` that is not ``ignore_index`` (before anything is computed on
            the CPU; a device-side assert on CUDA, as torch); double backward (``create_graph=True``).
        NotImplementedError: ``weight=`` or probability targets.
        ValueError / TypeError: bad shapes, dtypes, ``reduction`` or ``label_smoothing``.
    """
    _check(input, target, weight, reduction, float(label_smoothing))
    if target.dtype != torch.int64:
        target = target.long()
    shape = target.shape
    if input.dim() == 1:  # one unbatched row
        x, t = input.unsqueeze(0), target.reshape(1)
    elif input.dim() == 2:
        x, t = input, target
    else:  # [N, C, d1, ...] -> rows [N * d1 * ..., C]: one copy (the classes are strided in the input)
        x, t = input.movedim(1, -1).reshape(-1, input.shape[1]), target.reshape(-1)
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    loss, _ = _ops.cross_entropy(x, t, float(label_smoothing), int(ignore_index), reduction, compute_grad)
    if reduction == "none":
        loss = loss.reshape(shape)
    autocast = input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(input.device.type)
    if loss.dtype != input.dtype and not autocast:
        loss = loss.to(input.dtype)
    return loss
