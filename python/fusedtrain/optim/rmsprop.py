"""RMSprop on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import functional as F
from ._base import FusedOptimizerMixin, lr_arg, new_step
from ._groups import Split

__all__ = ["RMSprop"]


class RMSprop(FusedOptimizerMixin, torch.optim.RMSprop):
    r"""RMSprop (Hinton, Coursera lecture 6e), a drop-in for :class:`torch.optim.RMSprop`.

    .. math::
        v \leftarrow \alpha v + (1-\alpha) g^2,\qquad
        \theta \leftarrow \theta - \eta\,\frac{g}{\sqrt{\tilde v} + \epsilon}

    with :math:`\tilde v = v` or, when ``centered``, :math:`\tilde v = v - \bar g^2` where
    :math:`\bar g \leftarrow \alpha \bar g + (1-\alpha) g` (Graves, 2013). With ``momentum`` :math:`\mu>0`
    the step goes through a buffer :math:`b \leftarrow \mu b + g/(\sqrt{\tilde v}+\epsilon)`,
    :math:`\theta \leftarrow \theta - \eta b`. Note that :math:`\epsilon` is added outside the square root
    (torch's convention; TensorFlow adds it inside).

    Args:
        params, lr, alpha, eps, weight_decay, momentum, centered, maximize: as in torch.optim.RMSprop.
        foreach: accepted and ignored. differentiable: runs torch.optim.RMSprop's own step.
        capturable: ``step`` counters on the parameters' device, read by the kernels (see Adam).
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

    State: ``step``, ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered).
    """

    _torch_cls = torch.optim.RMSprop
    _opt_name = "RMSprop"

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False, *,
                 ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None) -> None:
        self._check_compat_flags(foreach, None, differentiable)
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, capturable=capturable,
                         maximize=maximize, differentiable=differentiable)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype)

    def _update_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], splits: list[Split],
                      ema_params: list[Tensor], ema_weight: float, scalars: dict[str, Any],
                      masters: list[Tensor] | None = None) -> None:
        momentum, centered = group["momentum"], group["centered"]
        states = [self.state[p] for p in params]
        if not all("step" in s for s in states):  # new parameters (a master copy may exist already)
            for p, state in zip(params, states):
                if "step" not in state:
                    state["step"] = new_step(self._step_device(group, p))
                    state["square_avg"] = self._zeros(p)
                    if momentum > 0:
                        state["momentum_buffer"] = self._zeros(p)
                    if centered:
                        state["grad_avg"] = self._zeros(p)
        F.rmsprop(params if masters is None else masters, grads, [s["square_avg"] for s in states],
                  [s["grad_avg"] for s in states] if centered else [],
                  [s["momentum_buffer"] for s in states] if momentum > 0 else [], [s["step"] for s in states],
                  lr=lr_arg(group["lr"]), alpha=group["alpha"], eps=group["eps"],
                  weight_decay=group["weight_decay"], momentum=momentum, centered=centered,
                  maximize=group["maximize"], splits=splits, ema_params=ema_params, ema_weight=ema_weight,
                  param_copies=params if masters is not None else (), **scalars)
