"""The only module that calls ``torch.ops.fusedtrain.*``: typed wrappers and fake (meta) kernels.

Schemas live in ``csrc/ops.cpp``; see Note [optimizer op conventions] there. Every fused optimizer update is
the one ``step_`` op, named by its rule (``"adam"``, ``"sgd"``, ...) with the rule's hyperparameters in the
order the C++ rule declares (:func:`hyper_list`), plus what all rules share: ``lr``, ``l1``, a fused EMA
(``ema_params`` / ``ema_weight``), master weights (``param_copies``), stochastic rounding, and the optional
one-element tensors ``lr_tensor``, ``grad_scale``, ``found_inf`` and ``clip_coef`` (Note [per-tensor binding]
in ``csrc/include/fusedtrain/math.h``): on the CPU they are read by the host, on the parameters' GPU by the
kernels, without a host synchronisation. The fake kernels let ``torch.compile`` and
``torch.library.opcheck`` trace the ops: they check nothing and mutate nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._build import library

__all__ = ["step_", "ema_", "total_norm", "rules", "hyper_list"]

_lib = library()  # loads fusedtrain._C, which registers the ops (clear error if it is missing)
_ops = torch.ops.fusedtrain

TensorSeq = Sequence[Tensor]
OptTensor = Tensor | None

#: The optimizer rules of this build (Note [optimizer rules] in csrc/include/fusedtrain/rules.h):
#: ``{name: {"hyper": [names in op order], "aux": [tensor scalars], "counts_steps": bool, "mixed_precision": bool}}``.
RULES: dict[str, dict[str, Any]] = dict(_lib.rules())


def rules() -> dict[str, dict[str, Any]]:
    """The optimizer rules compiled into this build, with their hyperparameter names in op order."""
    return RULES


def hyper_list(rule: str, values: Mapping[str, Any]) -> list[float]:
    """``values`` (by name) as the ``hyper`` list of ``rule``, in the order the C++ rule declares: the one
    source of truth for that order is the rule itself (flags become 0.0 / 1.0)."""
    return [float(values[name]) for name in RULES[rule]["hyper"]]


def step_(rule: str, hyper: Sequence[float], params: TensorSeq, grads: TensorSeq, states: TensorSeq,
          state_steps: TensorSeq = (), *, lr: float = 0.0, lr_tensor: OptTensor = None, l1: float = 0.0,
          ema_params: TensorSeq = (), ema_weight: float = 0.0, ema_weight_tensor: OptTensor = None,
          param_copies: TensorSeq = (), grad_scale: OptTensor = None, found_inf: OptTensor = None,
          clip_coef: OptTensor = None, stochastic_rounding: bool = False, sr_seed: OptTensor = None,
          check_only: bool = False, aux_states: TensorSeq = ()) -> None:
    """One fused update of ``rule`` over ``params`` (one device, one dtype); see Note [optimizer op
    conventions] in csrc/ops.cpp. ``states``: the rule's state lists concatenated list by list;
    ``aux_states``: its tensor scalars, likewise. ``check_only``: run every check and write nothing."""
    _ops.step_(rule, list(hyper), params, grads, states, state_steps, ema_params, param_copies, list(aux_states), lr,
               l1, ema_weight, lr_tensor, grad_scale, found_inf, clip_coef, ema_weight_tensor, stochastic_rounding,
               sr_seed, check_only)


def ema_(averages: TensorSeq, params: TensorSeq, *, weight: float, weight_tensor: OptTensor = None,
         found_inf: OptTensor = None) -> None:
    """In place: ``averages <- averages + weight * (params - averages)`` (one device, one dtype); a
    ``weight_tensor`` overrides ``weight``; a non-zero ``found_inf`` skips the update."""
    _ops.ema_(averages, params, weight, weight_tensor, found_inf)


def total_norm(tensors: TensorSeq, norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of all ``tensors`` together (one device, one dtype; ``norm_type`` > 0 or inf),
    as a 0-dim float32 tensor (float64 for float64 input) on their device."""
    return _ops.total_norm(tensors, norm_type)


#: The cached step plan of the optimizer classes (Note [step plan] in csrc/plan.cpp); not an op: it calls
#: the same backend functions as step_ directly, and the optimizers fall back to step_ under torch.compile.
StepPlan = _lib.StepPlan


def _fake_inplace(*args: object, **kwargs: object) -> None:
    return None


for _name in ("step_", "ema_"):
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


# ---- Fused softmax cross-entropy (issue 19). See Note [fused cross-entropy] in
# csrc/include/fusedtrain/cross_entropy.h: the forward op returns the loss and the gradient of the logits for a
# grad_output of 1, computed in the same pass; autograd keeps that gradient (the memory torch spends on the
# log_softmax it keeps) and the backward pass scales it by grad_output.

__all__ += ["cross_entropy", "cross_entropy_backward"]


