"""SGD, momentum and Nesterov momentum on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import functional as F
from ._base import FusedOptimizerMixin, lr_arg, to_scalar
from ._groups import Split

__all__ = ["SGD"]


class SGD(FusedOptimizerMixin, torch.optim.SGD):
    r"""Stochastic gradient descent with optional momentum, a drop-in for :class:`torch.optim.SGD`.

    With :math:`g = \nabla f(\theta) + \lambda\theta` (weight decay :math:`\lambda`):

    - plain SGD: :math:`\theta \leftarrow \theta - \eta g`;
    - momentum (heavy ball): :math:`b \leftarrow \mu b + (1-\tau) g,\ \theta \leftarrow \theta - \eta b`
      (:math:`b = g` on the first step). The textbook form :math:`v \leftarrow \mu v - \eta g,\ \theta
      \leftarrow \theta + v` is the same trajectory with :math:`v = -\eta b` for a constant :math:`\eta`;
    - Nesterov: :math:`\theta \leftarrow \theta - \eta (g + \mu b)`, the look-ahead form of Sutskever
      et al. (2013) rewritten in terms of the current parameters.

    Args:
        params: parameters or parameter groups.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in torch.optim.SGD (same defaults
            and errors).
        foreach, fused: accepted and ignored (always fused here; the group records ``None``).
        differentiable: runs torch.optim.SGD's own step.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.

    State: ``momentum_buffer`` when momentum is non-zero, as in torch.
    """

    _torch_cls = torch.optim.SGD
    _opt_name = "SGD"

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None) -> None:
        self._check_compat_flags(foreach, fused, differentiable)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         differentiable=differentiable)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype)

    def _update_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], splits: list[Split],
                      ema_params: list[Tensor], ema_weight: float, scalars: dict[str, Any],
                      masters: list[Tensor] | None = None) -> None:
        momentum = group["momentum"]
        hyper = dict(lr=lr_arg(group["lr"]), momentum=momentum, dampening=group["dampening"],
                     weight_decay=to_scalar(group["weight_decay"]), nesterov=group["nesterov"],
                     maximize=group["maximize"], **scalars)
        targets = params if masters is None else masters  # what the kernel updates (Note [mixed-precision layouts])
        if masters is not None:
            hyper["param_copies"] = params
        if momentum == 0:
            F.sgd(targets, grads, [], splits=splits, ema_params=ema_params, ema_weight=ema_weight, **hyper)
            return
        states = [self.state[p] for p in params]
        buffers = [s.get("momentum_buffer") for s in states]
        if all(b is not None for b in buffers):
            F.sgd(targets, grads, buffers, first_step=False, splits=splits, ema_params=ema_params,
                  ema_weight=ema_weight, **hyper)
            return
        # Parameters without a buffer yet start it from the gradient (torch clones the gradient). The new
        # buffers are zeros, not empty: if GradScaler's found_inf skips this first step on the device, the
        # next step's b <- mu*0 + (1 - dampening)*g is the gradient itself (dampening = 0), not garbage.
        for first in (False, True):
            idx = [i for i, b in enumerate(buffers) if (b is None) == first]
            if not idx:
                continue
            if first:
                for i in idx:
                    buffers[i] = states[i]["momentum_buffer"] = self._zeros(params[i])
            if masters is not None:
                hyper["param_copies"] = [params[i] for i in idx]
            F.sgd([targets[i] for i in idx], [grads[i] for i in idx], [buffers[i] for i in idx],
                  first_step=first, ema_params=[ema_params[i] for i in idx] if ema_params else [],
                  ema_weight=ema_weight, **hyper)
