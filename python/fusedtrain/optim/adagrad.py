"""Adagrad on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import functional as F
from ._base import FusedOptimizerMixin, lr_arg, new_step, to_scalar
from ._groups import Split

__all__ = ["Adagrad"]


class Adagrad(FusedOptimizerMixin, torch.optim.Adagrad):
    r"""Adagrad (Duchi, Hazan & Singer, 2011), a drop-in for :class:`torch.optim.Adagrad`.

    .. math::
        r \leftarrow r + g\odot g,\qquad \theta \leftarrow \theta - \eta_t\,\frac{g}{\sqrt{r}+\delta},
        \qquad \eta_t = \frac{\eta}{1 + (t-1)\,\text{lr\_decay}}

    (:math:`\delta` is ``eps``; :math:`r` starts at ``initial_accumulator_value``.)

    Args:
        params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize: as in torch.
        foreach, fused: accepted and ignored. differentiable: runs torch.optim.Adagrad's own step.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.

    State: ``step`` (CPU float tensor) and ``sum``, created in the constructor as torch does.
    Sparse gradients are refused (torch.optim.Adagrad handles them).
    """

    _torch_cls = torch.optim.Adagrad
    _opt_name = "Adagrad"

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, fused: bool | None = None,
                 ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None) -> None:
        self._check_compat_flags(foreach, fused, differentiable)
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize=maximize,
                         differentiable=differentiable)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype)

    def _update_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], splits: list[Split],
                      ema_params: list[Tensor], ema_weight: float, scalars: dict[str, Any],
                      masters: list[Tensor] | None = None) -> None:
        states = [self.state[p] for p in params]
        if not all(states):  # parameters added with add_param_group after construction
            init = group["initial_accumulator_value"]
            for p, state in zip(params, states):
                if not state:
                    state["step"] = new_step(self._step_device(group, p))
                    state["sum"] = torch.full_like(p, complex(init, init) if p.is_complex() else init,
                                                   memory_format=torch.preserve_format)
        for p, state in zip(params, states):  # the state dtype of master weights / state_dtype, once
            if state["sum"].dtype != self._state_dtype_for(p) and not p.is_complex():
                state["sum"] = state["sum"].to(self._state_dtype_for(p))
        F.adagrad(params if masters is None else masters, grads, [s["sum"] for s in states],
                  [s["step"] for s in states],
                  lr=lr_arg(group["lr"]), lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                  eps=group["eps"], maximize=group["maximize"], splits=splits, ema_params=ema_params,
                  ema_weight=ema_weight, param_copies=params if masters is not None else (), **scalars)
