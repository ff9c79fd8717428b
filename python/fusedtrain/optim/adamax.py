"""Adamax on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import FusedOptimizerMixin, new_step, to_scalar

__all__ = ["Adamax"]


class Adamax(FusedOptimizerMixin, torch.optim.Adamax):
    r"""Adamax (Kingma & Ba, 2015, section 7.1: Adam with the infinity norm), a drop-in for
    :class:`torch.optim.Adamax`.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon),\qquad
        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,\frac{m_t}{u_t}

    (``weight_decay`` adds :math:`\lambda\theta` to the gradient first.)

    Args:
        params, lr, betas, eps, weight_decay, maximize: as in torch.optim.Adamax (same defaults and
            validation errors).
        foreach, fused: validated as torch validates them; the fused kernels always run (torch.optim.Adamax
            has no ``fused``: it is accepted here like the other classes' and not recorded).
        capturable: ``step`` on the parameters' device (float32), read and advanced there.
        differentiable: runs torch.optim.Adamax's own implementation.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.
        state_bits, min_8bit_size: ``state_bits=8`` keeps ``exp_avg`` (int8 codes) and ``exp_inf`` (uint8) of parameters with at least
            ``min_8bit_size`` elements blockwise-quantized (Note [8-bit states in the optimizers]).

    State: torch's keys, ``step``, ``exp_avg``, ``exp_inf``.
    """

    _torch_cls = torch.optim.Adamax
    _opt_name = "Adamax"
    _rule = "adamax"
    _rule_8bit = "adamax8bit"
    _signed_states = frozenset({"exp_avg"})

    def __init__(self, params: Any, lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, capturable: bool = False,
                 fused: bool | None = None, ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, state_bits: int = 32,
                 min_8bit_size: int = 4096) -> None:
        self._check_compat_flags(foreach, fused, differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, foreach, maximize=maximize,
                         differentiable=differentiable, capturable=capturable)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits,
                          min_8bit_size)

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["exp_avg", "exp_inf"]

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "step" not in state:  # (a master copy may exist already)
            state["step"] = new_step(self._step_device(group, p))
            state["exp_avg"] = self._zeros(p)
            state["exp_inf"] = self._zeros(p)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(beta1=to_scalar(beta1, "betas[0]"), beta2=to_scalar(beta2, "betas[1]"), eps=group["eps"],
                    weight_decay=to_scalar(group["weight_decay"], "weight_decay"), maximize=group["maximize"])
