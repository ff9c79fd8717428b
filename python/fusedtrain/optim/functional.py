r"""Functional forms of the fusedtrain optimizers: one fused update over lists of tensors.

Each function takes the same lists as the torch.optim functional of the same name (params, grads and
state tensors, plus CPU ``state_steps`` where the rule counts steps), groups them by (device, dtype) and
runs one fused multi-tensor kernel per group (the ``step_`` op, see ``csrc/ops.cpp``). Every check of every
group runs before the first group is updated: a refused call changes nothing. Complex tensors are updated
as pairs of reals, as in torch.optim. ``splits=`` takes the groups precomputed by :func:`splits_for` to skip
the regrouping. ``ema_params`` (one average per parameter) are moved toward the updated parameters in the
same pass: ``a <- a + ema_weight * (p_new - a)``. The optimizer classes run the same kernels through a
cached plan (``csrc/plan.cpp``) and fall back to these under ``torch.compile``.

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
  ``sr_seed`` (an int, a one-element int64 tensor, or None: drawn from torch's generator, on the
  parameters' GPU while a CUDA graph is being captured so that every replay rounds with fresh bits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._dtensor import local, local_list
from ._groups import Split, real_view, splits_for

__all__ = ["sgd", "adagrad", "rmsprop", "adam", "adamw", "ema", "splits_for", "draw_sr_seed"]

_SEED_HIGH = 2 ** 62


def draw_sr_seed(device: torch.device | None = None) -> Tensor:
    """A fresh seed for stochastic rounding: a one-element int64 tensor from torch's generator. While a CUDA
    graph is being captured and ``device`` is a GPU, it is drawn there by torch's CUDA generator, whose
    Philox offset advances on every replay, and the kernels read it from device memory; otherwise it is a
    CPU tensor the host reads."""
    if device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device=device)
    return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64)


def _seed_arg(sr_seed: int | Tensor | None, device: torch.device | None) -> Tensor:
    if sr_seed is None:
        return draw_sr_seed(device)
    if isinstance(sr_seed, Tensor):
        if sr_seed.numel() != 1 or sr_seed.dtype != torch.int64:
            raise ValueError(f"sr_seed must be an int or a one-element int64 tensor, got {sr_seed.dtype} "
                             f"{tuple(sr_seed.shape)}")
        return sr_seed.reshape(())
    if isinstance(sr_seed, bool) or not isinstance(sr_seed, int):
        raise TypeError(f"sr_seed must be an int, a one-element int64 tensor or None, got {type(sr_seed).__name__}")
    return torch.tensor(sr_seed % (1 << 64) - ((1 << 64) if sr_seed % (1 << 64) >= (1 << 63) else 0),
                        dtype=torch.int64)


def _scalars(lr: float | Tensor, grad_scale: Tensor | None, found_inf: Tensor | None,
             clip_coef: Tensor | None, l1: float) -> dict[str, Any]:
    """The op keywords for the learning rate, the L1 coefficient and the optional per-call scalar tensors."""
    # A DTensor scalar (e.g. a clip coefficient from a replicated DTensor norm) is read as its local value.
    out: dict[str, Any] = {"lr": 0.0, "lr_tensor": local(lr)} if isinstance(lr, Tensor) else {"lr": float(lr)}
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


_DEVICE_SCALARS = ("lr_tensor", "grad_scale", "found_inf", "clip_coef")


def _on(device: torch.device, kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with its scalar tensors on ``device`` (CPU ones stay: the host reads them for free)."""
    moved = dict(kw)
    for name in _DEVICE_SCALARS:
        t = moved.get(name)
        if t is not None and t.device.type != "cpu" and t.device != device:
            moved[name] = t.to(device, non_blocking=True)
    return moved


