"""RAdam on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import FusedOptimizerMixin, new_step, to_scalar

__all__ = ["RAdam"]


class RAdam(FusedOptimizerMixin, torch.optim.RAdam):
    r"""RAdam (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond"), a drop-in for
    :class:`torch.optim.RAdam`.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\qquad
        \hat m_t = m_t / (1-\beta_1^t) \\
        \rho_t &= \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t},\qquad \rho_\infty = \frac{2}{1-\beta_2} - 1 \\
        \theta_t &= \theta_{t-1} - \eta\,\hat m_t\,r_t\,\frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t}+\epsilon}
        \quad (\rho_t > 5),\qquad \theta_t = \theta_{t-1} - \eta\,\hat m_t \quad\text{otherwise},

    with :math:`r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}`
    (a function of the step, computed per tensor when the kernel binds it). ``decoupled_weight_decay=True``
    gives RAdamW (:math:`\theta \leftarrow \theta(1-\eta\lambda)` first).

    Args:
        params, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize: as in torch.optim.RAdam (same
            defaults and validation errors).
        foreach, fused: validated as torch validates them; the fused kernels always run (torch.optim.RAdam
            has no ``fused``: it is accepted here like the other classes' and not recorded).
        capturable: ``step`` on the parameters' device (float32), read and advanced there.
        differentiable: runs torch.optim.RAdam's own implementation.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.
        state_bits, min_8bit_size: ``state_bits=8`` keeps ``exp_avg`` (int8 codes) and ``exp_avg_sq`` (uint8) of parameters with at least
            ``min_8bit_size`` elements blockwise-quantized (Note [8-bit states in the optimizers]).

    State: torch's keys, ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    _torch_cls = torch.optim.RAdam
    _opt_name = "RAdam"
    _rule = "radam"
    _rule_8bit = "radam8bit"
    _signed_states = frozenset({"exp_avg"})

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, decoupled_weight_decay: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, ema: Any = None,
                 max_grad_norm: float | None = None, l1: float = 0.0, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None,
                 state_bits: int = 32, min_8bit_size: int = 4096) -> None:
        self._check_compat_flags(foreach, fused, differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits,
                          min_8bit_size)

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["exp_avg", "exp_avg_sq"]

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "step" not in state:  # (a master copy may exist already)
            state["step"] = new_step(self._step_device(group, p))
            state["exp_avg"] = self._zeros(p)
            state["exp_avg_sq"] = self._zeros(p)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(beta1=to_scalar(beta1, "betas[0]"), beta2=to_scalar(beta2, "betas[1]"), eps=group["eps"],
                    weight_decay=to_scalar(group["weight_decay"], "weight_decay"), maximize=group["maximize"],
                    decoupled_weight_decay=group["decoupled_weight_decay"])
