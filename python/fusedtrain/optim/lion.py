"""Lion on fusedtrain's fused multi-tensor kernels, with the arguments, state and results of timm.optim.Lion."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._across import across_shards, refuse_traced, refuse_unplaced
from ._base import _Collected, _Segment, to_scalar
from ._standalone import StandaloneFusedOptimizer

__all__ = ["Lion"]


def _max_lr_snapshot(lr: float | Tensor, corrected_weight_decay: bool = False) -> float:
    """timm's snapshot of the constructor's lr, the max lr of corrected weight decay (lr**2 / max_lr)."""
    max_lr = float(lr.detach()) if isinstance(lr, Tensor) else float(lr)
    if corrected_weight_decay and max_lr <= 0:
        raise ValueError(f"Corrected weight decay requires a positive max lr, got {max_lr}. Construct the optimizer "
                         "with the peak lr.")
    return max_lr


def _cautious(group: dict[str, Any]) -> bool:
    """Whether the group's step reduces each tensor (the caution mask's mean) before it updates."""
    return bool(group.get("caution", False))


class Lion(StandaloneFusedOptimizer):
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"), a drop-in for
    ``timm.optim.Lion`` that runs one fused kernel per (device, dtype) group.

    .. math::
        \theta &\leftarrow \theta(1 - s\lambda),\quad s = \eta \text{ (or } \eta^2/\eta_{\max}
                 \text{ with corrected\_weight\_decay)} \\
        u &= \operatorname{sign}(\beta_1 m + (1-\beta_1) g),\qquad \theta \leftarrow \theta - \eta u,\qquad
        m \leftarrow \beta_2 m + (1-\beta_2) g

    (``sign`` is 0 at 0, as ``torch.sign``; the interpolations are ``torch.lerp``'s.)

    Args:
        params: parameters or parameter groups.
        lr, betas, weight_decay, corrected_weight_decay, maximize: as in timm.optim.Lion (same defaults,
            ``lr=1e-4``, ``betas=(0.9, 0.99)``, ``weight_decay=0``, and the same validation errors).
            ``corrected_weight_decay`` scales the decay by :math:`\eta^2/\eta_{\max}` with :math:`\eta_{\max}` the
            constructor's lr (``max_lr_snapshot`` in the param groups, as timm records it).
        caution: Cautious Optimizers (Liang et al., 2024), as timm: the update is zeroed where its sign
            disagrees with the gradient's and the rest is divided by :math:`\max(\text{mean(mask)}, 10^{-3})`,
            the mask's mean over the whole tensor. The step then runs two fused passes (Note [trust-ratio
            passes] in csrc/include/fusedtrain/rules_trust.h): one counts each tensor's mask, the second
            updates; on DTensor (FSDP2) parameters the counts are added across the shards.
        foreach: accepted and recorded, as timm records it; the fused kernels always run.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain adds
            to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`. GradScaler's scale
            and found_inf are handled inside the kernel, and a float32 ``lr`` tensor on the parameters' GPU is
            read there (Lion keeps no step counters, so its step can be captured in a CUDA graph).

    State: timm's key, ``exp_avg``; ``state_dict()`` loads into timm.optim.Lion and back.
    """

    _opt_name = "Lion"
    _rule = "lion"
    _rule_8bit = "lion8bit"
    _signed_states = frozenset({"exp_avg"})

    def __init__(self, params: Any, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, caution: bool = False, corrected_weight_decay: bool = False,
                 maximize: bool = False, foreach: bool | None = None, *, ema: Any = None,
                 max_grad_norm: float | None = None, l1: float = 0.0, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None,
                 state_bits: int = 32, min_8bit_size: int = 4096) -> None:
        lr_value = float(lr.detach()) if isinstance(lr, Tensor) else float(lr)
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("learning rate must be a scalar or scalar tensor.")
        if lr_value < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, caution=caution,
                        corrected_weight_decay=corrected_weight_decay,
                        max_lr_snapshot=_max_lr_snapshot(lr, corrected_weight_decay), foreach=foreach,
                        maximize=maximize)
        super().__init__(params, defaults)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits,
                          min_8bit_size)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.defaults.setdefault("max_lr_snapshot", _max_lr_snapshot(self.defaults["lr"]))
        for group in self.param_groups:
            group.setdefault("caution", False)
            group.setdefault("corrected_weight_decay", False)
            group.setdefault("max_lr_snapshot", self.defaults["max_lr_snapshot"])
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)

    def _collect(self) -> _Collected:
        collected = super()._collect()
        refuse_unplaced(self._opt_name, self.param_groups, collected.fused, _cautious)
        return collected

    def _plan_segment(self, seg: _Segment) -> dict[str, Any]:
        # caution's mask mean over the whole tensor (also for a group that turns caution on after the plan is built;
        # without caution the rule makes no reduction and the reducer is not called)
        out = super()._plan_segment(seg)
        out["reduce_across"] = across_shards(self._opt_name, seg.group, seg.positions, seg.params,
                                             refuse_partial=_cautious(self.param_groups[seg.group]))
        return out

    def _step_traced(self) -> None:
        refuse_traced(self._opt_name, self.param_groups, _cautious)
        super()._step_traced()

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["exp_avg"]

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "exp_avg" not in state:  # (a master copy may exist already)
            state["exp_avg"] = self._zeros(p)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        corrected = group.get("corrected_weight_decay", False)
        return dict(beta1=to_scalar(beta1, "betas[0]"), beta2=to_scalar(beta2, "betas[1]"),
                    weight_decay=to_scalar(group["weight_decay"], "weight_decay"), maximize=group["maximize"],
                    max_lr=float(group["max_lr_snapshot"]) if corrected else 0.0,
                    caution=_cautious(group))
