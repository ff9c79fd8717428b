"""The only module that calls ``torch.ops.fusedtrain.*``: typed wrappers and fake (meta) kernels.

Schemas live in ``csrc/ops.cpp``; see Note [optimizer op conventions] there. Every optimizer op takes
``ema_params`` / ``ema_weight``: a non-empty list of averages is updated in the same pass, and the optional
one-element tensors ``lr_tensor``, ``grad_scale``, ``found_inf`` and ``clip_coef`` (Note [per-tensor binding] in
``csrc/include/fusedtrain/math.h``): on the CPU they are read by the host, on the parameters' GPU by the kernels,
without a host synchronisation; and ``l1``, the coefficient of the L1 term ``l1 * sign(p)`` added to the gradient.
The fake kernels let
``torch.compile`` and ``torch.library.opcheck`` trace the ops: they check nothing and mutate nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._build import library

__all__ = ["sgd_", "adagrad_", "rmsprop_", "adam_", "ema_", "total_norm"]

library()  # loads fusedtrain._C, which registers the ops (clear error if it is missing)
_ops = torch.ops.fusedtrain

TensorSeq = Sequence[Tensor]
OptTensor = Tensor | None


def _precision(param_copies: TensorSeq, stochastic_rounding: bool,
               sr_seed: int) -> tuple[TensorSeq | None, bool, int]:
    """The mixed-precision arguments every optimizer op ends with (Note [mixed-precision layouts]):
    ``param_copies`` (master weights: params are the float32 masters, the copies receive the rounded
    result), ``stochastic_rounding`` of bfloat16 params, keyed by ``sr_seed``."""
    return (param_copies if param_copies else None), stochastic_rounding, sr_seed


def sgd_(params: TensorSeq, grads: TensorSeq, momentum_buffers: TensorSeq, *, lr: float, momentum: float,
         dampening: float, weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
         ema_params: TensorSeq = (), ema_weight: float = 0.0, lr_tensor: OptTensor = None,
         grad_scale: OptTensor = None, found_inf: OptTensor = None, clip_coef: OptTensor = None,
         l1: float = 0.0, param_copies: TensorSeq = (), stochastic_rounding: bool = False,
         sr_seed: int = 0) -> None:
    """In-place SGD / momentum / Nesterov update of ``params`` (one device, one dtype)."""
    _ops.sgd_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
              first_step, ema_params, ema_weight, lr_tensor, grad_scale, found_inf, clip_coef, l1,
              *_precision(param_copies, stochastic_rounding, sr_seed))


def adagrad_(params: TensorSeq, grads: TensorSeq, state_sums: TensorSeq, state_steps: TensorSeq, *, lr: float,
             lr_decay: float, weight_decay: float, eps: float, maximize: bool, ema_params: TensorSeq = (),
             ema_weight: float = 0.0, lr_tensor: OptTensor = None, grad_scale: OptTensor = None,
             found_inf: OptTensor = None, clip_coef: OptTensor = None, l1: float = 0.0,
             param_copies: TensorSeq = (), stochastic_rounding: bool = False, sr_seed: int = 0) -> None:
    """In-place Adagrad update; advances ``state_steps``."""
    _ops.adagrad_(params, grads, state_sums, state_steps, lr, lr_decay, weight_decay, eps, maximize, ema_params,
                  ema_weight, lr_tensor, grad_scale, found_inf, clip_coef, l1,
                  *_precision(param_copies, stochastic_rounding, sr_seed))


def rmsprop_(params: TensorSeq, grads: TensorSeq, square_avgs: TensorSeq, grad_avgs: TensorSeq,
             momentum_buffers: TensorSeq, state_steps: TensorSeq, *, lr: float, alpha: float, eps: float,
             weight_decay: float, momentum: float, centered: bool, maximize: bool, ema_params: TensorSeq = (),
             ema_weight: float = 0.0, lr_tensor: OptTensor = None, grad_scale: OptTensor = None,
             found_inf: OptTensor = None, clip_coef: OptTensor = None, l1: float = 0.0,
             param_copies: TensorSeq = (), stochastic_rounding: bool = False, sr_seed: int = 0) -> None:
    """In-place RMSprop update; ``grad_avgs`` / ``momentum_buffers`` empty when unused."""
    _ops.rmsprop_(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr, alpha, eps,
                  weight_decay, momentum, centered, maximize, ema_params, ema_weight, lr_tensor, grad_scale,
                  found_inf, clip_coef, l1, *_precision(param_copies, stochastic_rounding, sr_seed))


def adam_(params: TensorSeq, grads: TensorSeq, exp_avgs: TensorSeq, exp_avg_sqs: TensorSeq,
          max_exp_avg_sqs: TensorSeq, state_steps: TensorSeq, *, lr: float, beta1: float, beta2: float,
          eps: float, weight_decay: float, amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
          ema_params: TensorSeq = (), ema_weight: float = 0.0, lr_tensor: OptTensor = None,
          grad_scale: OptTensor = None, found_inf: OptTensor = None, clip_coef: OptTensor = None,
          l1: float = 0.0, param_copies: TensorSeq = (), stochastic_rounding: bool = False,
          sr_seed: int = 0) -> None:
    """In-place Adam / AdamW update; ``max_exp_avg_sqs`` empty unless ``amsgrad``."""
    _ops.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
               weight_decay, amsgrad, maximize, decoupled_weight_decay, ema_params, ema_weight, lr_tensor,
               grad_scale, found_inf, clip_coef, l1, *_precision(param_copies, stochastic_rounding, sr_seed))


def ema_(averages: TensorSeq, params: TensorSeq, *, weight: float) -> None:
    """In place: ``averages <- averages + weight * (params - averages)`` (one device, one dtype)."""
    _ops.ema_(averages, params, weight)


def total_norm(tensors: TensorSeq, norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of all ``tensors`` together (one device, one dtype; ``norm_type`` > 0 or inf),
    as a 0-dim float32 tensor (float64 for float64 input) on their device."""
    return _ops.total_norm(tensors, norm_type)


