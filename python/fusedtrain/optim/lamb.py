"""LAMB and LARS (layer-wise trust ratios) on fusedtrain's fused kernels, with timm's arguments and results.

The rules run two passes per step (Note [trust-ratio passes] in csrc/include/fusedtrain/rules_trust.h): the
first reduces each tensor's norms, the second applies the update scaled by its trust ratio.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._across import across_shards, refuse_traced, refuse_unplaced
from ._base import FusedOptimizerMixin, _Collected, check_max_grad_norm, _Segment, new_step, to_scalar, where
from .sgd import MomentumBufferState

__all__ = ["Lamb", "Lars"]


def _validate_scalar(name: str, value: float | Tensor, min_value: float = 0.0) -> None:
    """timm.optim._helpers._validate_scalar's check and message."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar or scalar tensor.")
        value_float = float(value.detach().cpu())
    else:
        value_float = float(value)
    if value_float < min_value:
        raise ValueError(f"Invalid {name}: {value}")


class _TrustMixin(FusedOptimizerMixin):
    """What LAMB and LARS share: no torch.optim counterpart, so no torch step to fall back on; on DTensor (FSDP2)
    parameters, the per-tensor norms of the local shards are added across the shards before the trust ratios are
    taken (python/fusedtrain/optim/_across.py)."""

    _torch_cls = torch.optim.Optimizer
    _reference = ""  # the reference implementation, named in errors

    def _collect(self) -> _Collected:
        collected = super()._collect()
        for gi, positions in collected.external:
            raise RuntimeError(
                f"fusedtrain.optim.{self._opt_name}: {where(gi, positions[0])} is on the meta device; "
                f"{self._reference} has no implementation for it either. Materialize the parameters "
                "(e.g. model.to_empty(device=...)) before the first step.")
        refuse_unplaced(self._opt_name, self.param_groups, collected.fused, lambda group: True)
        return collected

    def _plan_segment(self, seg: _Segment) -> dict[str, Any]:
        out = super()._plan_segment(seg)
        out["reduce_across"] = across_shards(self._opt_name, seg.group, seg.positions, seg.params)
        return out

    def _step_traced(self) -> None:
        refuse_traced(self._opt_name, self.param_groups, lambda group: True)
        super()._step_traced()


