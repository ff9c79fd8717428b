r"""Functional forms of the fusedtrain optimizers: one fused update over lists of tensors.

Each function takes the same lists as the torch.optim functional of the same name (params, grads and
state tensors, plus CPU ``state_steps`` where the rule counts steps), groups them by (device, dtype) and
runs one fused multi-tensor kernel per group. Complex tensors are updated as pairs of reals, as in
torch.optim. ``splits=`` takes the groups precomputed by :func:`splits_for` (the optimizer classes
cache them) to skip the regrouping. ``ema_params`` (one average per parameter) are moved toward the
updated parameters in the same pass: ``a <- a + ema_weight * (p_new - a)``. The optimizer classes
call these.

Every function also takes (Note [per-tensor binding] in ``csrc/include/fusedtrain/math.h``):

- ``lr`` as a float or a one-element tensor: on the parameters' GPU the kernels read it there (capturable);
- ``grad_scale`` / ``found_inf``: what :class:`torch.amp.GradScaler` hands a fused optimizer. Gradients are
  divided by the scale in registers (they are not written back) and a non-zero ``found_inf`` skips the whole
  update, step counters included. With step counters on the GPU this is decided on the GPU; with CPU
  counters the host reads ``found_inf`` (a synchronisation for CUDA tensors);
- ``clip_coef``: a gradient-norm clipping coefficient (see :func:`fusedtrain.clip_grad_norm_`), applied
  after the unscaling;
- ``l1``: an L1 penalty folded into the gradient, :math:`g \leftarrow g + \lambda_1 \operatorname{sign}(\theta)`
  (after ``maximize`` and the coupled weight decay; 0 at :math:`\theta = 0`). With ``weight_decay`` this is
  the elastic net;
- mixed precision (Note [mixed-precision layouts] in ``csrc/include/fusedtrain/rounding.h``): with
  ``param_copies``, ``params`` are float32 master weights and ``grads`` / ``param_copies`` float16 or
  bfloat16; the kernel updates the masters and writes each rounded value into its copy in the same pass.
  States may be float32 or bfloat16 (with float32 params too). ``stochastic_rounding=True`` stores bfloat16
  params with stochastic rounding (unbiased: small updates survive on average), from random bits keyed by
  ``sr_seed`` (drawn from torch's default generator when None).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._dtensor import local, local_list
from ._groups import Split, real_view, splits_for

__all__ = ["sgd", "adagrad", "rmsprop", "adam", "adamw", "ema", "splits_for"]


def _take(tensors: Sequence[Tensor], idx: list[int], cplx: bool) -> list[Tensor]:
    if len(tensors) == 0:
        return []
    out = [tensors[i] for i in idx]
    return [real_view(t) for t in out] if cplx else out


_SCALARS = ("lr_tensor", "grad_scale", "found_inf", "clip_coef")


def _scalars(lr: float | Tensor, grad_scale: Tensor | None, found_inf: Tensor | None,
             clip_coef: Tensor | None, l1: float, stochastic_rounding: bool = False,
             sr_seed: int | None = None) -> dict[str, Any]:
    """The op keywords for the learning rate, the L1 coefficient, the optional per-call scalar tensors and
    stochastic rounding (a fresh seed from torch's default generator when none is given)."""
    # A DTensor scalar (e.g. a clip coefficient from a replicated DTensor norm) is read as its local value.
    out: dict[str, Any] = {"lr": 0.0, "lr_tensor": local(lr)} if isinstance(lr, Tensor) else {"lr": float(lr)}
    if stochastic_rounding:
        out["stochastic_rounding"] = True
        out["sr_seed"] = int(torch.randint(0, 2 ** 62, ())) if sr_seed is None else int(sr_seed)
    if l1:
        if not float(l1) >= 0.0:
            raise ValueError(f"Invalid l1 value: {l1}; the L1 coefficient must be >= 0")
        out["l1"] = float(l1)
    for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf), ("clip_coef", clip_coef)):
        if value is not None:
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a one-element tensor or None, got {type(value).__name__}")
            out[name] = local(value)
    return out