def _fake_inplace(*args: object, **kwargs: object) -> None:
    return None


for _name in ("sgd_", "adagrad_", "rmsprop_", "adam_", "ema_"):
    torch.library.register_fake(f"fusedtrain::{_name}")(_fake_inplace)


@torch.library.register_fake("fusedtrain::total_norm")
def _total_norm_fake(tensors: TensorSeq, norm_type: float) -> Tensor:
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return tensors[0].new_empty((), dtype=dtype)


# ---- Regularization (issue 4): dropout family and penalty. See Note [dropout op conventions] in
# csrc/ops.cpp. The fake kernels return what the real ones do: contiguous outputs of the input's shape.
# The autograd formulas are registered here too: the backward of every dropout op is the same op on the
# gradient with the saved (seed, offset), so autograd keeps a one-element seed tensor and no mask.

__all__ += ["dropout", "dropout_", "bias_dropout_add", "bias_dropout_add_backward", "penalty", "penalty_backward"]


def dropout(input: Tensor, seed: Tensor, offset: int, p: float, group: int = 1, rescale: bool = True) -> Tensor:
    """``input * multiplier(i // group)`` (0 or the scale) as a new contiguous tensor; differentiable."""
    return _ops.dropout(input, seed, offset, p, group, rescale)


def dropout_(input: Tensor, seed: Tensor, offset: int, p: float, group: int = 1, rescale: bool = True) -> None:
    """In-place :func:`dropout` (no autograd formula; see ``fusedtrain.nn.functional``)."""
    _ops.dropout_(input, seed, offset, p, group, rescale)


def bias_dropout_add(input: Tensor, bias: Tensor, residual: Tensor, seed: Tensor, offset: int, p: float) -> Tensor:
    """``residual + dropout(input + bias)`` in one pass; differentiable."""
    return _ops.bias_dropout_add(input, bias, residual, seed, offset, p)


def bias_dropout_add_backward(grad: Tensor, seed: Tensor, offset: int, p: float,
                              bias_numel: int) -> tuple[Tensor, Tensor]:
    """``(grad * multiplier, its sum over the leading dimensions)``."""
    return _ops.bias_dropout_add_backward(grad, seed, offset, p, bias_numel)


def penalty(params: TensorSeq, l1: float, l2: float) -> Tensor:
    """``l1 * sum|theta| + l2 * sum theta^2`` over one device and dtype; 0-dim, float32 or float64."""
    return _ops.penalty(params, l1, l2)


