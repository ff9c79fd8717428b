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
        ema: a :class:`fusedtrain.ensemble.EMA` (or ``SWA``) whose averages the step's kernel updates in
            the same pass; equal to calling ``ema.update()`` after each step.
        max_grad_norm: clip the joint 2-norm of all gradients of this optimizer to this value inside the
            step (equal to ``torch.nn.utils.clip_grad_norm_`` before it; the norm is kept in
            ``last_grad_norm``). GradScaler's scale is honoured (see the module docs).
        l1: L1 penalty folded into the gradient, :math:`g \leftarrow g + \lambda_1\operatorname{sign}(\theta)`,
            inside the kernel (a param-group option; with ``weight_decay``, the elastic net).
        master_weights: float16/bfloat16 parameters get float32 master weights (state ``master_param``,
            made from the parameter on its first step); the kernel updates the master and writes the
            rounded value into the parameter in the same pass. States are float32 then.
        stochastic_rounding: bfloat16 parameters (without master weights) are stored with stochastic
            rounding, so updates smaller than half a bfloat16 ulp survive on average.
        state_dtype: ``torch.bfloat16`` keeps the states of float32 (or master-weight) parameters in
            bfloat16 (half the state memory and traffic); None: the parameter's dtype (float32 with
            master weights), as torch does.

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