def _on(device: torch.device, hyper: dict[str, Any]) -> dict[str, Any]:
    """``hyper`` with its scalar tensors on ``device`` (CPU ones stay: the host reads them for free)."""
    moved = dict(hyper)
    for name in _SCALARS:
        t = moved.get(name)
        if t is not None and t.device.type != "cpu" and t.device != device:
            moved[name] = t.to(device, non_blocking=True)
    return moved


def _run(op: Callable[..., None], splits: list[Split], lists: Sequence[Sequence[Tensor]],
         steps: Sequence[Tensor] | None, ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0,
         param_copies: Sequence[Tensor] = (), **hyper: Any) -> None:
    # DTensors (FSDP2, tensor parallel): the kernels update the local shards (Note [DTensor parameters]).
    lists = [local_list(lst) for lst in lists]
    per_param = {"ema_params": local_list(ema_params), "param_copies": local_list(param_copies)}
    for name, tensors in per_param.items():
        if len(tensors) not in (0, len(lists[0])):
            raise ValueError(f"{name} has {len(tensors)} tensors but params has {len(lists[0])}; pass one per "
                             "parameter, or none")
    if len(ema_params):
        hyper["ema_weight"] = ema_weight
    if len(splits) == 1 and not splits[0][1]:  # the usual case: one device, one real dtype
        hyper.update({name: tensors for name, tensors in per_param.items() if len(tensors)})
        if lists[0]:
            hyper = _on(lists[0][0].device, hyper)
        op(*lists, *(() if steps is None else (steps,)), **hyper)
        return
    for idx, cplx in splits:
        args = [_take(lst, idx, cplx) for lst in lists]
        if steps is not None:
            args.append([steps[i] for i in idx])
        hyper.update({name: _take(tensors, idx, cplx) for name, tensors in per_param.items() if len(tensors)})
        op(*args, **_on(lists[0][idx[0]].device, hyper))


def sgd(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *, lr: float | Tensor,
        momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
        maximize: bool = False, first_step: bool = False, splits: list[Split] | None = None,
        ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0, grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None, clip_coef: Tensor | None = None,
        l1: float = 0.0, param_copies: Sequence[Tensor] = (),
        stochastic_rounding: bool = False, sr_seed: int | None = None) -> None:
    r"""SGD with optional heavy-ball or Nesterov momentum, in place.

    .. math::
        g \leftarrow \nabla + \lambda\theta,\quad b \leftarrow \mu b + (1-\tau) g,\quad
        \theta \leftarrow \theta - \eta\,(g + \mu b \text{ (Nesterov) or } b)

    ``first_step=True`` initializes the buffers to the gradient (their old contents are ignored).
    """
    _run(_ops.sgd_, splits or splits_for(params), (params, grads, momentum_buffers), None, momentum=momentum,
         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
         first_step=first_step, ema_params=ema_params, ema_weight=ema_weight,
         param_copies=param_copies,
         **_scalars(lr, grad_scale, found_inf, clip_coef, l1, stochastic_rounding, sr_seed))


def adagrad(params: Sequence[Tensor], grads: Sequence[Tensor], state_sums: Sequence[Tensor],
            state_steps: Sequence[Tensor], *, lr: float | Tensor = 1e-2, lr_decay: float = 0.0,
            weight_decay: float = 0.0, eps: float = 1e-10, maximize: bool = False, splits: list[Split] | None = None,
            ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0, grad_scale: Tensor | None = None,
            found_inf: Tensor | None = None, clip_coef: Tensor | None = None,
            l1: float = 0.0, param_copies: Sequence[Tensor] = (),
            stochastic_rounding: bool = False, sr_seed: int | None = None) -> None:
    r"""Adagrad in place: :math:`r \leftarrow r + g\odot g,\ \theta \leftarrow \theta - \eta_t\, g/(\sqrt r+\delta)`."""
    _run(_ops.adagrad_, splits or splits_for(params), (params, grads, state_sums), state_steps,
         lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize, ema_params=ema_params,
         ema_weight=ema_weight, param_copies=param_copies,
         **_scalars(lr, grad_scale, found_inf, clip_coef, l1, stochastic_rounding, sr_seed))


