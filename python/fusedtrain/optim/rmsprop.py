"""RMSprop on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import FusedOptimizerMixin, new_step

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
        foreach, fused: validated as torch validates them (torch.optim.RMSprop has no ``fused``: it is
            accepted here like the other classes' and not recorded, so the groups keep torch's keys); the
            fused kernels always run.
        differentiable: runs torch.optim.RMSprop's own step.
        capturable: ``step`` counters on the parameters' device, read by the kernels (see Adam).
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.
        state_bits, min_8bit_size: ``state_bits=8`` keeps ``square_avg`` (uint8 codes), ``grad_avg`` and
            ``momentum_buffer`` (int8 codes) of parameters with at least ``min_8bit_size`` elements
            blockwise-quantized (Note [8-bit states in the optimizers]).

    State: ``step``, ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered).
    """

    _torch_cls = torch.optim.RMSprop
    _opt_name = "RMSprop"
    _rule = "rmsprop"
    _rule_8bit = "rmsprop8bit"
    _signed_states = frozenset({"grad_avg", "momentum_buffer"})

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False, *,
                 fused: bool | None = None, ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, state_bits: int = 32,
                 min_8bit_size: int = 4096) -> None:
        self._check_compat_flags(foreach, fused, differentiable)
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, capturable=capturable,
                         foreach=foreach, maximize=maximize, differentiable=differentiable)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits,
                          min_8bit_size)

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        keys = ["square_avg"]
        if group["centered"]:
            keys.append("grad_avg")
        if group["momentum"] > 0:
            keys.append("momentum_buffer")
        return keys

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "step" not in state:  # (a master copy may exist already)
            state["step"] = new_step(self._step_device(group, p))
        for key in self._state_keys(group):
            if key not in state:
                state[key] = self._zeros(p)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                    momentum=group["momentum"], centered=group["centered"], maximize=group["maximize"])
