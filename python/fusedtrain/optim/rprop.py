"""Rprop on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import FusedOptimizerMixin, new_step, to_scalar

__all__ = ["Rprop"]


class Rprop(FusedOptimizerMixin, torch.optim.Rprop):
    r"""Rprop (Riedmiller & Braun, 1993; torch's variant, without weight backtracking), a drop-in for
    :class:`torch.optim.Rprop`.

    Per element, with :math:`s = \operatorname{sign}(g_t\,g_{t-1})`:

    .. math::
        \Delta_t = \operatorname{clamp}(\Delta_{t-1}\cdot\{\eta_+ \text{ if } s>0;\ \eta_- \text{ if } s<0;\
        1 \text{ otherwise}\},\ \Delta_{\min}, \Delta_{\max}),\qquad
        \theta_t = \theta_{t-1} - \operatorname{sign}(\tilde g_t)\,\Delta_t,

    where :math:`\tilde g_t = 0` where the sign flipped (:math:`s<0`) and :math:`g_t` elsewhere; the state
    ``prev`` keeps :math:`\tilde g_t`, and ``step_size`` :math:`\Delta` starts at ``lr``.

    Args:
        params, lr, etas, step_sizes, maximize: as in torch.optim.Rprop (same defaults and validation errors).
        foreach, fused: validated as torch validates them; the fused kernels always run (torch.optim.Rprop
            has no ``fused``: it is accepted here like the other classes' and not recorded).
        capturable: ``step`` on the parameters' device (float32).
        differentiable: runs torch.optim.Rprop's own implementation.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`. ``l1`` adds
            :math:`\lambda_1\operatorname{sign}(\theta)` to the gradient before its sign is taken.

    State: torch's keys, ``step``, ``prev``, ``step_size``.
    """

    _torch_cls = torch.optim.Rprop
    _opt_name = "Rprop"
    _rule = "rprop"
    _no_8bit_reason = ("its step sizes are multiplied by etaplus / etaminus every step, so a quantization "
                       "error would compound from step to step instead of averaging out")

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, etas: tuple[float, float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] = (1e-6, 50), *, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False,
                 fused: bool | None = None, ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, state_bits: int = 32) -> None:
        self._check_compat_flags(foreach, fused, differentiable)
        super().__init__(params, lr, etas, step_sizes, capturable=capturable, foreach=foreach, maximize=maximize,
                         differentiable=differentiable)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits)

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["prev", "step_size"]

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "step" not in state:  # (a master copy may exist already)
            state["step"] = new_step(self._step_device(group, p))
            state["prev"] = self._zeros(p)
            lr = to_scalar(group["lr"], "lr")
            # (torch: complex parameters are two independent real numbers, each starting at lr)
            state["step_size"] = self._zeros(p).fill_(complex(lr, lr) if p.is_complex() else lr)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        etaminus, etaplus = group["etas"]
        step_min, step_max = group["step_sizes"]
        return dict(etaminus=etaminus, etaplus=etaplus, step_size_min=step_min, step_size_max=step_max,
                    maximize=group["maximize"])