def rmsprop(params: Sequence[Tensor], grads: Sequence[Tensor], square_avgs: Sequence[Tensor],
            grad_avgs: Sequence[Tensor], momentum_buffers: Sequence[Tensor], state_steps: Sequence[Tensor], *,
            lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
            momentum: float = 0.0, centered: bool = False, maximize: bool = False,
            splits: list[Split] | None = None, ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0,
            grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
            clip_coef: Tensor | None = None, l1: float = 0.0, param_copies: Sequence[Tensor] = (),
            stochastic_rounding: bool = False, sr_seed: int | None = None) -> None:
    r"""RMSprop in place.

    .. math:: v \leftarrow \alpha v + (1-\alpha) g^2,\quad \theta \leftarrow \theta - \eta\, g/(\sqrt v+\epsilon)

    ``grad_avgs`` (centered) and ``momentum_buffers`` (momentum > 0) are empty lists when unused.
    """
    _run(_ops.rmsprop_, splits or splits_for(params), (params, grads, square_avgs, grad_avgs, momentum_buffers),
         state_steps, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
         maximize=maximize, ema_params=ema_params, ema_weight=ema_weight,
         param_copies=param_copies,
         **_scalars(lr, grad_scale, found_inf, clip_coef, l1, stochastic_rounding, sr_seed))


def adam(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
         exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor], *,
         lr: float | Tensor = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
         decoupled_weight_decay: bool = False, splits: list[Split] | None = None, ema_params: Sequence[Tensor] = (),
         ema_weight: float = 0.0, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
         clip_coef: Tensor | None = None, l1: float = 0.0, param_copies: Sequence[Tensor] = (),
         stochastic_rounding: bool = False, sr_seed: int | None = None) -> None:
    r"""Adam (AdamW with ``decoupled_weight_decay=True``) in place, with bias correction.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
    """
    _run(_ops.adam_, splits or splits_for(params), (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), state_steps,
         beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
         decoupled_weight_decay=decoupled_weight_decay, ema_params=ema_params, ema_weight=ema_weight,
         param_copies=param_copies,
         **_scalars(lr, grad_scale, found_inf, clip_coef, l1, stochastic_rounding, sr_seed))


def adamw(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor], *,
          lr: float | Tensor = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False,
          splits: list[Split] | None = None, ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0,
          grad_scale: Tensor | None = None, found_inf: Tensor | None = None, clip_coef: Tensor | None = None,
          l1: float = 0.0, param_copies: Sequence[Tensor] = (),
          stochastic_rounding: bool = False, sr_seed: int | None = None) -> None:
    r"""AdamW in place: Adam with decoupled weight decay :math:`\theta \leftarrow \theta(1-\eta\lambda)`."""
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2,
         eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True,
         splits=splits, ema_params=ema_params, ema_weight=ema_weight, grad_scale=grad_scale, found_inf=found_inf,
         clip_coef=clip_coef, l1=l1, param_copies=param_copies, stochastic_rounding=stochastic_rounding,
         sr_seed=sr_seed)


def ema(averages: Sequence[Tensor], params: Sequence[Tensor], *, weight: float,
        splits: list[Split] | None = None) -> None:
    r"""Moving average in place: :math:`a \leftarrow a + w\,(\theta - a)` (``torch._foreach_lerp_``).

    ``weight`` is :math:`1-\text{decay}` for an exponential moving average (Polyak averaging) and
    :math:`1/(n+1)` for SWA's running mean of n+1 models.
    """
    _run(_ops.ema_, splits or splits_for(averages), (averages, params), None, weight=weight)