def penalty_backward(params: TensorSeq, grad: Tensor, l1: float, l2: float) -> list[Tensor]:
    """``grad * (l1 * sign(theta) + 2 * l2 * theta)`` for every tensor of ``params``."""
    return _ops.penalty_backward(params, grad, l1, l2)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fusedtrain::dropout")
def _dropout_fake(input: Tensor, seed: Tensor, offset: int, p: float, group: int = 1,
                  rescale: bool = True) -> Tensor:
    return input.new_empty(input.shape)


@torch.library.register_fake("fusedtrain::dropout_")
def _dropout_inplace_fake(input: Tensor, seed: Tensor, offset: int, p: float, group: int = 1,
                          rescale: bool = True) -> None:
    return None


@torch.library.register_fake("fusedtrain::bias_dropout_add")
def _bias_dropout_add_fake(input: Tensor, bias: Tensor, residual: Tensor, seed: Tensor, offset: int,
                           p: float) -> Tensor:
    return input.new_empty(input.shape)


@torch.library.register_fake("fusedtrain::bias_dropout_add_backward")
def _bias_dropout_add_backward_fake(grad: Tensor, seed: Tensor, offset: int, p: float,
                                    bias_numel: int) -> tuple[Tensor, Tensor]:
    return grad.new_empty(grad.shape), grad.new_empty((bias_numel,))


@torch.library.register_fake("fusedtrain::penalty")
def _penalty_fake(params: list[Tensor], l1: float, l2: float) -> Tensor:
    return params[0].new_empty((), dtype=_acc_dtype(params[0].dtype))


@torch.library.register_fake("fusedtrain::penalty_backward")
def _penalty_backward_fake(params: list[Tensor], grad: Tensor, l1: float, l2: float) -> list[Tensor]:
    return [p.new_empty(p.shape) for p in params]


def _dropout_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    _, seed, offset, p, group, rescale = inputs
    ctx.save_for_backward(seed)
    ctx.args = (offset, p, group, rescale)


def _dropout_backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
    (seed,) = ctx.saved_tensors
    return dropout(grad, seed, *ctx.args), None, None, None, None, None


def _bias_dropout_add_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    _, bias, _, seed, offset, p = inputs
    ctx.save_for_backward(seed)
    ctx.args = (offset, p, bias.shape[0])


def _bias_dropout_add_backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
    (seed,) = ctx.saved_tensors
    offset, p, bias_numel = ctx.args
    grad_input, grad_bias = bias_dropout_add_backward(grad, seed, offset, p, bias_numel)
    return grad_input, grad_bias, grad, None, None, None


def _penalty_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    params, l1, l2 = inputs
    ctx.save_for_backward(*params)  # the parameters themselves (autograd keeps them alive anyway)
    ctx.args = (l1, l2)


def _penalty_backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
    return penalty_backward(list(ctx.saved_tensors), grad, *ctx.args), None, None


torch.library.register_autograd("fusedtrain::dropout", _dropout_backward, setup_context=_dropout_setup)
torch.library.register_autograd("fusedtrain::bias_dropout_add", _bias_dropout_add_backward,
                                setup_context=_bias_dropout_add_setup)
torch.library.register_autograd("fusedtrain::penalty", _penalty_backward, setup_context=_penalty_setup)


# ---- augment (issue 5) ----
# See Note [augment op] in csrc/ops.cpp. The per-sample parameters are CPU tensors (the driver reads them
# on the host); images may be on CPU or CUDA.


def augment(images: TensorSeq, boxes: Tensor, flips: Tensor, factors: Tensor, *, size: int,
            mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype, antialias: bool = False) -> Tensor:
    """Random-resized-crop + flip + colour jitter + normalize of uint8 (C, H, W) images into a new
    (N, C, size, size) tensor; ``boxes`` int64 (N, 4), ``flips`` bool (N,), ``factors`` float32 (N, 3)."""
    return _ops.augment(images, boxes, flips, factors, size, list(mean), list(std), out_dtype, antialias)


@torch.library.register_fake("fusedtrain::augment")
def _augment_fake(images: TensorSeq, boxes: Tensor, flips: Tensor, factors: Tensor, size: int,
                  mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype,
                  antialias: bool = False) -> Tensor:
    torch._check(len(images) > 0, lambda: "fusedtrain.augment: images is empty")
    return images[0].new_empty((len(images), images[0].shape[0], size, size), dtype=out_dtype)


__all__ += ["augment"]
