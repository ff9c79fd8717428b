"""Adadelta on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import FusedOptimizerMixin, new_step, to_scalar

__all__ = ["Adadelta"]


class Adadelta(FusedOptimizerMixin, torch.optim.Adadelta):
    r"""Adadelta (Zeiler, 2012), a drop-in for :class:`torch.optim.Adadelta`.

    .. math::
        v_t &= \rho v_{t-1} + (1-\rho) g_t^2,\qquad
        \Delta_t = \frac{\sqrt{u_{t-1}+\epsilon}}{\sqrt{v_t+\epsilon}}\,g_t \\
        u_t &= \rho u_{t-1} + (1-\rho)\Delta_t^2,\qquad \theta_t = \theta_{t-1} - \eta\,\Delta_t

    (``weight_decay`` adds :math:`\lambda\theta` to the gradient first.)

    Args:
        params, lr, rho, eps, weight_decay, maximize: as in torch.optim.Adadelta (same defaults and
            validation errors).
        foreach, fused: validated as torch validates them; the fused kernels always run
            (torch.optim.Adadelta has no ``fused``: it is accepted here like the other classes' and not
            recorded).
        capturable: ``step`` on the parameters' device (float32).
        differentiable: runs torch.optim.Adadelta's own implementation.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.
        state_bits, min_8bit_size: ``state_bits=8`` keeps ``square_avg`` and ``acc_delta`` (uint8 codes) of parameters with at least
            ``min_8bit_size`` elements blockwise-quantized (Note [8-bit states in the optimizers]).

    State: torch's keys, ``step``, ``square_avg``, ``acc_delta``.
    """

    _torch_cls = torch.optim.Adadelta
    _opt_name = "Adadelta"
    _rule = "adadelta"
    _rule_8bit = "adadelta8bit"
    _signed_states = frozenset()

    def __init__(self, params: Any, lr: float | Tensor = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0, foreach: bool | None = None, *, capturable: bool = False,
                 maximize: bool = False, differentiable: bool = False, fused: bool | None = None,
                 ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, state_bits: int = 32,
                 min_8bit_size: int = 4096) -> None:
        self._check_compat_flags(foreach, fused, differentiable)
        super().__init__(params, lr, rho, eps, weight_decay, foreach, capturable=capturable, maximize=maximize,
                         differentiable=differentiable)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits,
                          min_8bit_size)

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["square_avg", "acc_delta"]

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "step" not in state:  # (a master copy may exist already)
            state["step"] = new_step(self._step_device(group, p))
            state["square_avg"] = self._zeros(p)
            state["acc_delta"] = self._zeros(p)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(rho=group["rho"], eps=group["eps"],
                    weight_decay=to_scalar(group["weight_decay"], "weight_decay"), maximize=group["maximize"])
