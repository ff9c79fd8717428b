"""Functional forms of the fusedtrain optimizers: one fused update over lists of tensors.

Each function takes the same lists as the torch.optim functional of the same name (params, grads and
state tensors, plus CPU ``state_steps`` where the rule counts steps), groups them by (device, dtype) and
runs one fused multi-tensor kernel per group. Complex tensors are updated as pairs of reals, as in
torch.optim. ``splits=`` takes the groups precomputed by :func:`splits_for` (the optimizer classes
cache them) to skip the regrouping. ``ema_params`` (one average per parameter) are moved toward the
updated parameters in the same pass: ``a <- a + ema_weight * (p_new - a)``. The optimizer classes
call these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from ._groups import Split, real_view, splits_for

__all__ = ["sgd", "adagrad", "rmsprop", "adam", "adamw", "ema", "splits_for"]


def _take(tensors: Sequence[Tensor], idx: list[int], cplx: bool) -> list[Tensor]:
    if len(tensors) == 0:
        return []
    out = [tensors[i] for i in idx]
    return [real_view(t) for t in out] if cplx else out


def _run(op: Callable[..., None], splits: list[Split], lists: Sequence[Sequence[Tensor]],
         steps: Sequence[Tensor] | None, ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0,
         **hyper: Any) -> None:
    if len(ema_params) not in (0, len(lists[0])):
        raise ValueError(f"ema_params has {len(ema_params)} tensors but params has {len(lists[0])}; pass one "
                         "average per parameter, or none")
    if len(ema_params):
        hyper["ema_weight"] = ema_weight
    if len(splits) == 1 and not splits[0][1]:  # the usual case: one device, one real dtype
        if len(ema_params):
            hyper["ema_params"] = ema_params
        op(*lists, *(() if steps is None else (steps,)), **hyper)
        return
    for idx, cplx in splits:
        args = [_take(lst, idx, cplx) for lst in lists]
        if steps is not None:
            args.append([steps[i] for i in idx])
        if len(ema_params):
            hyper["ema_params"] = _take(ema_params, idx, cplx)
        op(*args, **hyper)


def sgd(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *, lr: float,
        momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
        maximize: bool = False, first_step: bool = False, splits: list[Split] | None = None,
        ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0) -> None:
    r"""SGD with optional heavy-ball or Nesterov momentum, in place.

    .. math::
        g \leftarrow \nabla + \lambda\theta,\quad b \leftarrow \mu b + (1-\tau) g,\quad
        \theta \leftarrow \theta - \eta\,(g + \mu b \text{ (Nesterov) or } b)

    ``first_step=True`` initializes the buffers to the gradient (their old contents are ignored).
    """
    _run(_ops.sgd_, splits or splits_for(params), (params, grads, momentum_buffers), None, lr=lr, momentum=momentum,
         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
         first_step=first_step, ema_params=ema_params, ema_weight=ema_weight)


def adagrad(params: Sequence[Tensor], grads: Sequence[Tensor], state_sums: Sequence[Tensor],
            state_steps: Sequence[Tensor], *, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
            eps: float = 1e-10, maximize: bool = False, splits: list[Split] | None = None,
            ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0) -> None:
    r"""Adagrad in place: :math:`r \leftarrow r + g\odot g,\ \theta \leftarrow \theta - \eta_t\, g/(\sqrt r+\delta)`."""
    _run(_ops.adagrad_, splits or splits_for(params), (params, grads, state_sums), state_steps, lr=lr,
         lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize, ema_params=ema_params,
         ema_weight=ema_weight)


def rmsprop(params: Sequence[Tensor], grads: Sequence[Tensor], square_avgs: Sequence[Tensor],
            grad_avgs: Sequence[Tensor], momentum_buffers: Sequence[Tensor], state_steps: Sequence[Tensor], *,
            lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
            momentum: float = 0.0, centered: bool = False, maximize: bool = False,
            splits: list[Split] | None = None, ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0) -> None:
    r"""RMSprop in place.

    .. math:: v \leftarrow \alpha v + (1-\alpha) g^2,\quad \theta \leftarrow \theta - \eta\, g/(\sqrt v+\epsilon)

    ``grad_avgs`` (centered) and ``momentum_buffers`` (momentum > 0) are empty lists when unused.
    """
    _run(_ops.rmsprop_, splits or splits_for(params), (params, grads, square_avgs, grad_avgs, momentum_buffers),
         state_steps,
         lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
         maximize=maximize, ema_params=ema_params, ema_weight=ema_weight)


def adam(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
         exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor], *,
         lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
         amsgrad: bool = False, maximize: bool = False, decoupled_weight_decay: bool = False,
         splits: list[Split] | None = None, ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0) -> None:
    r"""Adam (AdamW with ``decoupled_weight_decay=True``) in place, with bias correction.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
    """
    _run(_ops.adam_, splits or splits_for(params), (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), state_steps,
         lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
         decoupled_weight_decay=decoupled_weight_decay, ema_params=ema_params, ema_weight=ema_weight)


def adamw(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor], *,
          lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
          amsgrad: bool = False, maximize: bool = False, splits: list[Split] | None = None,
          ema_params: Sequence[Tensor] = (), ema_weight: float = 0.0) -> None:
    r"""AdamW in place: Adam with decoupled weight decay :math:`\theta \leftarrow \theta(1-\eta\lambda)`."""
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2,
         eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True,
         splits=splits, ema_params=ema_params, ema_weight=ema_weight)


def ema(averages: Sequence[Tensor], params: Sequence[Tensor], *, weight: float,
        splits: list[Split] | None = None) -> None:
    r"""Moving average in place: :math:`a \leftarrow a + w\,(\theta - a)` (``torch._foreach_lerp_``).

    ``weight`` is :math:`1-\text{decay}` for an exponential moving average (Polyak averaging) and
    :math:`1/(n+1)` for SWA's running mean of n+1 models.
    """
    _run(_ops.ema_, splits or splits_for(averages), (averages, params), None, weight=weight)