def _run(rule: str, hyper: dict[str, Any], splits: list[Split], lists: Sequence[Sequence[Tensor]],
         steps: Sequence[Tensor] | None, *, ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0,
         param_copies: Sequence[Tensor] = (), stochastic_rounding: bool = False, sr_seed: int | Tensor | None = None,
         **kw: Any) -> None:
    """One ``step_`` call per (device, dtype) split; with several splits every call is checked first."""
    # DTensors (FSDP2, tensor parallel): the kernels update the local shards (Note [DTensor parameters]).
    lists = [local_list(lst) for lst in lists]
    params = lists[0]
    if len(params) == 0:
        return
    for k, lst in enumerate(lists[1:], 1):
        if len(lst) not in (0, len(params)) or (k == 1 and len(lst) != len(params)):
            raise ValueError(f"list {k} of the update has {len(lst)} tensors but params has {len(params)}")
    per_param = {"ema_params": local_list(ema_params), "param_copies": local_list(param_copies)}
    for name, tensors in per_param.items():
        if len(tensors) not in (0, len(params)):
            raise ValueError(f"{name} has {len(tensors)} tensors but params has {len(params)}; pass one per "
                             "parameter, or none")
    if steps is not None and len(steps) != len(params):
        raise ValueError(f"state_steps has {len(steps)} tensors but params has {len(params)}")
    values = _ops.hyper_list(rule, hyper)
    if len(ema_params):
        kw["ema_weight"] = ema_weight
    if stochastic_rounding:
        kw["stochastic_rounding"] = True
        kw["sr_seed"] = _seed_arg(sr_seed, params[0].device if len(params) else None)
    calls = []
    for idx, cplx in splits:
        take = (lambda ts: [real_view(ts[i]) for i in idx]) if cplx else (lambda ts: [ts[i] for i in idx])
        args = [take(lst) for lst in lists if len(lst)]
        states = [t for lst in args[2:] for t in lst]
        call_kw = {name: take(tensors) for name, tensors in per_param.items() if len(tensors)}
        call_kw.update(_on(params[idx[0]].device, kw))
        calls.append((args[0], args[1], states, [steps[i] for i in idx] if steps is not None else [], call_kw))
    if len(calls) > 1:  # every group is checked before the first one is updated
        for p, g, s, st, call_kw in calls:
            _ops.step_(rule, values, p, g, s, st, check_only=True, **call_kw)
    for p, g, s, st, call_kw in calls:
        _ops.step_(rule, values, p, g, s, st, **call_kw)


def sgd(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *, lr: float | Tensor,
        momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
        maximize: bool = False, first_step: bool = False, splits: list[Split] | None = None,
        ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0, grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None, clip_coef: Tensor | None = None,
        l1: float = 0.0, param_copies: Sequence[Tensor] = (),
        stochastic_rounding: bool = False, sr_seed: int | Tensor | None = None) -> None:
    r"""SGD with optional heavy-ball or Nesterov momentum, in place.

    .. math::
        g \leftarrow \nabla + \lambda\theta,\quad b \leftarrow \mu b + (1-\tau) g,\quad
        \theta \leftarrow \theta - \eta\,(g + \mu b \text{ (Nesterov) or } b)

    ``first_step=True`` initializes the buffers to the gradient (their old contents are ignored).
    ``momentum_buffers`` is empty when ``momentum`` is 0.
    """
    hyper = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 maximize=maximize, first_step=first_step)
    _run("sgd", hyper, splits or splits_for(params), (params, grads, momentum_buffers if momentum else ()), None,
         ema_params=ema_params, ema_weight=ema_weight, param_copies=param_copies,
         stochastic_rounding=stochastic_rounding, sr_seed=sr_seed, **_scalars(lr, grad_scale, found_inf, clip_coef, l1))


def adagrad(params: Sequence[Tensor], grads: Sequence[Tensor], state_sums: Sequence[Tensor],
            state_steps: Sequence[Tensor], *, lr: float | Tensor = 1e-2, lr_decay: float = 0.0,
            weight_decay: float = 0.0, eps: float = 1e-10, maximize: bool = False, splits: list[Split] | None = None,
            ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0, grad_scale: Tensor | None = None,
            found_inf: Tensor | None = None, clip_coef: Tensor | None = None,
            l1: float = 0.0, param_copies: Sequence[Tensor] = (),
            stochastic_rounding: bool = False, sr_seed: int | Tensor | None = None) -> None:
    r"""Adagrad in place: :math:`r \leftarrow r + g\odot g,\ \theta \leftarrow \theta - \eta_t\, g/(\sqrt r+\delta)`."""
    hyper = dict(lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize)
    _run("adagrad", hyper, splits or splits_for(params), (params, grads, state_sums), state_steps,
         ema_params=ema_params, ema_weight=ema_weight, param_copies=param_copies,
         stochastic_rounding=stochastic_rounding, sr_seed=sr_seed, **_scalars(lr, grad_scale, found_inf, clip_coef, l1))


