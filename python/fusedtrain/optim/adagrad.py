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
