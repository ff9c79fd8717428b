"""ASGD on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import FusedOptimizerMixin, new_step, to_scalar

__all__ = ["ASGD"]


class ASGD(FusedOptimizerMixin, torch.optim.ASGD):
    r"""Averaged SGD (Polyak & Juditsky, 1992), a drop-in for :class:`torch.optim.ASGD`.

    .. math::
        \theta_t &= \theta_{t-1}(1-\lambda\eta_{t-1}) - \eta_{t-1} g_t,\qquad
        \bar\theta_t = \bar\theta_{t-1} + \mu_{t-1}(\theta_t - \bar\theta_{t-1}) \\
        \eta_t &= \frac{\eta}{(1 + \lambda\eta t)^\alpha},\qquad \mu_t = \frac{1}{\max(1, t - t_0)}

    (:math:`\lambda` is ``lambd``; ``weight_decay`` adds :math:`w\theta` to the gradient first; the average
    :math:`\bar\theta` is the state ``ax``, copied from :math:`\theta` while :math:`\mu = 1`.)

    Args:
        params, lr, lambd, alpha, t0, weight_decay, maximize: as in torch.optim.ASGD (same defaults and
            validation errors).
        foreach, fused: validated as torch validates them; the fused kernels always run (torch.optim.ASGD
            has no ``fused``: it is accepted here like the other classes' and not recorded).
        capturable: ``step``, ``eta`` and ``mu`` on the parameters' device (float32), read and advanced there.
        differentiable: runs torch.optim.ASGD's own implementation.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.

    State: torch's keys, ``step``, ``eta`` and ``mu`` (one-element tensors advanced with the step counter in
    their dtype, as torch does: Note [tensor scalars] in csrc/include/fusedtrain/rules.h) and ``ax``.
    torch keeps ``step``, ``eta`` and ``mu`` on the parameter's device; here they live where the kernels
    advance them (the CPU, or the device when capturable), like every fusedtrain optimizer's ``step``.
    """

    _torch_cls = torch.optim.ASGD
    _opt_name = "ASGD"
    _rule = "asgd"
    _no_8bit_reason = ("its state ax is a running average of the parameters, which 8-bit codes cannot hold "
                       "to the parameters' precision")

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, lambd: float = 1e-4, alpha: float = 0.75,
                 t0: float = 1e6, weight_decay: float = 0, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, capturable: bool = False, *, fused: bool | None = None,
                 ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, state_bits: int = 32) -> None:
        self._check_compat_flags(foreach, fused, differentiable)
        super().__init__(params, lr, lambd, alpha, t0, weight_decay, foreach, maximize, differentiable, capturable)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits)

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["ax"]

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "step" not in state:  # (a master copy may exist already)
            device = self._step_device(group, p)
            state["step"] = new_step(device)
            state["eta"] = new_step(device).fill_(to_scalar(group["lr"], "lr"))
            state["mu"] = new_step(device).fill_(1.0)
            state["ax"] = self._zeros(p)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        # float64_scalars: torch rounds the new eta and mu to the default dtype (torch.as_tensor of a float)
        return dict(lambd=group["lambd"], alpha=group["alpha"], t0=group["t0"],
                    weight_decay=to_scalar(group["weight_decay"], "weight_decay"), maximize=group["maximize"],
                    float64_scalars=torch.get_default_dtype() == torch.float64)