def rmsprop(params: Sequence[Tensor], grads: Sequence[Tensor], square_avgs: Sequence[Tensor],
            grad_avgs: Sequence[Tensor], momentum_buffers: Sequence[Tensor], state_steps: Sequence[Tensor], *,
            lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
            momentum: float = 0.0, centered: bool = False, maximize: bool = False,
            splits: list[Split] | None = None, ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0,
            grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
            clip_coef: Tensor | None = None, l1: float = 0.0, param_copies: Sequence[Tensor] = (),
            stochastic_rounding: bool = False, sr_seed: int | Tensor | None = None) -> None:
    r"""RMSprop in place.

    .. math:: v \leftarrow \alpha v + (1-\alpha) g^2,\quad \theta \leftarrow \theta - \eta\, g/(\sqrt v+\epsilon)

    ``grad_avgs`` (centered) and ``momentum_buffers`` (momentum > 0) are empty lists when unused.
    """
    hyper = dict(alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
                 maximize=maximize)
    _run("rmsprop", hyper, splits or splits_for(params),
         (params, grads, square_avgs, grad_avgs if centered else (), momentum_buffers if momentum > 0 else ()),
         state_steps, ema_params=ema_params, ema_weight=ema_weight, param_copies=param_copies,
         stochastic_rounding=stochastic_rounding, sr_seed=sr_seed, **_scalars(lr, grad_scale, found_inf, clip_coef, l1))


def adam(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
         exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor], *,
         lr: float | Tensor = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
         decoupled_weight_decay: bool = False, splits: list[Split] | None = None, ema_params: Sequence[Tensor] = (),
         ema_weight: float = 0.0, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
         clip_coef: Tensor | None = None, l1: float = 0.0, param_copies: Sequence[Tensor] = (),
         stochastic_rounding: bool = False, sr_seed: int | Tensor | None = None) -> None:
    r"""Adam (AdamW with ``decoupled_weight_decay=True``) in place, with bias correction.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
    """
    hyper = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                 decoupled_weight_decay=decoupled_weight_decay)
    _run("adam", hyper, splits or splits_for(params),
         (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else ()), state_steps,
         ema_params=ema_params, ema_weight=ema_weight, param_copies=param_copies,
         stochastic_rounding=stochastic_rounding, sr_seed=sr_seed, **_scalars(lr, grad_scale, found_inf, clip_coef, l1))


def adamw(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor], *,
          lr: float | Tensor = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False,
          splits: list[Split] | None = None, ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0,
          grad_scale: Tensor | None = None, found_inf: Tensor | None = None, clip_coef: Tensor | None = None,
          l1: float = 0.0, param_copies: Sequence[Tensor] = (),
          stochastic_rounding: bool = False, sr_seed: int | Tensor | None = None) -> None:
    r"""AdamW in place: Adam with decoupled weight decay :math:`\theta \leftarrow \theta(1-\eta\lambda)`."""
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2,
         eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True,
         splits=splits, ema_params=ema_params, ema_weight=ema_weight, grad_scale=grad_scale, found_inf=found_inf,
         clip_coef=clip_coef, l1=l1, param_copies=param_copies, stochastic_rounding=stochastic_rounding,
         sr_seed=sr_seed)


def ema(averages: Sequence[Tensor], params: Sequence[Tensor], *, weight: float | Tensor,
        splits: list[Split] | None = None, found_inf: Tensor | None = None) -> None:
    r"""Moving average in place: :math:`a \leftarrow a + w\,(\theta - a)` (``torch._foreach_lerp_``).

    ``weight`` is :math:`1-\text{decay}` for an exponential moving average (Polyak averaging) and
    :math:`1/(n+1)` for SWA's running mean of n+1 models; a one-element tensor on the averages' device is
    read by the kernels (a captured update replays the weight of each step). A non-zero ``found_inf``
    skips the update.
    """
    averages, params = local_list(averages), local_list(params)
    if len(averages) != len(params):
        raise ValueError(f"averages has {len(averages)} tensors but params has {len(params)}")
    kw: dict[str, Any] = {"weight": 0.0, "weight_tensor": local(weight)} if isinstance(weight, Tensor) else \
        {"weight": float(weight)}
    if found_inf is not None:
        kw["found_inf"] = local(found_inf)
    calls = []
    for idx, cplx in splits or splits_for(averages):
        take = (lambda ts: [real_view(ts[i]) for i in idx]) if cplx else (lambda ts: [ts[i] for i in idx])
        calls.append((take(averages), take(params), _on(averages[idx[0]].device, kw)))
    for a, p, call_kw in calls:
        _ops.ema_(a, p, **call_kw)
