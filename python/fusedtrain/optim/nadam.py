"""NAdam on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import FusedOptimizerMixin, new_step, to_scalar

__all__ = ["NAdam"]


class NAdam(FusedOptimizerMixin, torch.optim.NAdam):
    r"""NAdam (Dozat, 2016): Adam with Nesterov momentum, a drop-in for :class:`torch.optim.NAdam`.

    With the momentum schedule :math:`\mu_t = \beta_1(1 - \tfrac12 \cdot 0.96^{t\psi})` (``momentum_decay``
    :math:`\psi`):

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \eta\,\frac{1-\mu_t}{1-\prod_{i\le t}\mu_i}\,\frac{g_t}{d_t}
                   - \eta\,\frac{\mu_{t+1}}{1-\prod_{i\le t+1}\mu_i}\,\frac{m_t}{d_t},\qquad
        d_t = \sqrt{v_t/(1-\beta_2^t)} + \epsilon

    ``decoupled_weight_decay=True`` gives NAdamW (:math:`\theta \leftarrow \theta(1-\eta\lambda)` first).

    Args:
        params, lr, betas, eps, weight_decay, momentum_decay, decoupled_weight_decay, maximize: as in
            torch.optim.NAdam (same defaults and validation errors).
        foreach, fused: validated as torch validates them; the fused kernels always run (torch.optim.NAdam
            has no ``fused``: it is accepted here like the other classes' and not recorded).
        capturable: ``step`` and ``mu_product`` on the parameters' device (float32), read and advanced there.
        differentiable: runs torch.optim.NAdam's own implementation.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.
        state_bits, min_8bit_size: ``state_bits=8`` keeps ``exp_avg`` (int8 codes) and ``exp_avg_sq`` (uint8) of parameters with at least
            ``min_8bit_size`` elements blockwise-quantized (Note [8-bit states in the optimizers]).

    State: torch's keys, ``step``, ``mu_product`` (a one-element tensor advanced with the step counter, in
    its dtype, as torch does: Note [tensor scalars] in csrc/include/fusedtrain/rules.h), ``exp_avg``,
    ``exp_avg_sq``.
    """

    _torch_cls = torch.optim.NAdam
    _opt_name = "NAdam"
    _rule = "nadam"
    _rule_8bit = "nadam8bit"
    _signed_states = frozenset({"exp_avg"})

    def __init__(self, params: Any, lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, foreach: bool | None = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, state_bits: int = 32,
                 min_8bit_size: int = 4096) -> None:
        self._check_compat_flags(foreach, fused, differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, momentum_decay, decoupled_weight_decay,
                         foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits,
                          min_8bit_size)

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["exp_avg", "exp_avg_sq"]

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "step" not in state:  # (a master copy may exist already)
            device = self._step_device(group, p)
            state["step"] = new_step(device)
            state["mu_product"] = new_step(device).fill_(1.0)
            state["exp_avg"] = self._zeros(p)
            state["exp_avg_sq"] = self._zeros(p)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(beta1=to_scalar(beta1, "betas[0]"), beta2=to_scalar(beta2, "betas[1]"), eps=group["eps"],
                    weight_decay=to_scalar(group["weight_decay"], "weight_decay"),
                    momentum_decay=group["momentum_decay"], maximize=group["maximize"],
                    decoupled_weight_decay=group["decoupled_weight_decay"])