def cross_entropy(input: Tensor, target: Tensor, label_smoothing: float = 0.0, ignore_index: int = -100,
                  reduction: str = "mean", compute_grad: bool = True) -> tuple[Tensor, Tensor]:
    """``(loss, grad)`` of the softmax cross-entropy of ``input`` [N, C] against class indices ``target`` [N]
    (int64); the loss in float32 (float64 for float64 input), 0-dim or [N] for ``reduction="none"``; ``grad``
    [N, C] in the input's dtype (empty without ``compute_grad``). Differentiable in ``input``."""
    return _ops.cross_entropy(input, target, label_smoothing, ignore_index, reduction, compute_grad)


def cross_entropy_backward(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad * grad_output`` (``grad_output``: one value, or one per row), in ``grad``'s dtype. Not
    differentiable: the double backward of the fused cross-entropy raises."""
    return _ops.cross_entropy_backward(grad, grad_output)


@torch.library.register_fake("fusedtrain::cross_entropy")
def _cross_entropy_fake(input: Tensor, target: Tensor, label_smoothing: float = 0.0, ignore_index: int = -100,
                        reduction: str = "mean", compute_grad: bool = True) -> tuple[Tensor, Tensor]:
    torch._check(input.dim() == 2, lambda: "fusedtrain.cross_entropy: input must be [N, C]")
    loss_shape = (input.shape[0],) if reduction == "none" else ()
    loss = input.new_empty(loss_shape, dtype=_acc_dtype(input.dtype))
    grad = input.new_empty(input.shape if compute_grad else (0,))
    return loss, grad


@torch.library.register_fake("fusedtrain::cross_entropy_backward")
def _cross_entropy_backward_fake(grad: Tensor, grad_output: Tensor) -> Tensor:
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _cross_entropy_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd fills an [N, C] zero "gradient" of the kept gradient


def _is_one(t: Tensor) -> bool:
    """Whether ``t`` is a real (not traced) one-element CPU tensor equal to 1: the ``loss.backward()`` case."""
    return (type(t) is Tensor and t.device.type == "cpu" and t.numel() == 1 and not torch.compiler.is_compiling()
            and bool(t.item() == 1.0))


def _cross_entropy_backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor | None,
                            _grad_grad: Tensor | None) -> tuple:
    if grad_loss is None:  # an undefined gradient (materialize_grads is off): zero
        return None, None, None, None, None, None
    (grad,) = ctx.saved_tensors
    if grad.dim() != 2:
        raise RuntimeError("fusedtrain.cross_entropy: the forward ran with compute_grad=False, so there is no "
                           "gradient to return; call it with compute_grad=True (fusedtrain.nn.functional."
                           "cross_entropy does when the input requires grad)")
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        _cross_entropy_backward_backward(ctx)  # create_graph=True: the kept gradient carries no graph to x
    if not torch.is_grad_enabled() and _is_one(grad_loss):
        # loss.backward(): the kept gradient is the answer; autograd never writes into a gradient it is handed
        # (AccumulateGrad copies one that something else still references), so it is returned without a copy.
        result = grad
    else:
        result = cross_entropy_backward(grad, grad_loss)
    return result, None, None, None, None, None


def _cross_entropy_backward_backward(ctx: torch.autograd.function.FunctionCtx, *grads: Tensor) -> tuple:
    raise RuntimeError("fusedtrain.cross_entropy does not support double backward (its backward pass scales the "
                       "gradient kept by the forward pass); use torch.nn.functional.cross_entropy for "
                       "higher-order gradients")


def _cross_entropy_backward_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    return None


torch.library.register_autograd("fusedtrain::cross_entropy", _cross_entropy_backward,
                                setup_context=_cross_entropy_setup)
torch.library.register_autograd("fusedtrain::cross_entropy_backward", _cross_entropy_backward_backward,
                                setup_context=_cross_entropy_backward_setup)


# ---- augment (issue 5) ----
# See Note [augment op] in csrc/ops.cpp. The per-sample parameters are CPU tensors (the driver reads them
# on the host); images may be on CPU or CUDA.


def augment(images: TensorSeq, boxes: Tensor, flips: Tensor, factors: Tensor, *, size: tuple[int, int],
            mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype, antialias: bool = False) -> Tensor:
    """Random-resized-crop + flip + colour jitter + normalize of uint8 (0..255) or float32 (0..1) (C, H, W)
    images into a new (N, C, height, width) tensor, ``size`` = (height, width); ``boxes`` int64 (N, 4),
    ``flips`` bool (N,), ``factors`` float32 (N, 3)."""
    return _ops.augment(images, boxes, flips, factors, list(size), list(mean), list(std), out_dtype, antialias)


@torch.library.register_fake("fusedtrain::augment")
def _augment_fake(images: TensorSeq, boxes: Tensor, flips: Tensor, factors: Tensor, size: Sequence[int],
                  mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype,
                  antialias: bool = False) -> Tensor:
    torch._check(len(images) > 0, lambda: "fusedtrain.augment: images is empty")
    height, width = size
    return images[0].new_empty((len(images), images[0].shape[0], height, width), dtype=out_dtype)


__all__ += ["augment"]
