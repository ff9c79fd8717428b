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
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.

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