class Lamb(_TrustMixin, torch.optim.Optimizer):
    r"""LAMB (You et al., 2020) with the arguments, defaults and results of :class:`timm.optim.Lamb`
    (NVIDIA's FusedLAMB variant), on fused kernels.

    .. math::
        g &\leftarrow g / \max(1, \lVert g_{\text{all}}\rVert / \text{max\_grad\_norm}),\qquad
        m \leftarrow \beta_1 m + \beta_3 g,\qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        u &= \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon} + \lambda\theta,\qquad
        \theta \leftarrow \theta - \eta\, r\, u,\qquad r = \lVert\theta\rVert / \lVert u\rVert

    with :math:`\beta_3 = 1-\beta_1` (``grad_averaging``) or 1, :math:`r = 1` where a norm is 0, and the trust
    ratio only where ``weight_decay != 0`` or ``always_adapt``. ``decoupled_decay`` decays
    :math:`\theta \leftarrow \theta - \eta\lambda\theta` first instead (``corrected_weight_decay``: by
    :math:`\eta^2\lambda/\eta_{\max}`); ``trust_clip`` clips :math:`r` at 1 (LAMBC); ``caution`` masks the
    update where its sign disagrees with the gradient's (Cautious Optimizers).

    Args:
        params, lr, bias_correction, betas, eps, weight_decay, grad_averaging, trust_clip, always_adapt, caution,
            decoupled_decay, corrected_weight_decay: as in timm.optim.Lamb (same defaults and errors).
        max_grad_norm: timm's global clipping (default 1.0, None: off): every gradient is *divided* by
            :math:`\max(1, \lVert g_{\text{all}}\rVert/\text{max\_grad\_norm})` before the moments, with the joint
            2-norm of all gradients of this optimizer (unscaled under GradScaler). This is timm's meaning of the
            name, which replaces fusedtrain's ``max_grad_norm`` option (the same clipping up to the 1e-6 of
            ``clip_grad_norm_``); the norm is kept in ``last_grad_norm``.
        foreach: accepted and recorded as timm does; the fused kernels always run.
        ema, l1, master_weights, stochastic_rounding, state_dtype, state_bits, min_8bit_size: the options
            fusedtrain adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.
            ``state_bits=8`` keeps ``exp_avg`` (signed codes) and ``exp_avg_sq`` (unsigned codes of its square
            root) of parameters with >= 2 dims and at least ``min_8bit_size`` elements as 8-bit codes with one
            absmax per block; the update's norm (for the trust ratio) is that of the update from the requantized
            moments, the update the step applies (Note [quantized trust passes] in
            csrc/include/fusedtrain/rules_trust_quant.h).
            ``caution=True`` has no 8-bit passes: it refuses ``state_bits=8``.

    State: ``exp_avg``, ``exp_avg_sq`` (timm's keys; at ``state_bits=8`` int8 / uint8 codes plus
    ``exp_avg_absmax`` / ``exp_avg_sq_absmax``) and a per-parameter ``step`` counter. timm counts steps
    per param group (``param_groups[i]['step']``); the two agree whenever every parameter of a group has a
    gradient at every step. A timm checkpoint loads (its group counters become the parameters' counters), and
    ``state_dict()`` also writes each group's ``step`` (its largest counter), so a fusedtrain checkpoint loads
    into timm's Lamb and continues there.

    DTensor (FSDP2) parameters: the norms (and the caution mask's count) of the local shards are added across the
    shards, one ``all_reduce`` per param group and pass; the step then equals the unsharded one.

    Not supported: parameters on the meta device, sparse gradients, sharded parameters under ``torch.compile``.
    """

    _opt_name = "Lamb"
    _rule = "lamb"
    _rule_8bit = "lamb8bit"
    _signed_states = frozenset({"exp_avg"})
    _reference = "timm.optim.Lamb"

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 grad_averaging: bool = True, max_grad_norm: float | None = 1.0, trust_clip: bool = False,
                 always_adapt: bool = False, caution: bool = False, decoupled_decay: bool = False,
                 corrected_weight_decay: bool = False, foreach: bool | None = None, *, ema: Any = None,
                 l1: float = 0.0, master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, state_bits: int = 32, min_8bit_size: int = 4096) -> None:
        _validate_scalar("learning rate", lr)
        _validate_scalar("epsilon", eps)
        _validate_scalar("weight_decay", weight_decay)
        check_max_grad_norm(max_grad_norm, off="the global gradient clipping")
        max_lr = float(lr.detach()) if isinstance(lr, Tensor) else float(lr)
        if corrected_weight_decay and max_lr <= 0:
            raise ValueError(f"Corrected weight decay requires a positive max lr, got {max_lr}. Construct the "
                             "optimizer with the peak lr.")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, trust_clip=trust_clip, always_adapt=always_adapt,
                        caution=caution, decoupled_decay=decoupled_decay,
                        corrected_weight_decay=corrected_weight_decay, max_lr_snapshot=max_lr, foreach=foreach)
        super().__init__(params, defaults)
        self._init_extras(ema, None, l1, master_weights, stochastic_rounding, state_dtype, state_bits, min_8bit_size)
        for group in self.param_groups:
            self._check_caution(group)
        # timm records its max_grad_norm in the defaults (and so in every group) but reads only the defaults';
        # recorded after _init_extras, which refuses fusedtrain's optimizer-wide max_grad_norm in a group.
        self.defaults["max_grad_norm"] = max_grad_norm
        for group in self.param_groups:
            group.setdefault("max_grad_norm", max_grad_norm)

    def _check_caution(self, group: dict[str, Any]) -> None:
        """caution=True has no 8-bit passes (Note [quantized trust passes]): refused with state_bits=8."""
        if group.get("caution", False) and self.state_bits == 8:
            raise ValueError("fusedtrain.optim.Lamb: caution=True has no 8-bit states (its mask count would need "
                             "a pass of its own over the quantized moments); use caution=False with state_bits=8, "
                             "or state_bits=32")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_caution({"caution": param_group.get("caution", self.defaults.get("caution", False))})
        super().add_param_group(param_group)

    def _rule_max_norm(self) -> float | None:
        value = self.defaults.get("max_grad_norm")
        return None if value is None else float(value)

    def _rule_clip_coef(self, norm: Tensor, max_norm: float) -> Tensor:
        # timm: grad / (global_norm / max_grad_norm).clamp(min=1); the kernels divide by this value
        return (norm / max_norm).clamp_(min=1.0)

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["exp_avg", "exp_avg_sq"]

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "step" not in state:  # (a master copy may exist already)
            state["step"] = new_step(self._step_device(group, p))
            if "exp_avg" not in state:
                state["exp_avg"] = self._zeros(p)
                state["exp_avg_sq"] = self._zeros(p)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        self._check_caution(group)  # (a group's caution set after construction: refused before any write)
        beta1, beta2 = group["betas"]
        decoupled = bool(group.get("decoupled_decay", False))
        corrected = decoupled and bool(group.get("corrected_weight_decay", False))
        return dict(beta1=to_scalar(beta1, "betas[0]"), beta2=to_scalar(beta2, "betas[1]"), eps=group["eps"],
                    weight_decay=to_scalar(group["weight_decay"], "weight_decay"),
                    grad_averaging=group["grad_averaging"], bias_correction=group["bias_correction"],
                    decoupled_decay=decoupled, max_lr=group["max_lr_snapshot"] if corrected else 0.0,
                    trust_clip=group["trust_clip"], always_adapt=group["always_adapt"],
                    caution=group.get("caution", False))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.defaults.setdefault("max_lr_snapshot", float(self.defaults["lr"]))
        for group in self.param_groups:
            for key, value in (("caution", False), ("decoupled_decay", False), ("corrected_weight_decay", False),
                               ("max_lr_snapshot", self.defaults["max_lr_snapshot"]), ("foreach", None)):
                group.setdefault(key, value)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, whose param groups also carry timm.optim.Lamb's per-group ``step`` (the
        largest step counter of the group's parameters), so that the checkpoint also loads into timm's Lamb and
        continues there with the same bias corrections (loading it here ignores that key)."""
        out = super().state_dict()
        for saved, group in zip(out["param_groups"], self.param_groups):
            steps = [float(self.state[p]["step"]) for p in group["params"] if "step" in self.state.get(p, {})]
            if steps:
                saved["step"] = int(max(steps))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also loads a timm.optim.Lamb checkpoint: its per-group ``step`` becomes the step counter of every
        parameter of the group that has state. A checkpoint of this class that timm's Lamb loaded and stepped
        further (its group ``step`` ahead of the largest per-parameter counter) advances every counter by the
        steps timm took."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            step = group.pop("step", None)
            if step is None:
                continue
            entries = [(p, self.state[p]) for p in group["params"] if "exp_avg" in self.state.get(p, {})]
            known = [float(entry["step"]) for _, entry in entries if "step" in entry]
            ahead = float(step) - max(known) if known else 0.0
            for p, entry in entries:
                if "step" not in entry:
                    entry["step"] = new_step(self._step_device(group, p)).fill_(float(step))
                elif ahead > 0:
                    entry["step"].add_(ahead)


class Lars(MomentumBufferState, _TrustMixin, torch.optim.Optimizer):
    r"""LARS / LARC (You et al., 2017) with the arguments, defaults and results of :class:`timm.optim.Lars`,
    on fused kernels.

    Where ``weight_decay != 0`` or ``always_adapt``, the gradient is scaled by the layer's trust ratio
    :math:`r = c\,\lVert\theta\rVert / (\lVert g\rVert + \lambda\lVert\theta\rVert + \epsilon)` (1 where a norm is 0;
    ``trust_clip``: :math:`\min(r/\eta, 1)`, LARC): :math:`g \leftarrow (g + \lambda\theta)\, r`; then SGD with
    momentum :math:`b \leftarrow \mu b + (1-\tau) g` (:math:`b = g` on the first step), Nesterov
    :math:`g + \mu b`, and :math:`\theta \leftarrow \theta - \eta g`.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps, trust_clip, always_adapt:
            as in timm.optim.Lars (same defaults and errors).
        foreach: accepted and recorded as timm does; the fused kernels always run.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits, min_8bit_size:
            the options fusedtrain adds to every optimizer; see
            :class:`~fusedtrain.optim._base.FusedOptimizerMixin` (the trust ratio sees the clipped, L1-augmented
            gradient). ``state_bits=8`` keeps the momentum buffer of parameters with >= 2 dims and at least
            ``min_8bit_size`` elements as signed 8-bit codes with one absmax per block (Note [quantized trust
            passes] in csrc/include/fusedtrain/rules_trust_quant.h).

    State: ``momentum_buffer`` when momentum is non-zero (timm's key; at ``state_bits=8`` int8 codes plus
    ``momentum_buffer_absmax``).

    DTensor (FSDP2) parameters: the norms of the local shards are added across the shards, one ``all_reduce`` per
    param group and step; the step then equals the unsharded one.

    Not supported: parameters on the meta device, sparse gradients, sharded parameters under ``torch.compile``.
    """

    _opt_name = "Lars"
    _rule = "lars"
    _rule_8bit = "lars8bit"
    _signed_states = frozenset({"momentum_buffer"})
    _reference = "timm.optim.Lars"

    def __init__(self, params: Any, lr: float | Tensor = 1.0, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, trust_coeff: float = 0.001, eps: float = 1e-8,
                 trust_clip: bool = False, always_adapt: bool = False, foreach: bool | None = None, *,
                 ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None,
                 state_bits: int = 32, min_8bit_size: int = 4096) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt,
                        foreach=foreach)
        super().__init__(params, defaults)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits,
                          min_8bit_size)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("foreach", None)


    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(momentum=group["momentum"], dampening=group["dampening"],
                    weight_decay=to_scalar(group["weight_decay"], "weight_decay"), nesterov=group["nesterov"],
                    trust_coeff=group["trust_coeff"], eps=group["eps"], trust_clip=group["trust_clip"],
                    always_adapt=group["always_adapt"], first_step=False)
