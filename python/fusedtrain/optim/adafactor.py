"""Adafactor: one op call per param group and dtype, three sweeps per tensor (Note [Adafactor passes] and
[Adafactor blocks] in csrc/include/fusedtrain/adafactor.h and csrc/cpu/optim_adafactor.cpp)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._dtensor import is_dtensor
from ..clip import clip_coefficient, grads_norm
from ._base import (KeepsOptions, check_max_grad_norm, check_own_step_options, check_param, check_state_bits, cpu_step,
                    new_step, where)

__all__ = ["Adafactor"]

_torch_adafactor: Any = getattr(torch.optim, "Adafactor", None)
if _torch_adafactor is None:  # torch < 2.5: fusedtrain.optim does not export Adafactor (see optim/__init__.py)
    raise ImportError("torch.optim.Adafactor is not available in this version of torch")

try:  # torch's conversion of a tensor hyperparameter (a 1-element tensor becomes 0-dim), where it has one
    from torch.optim.optimizer import _to_scalar
except ImportError:  # pragma: no cover
    def _to_scalar(x: Any) -> Any:  # type: ignore[no-redef]
        return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x

from .. import _ops  # noqa: E402,F401  (loads the library that defines fusedtrain::adafactor_)


@torch.library.register_fake("fusedtrain::adafactor_")
def _adafactor_fake(*args: object, **kwargs: object) -> None:
    """In place, returns nothing (for torch.compile's tracing and opcheck)."""
    return None




#: parameter dtypes the op updates (others get check_param's error)
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass
class _Call:
    """The lists of one op call: one param group's CPU parameters of one dtype, with their state."""
    group_index: int
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    row_vars: list[Tensor] = field(default_factory=list)
    col_vars: list[Tensor] = field(default_factory=list)
    variances: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    eps_dtype: torch.dtype | None = None  # the dtype whose finfo.eps is eps1 when the group's eps1 is None


def _grad(p: Tensor) -> Tensor:
    """The gradient of a parameter the step takes (one with a gradient)."""
    assert p.grad is not None
    return p.grad


class Adafactor(KeepsOptions, _torch_adafactor):  # type: ignore[misc,valid-type]
    r"""Adafactor (Shazeer & Stern, 2018) in torch's variant, a drop-in for :class:`torch.optim.Adafactor`.

    For a parameter of >= 2 dimensions the second moment is factored over its last two (rows and
    columns): :math:`R_t = \mathrm{lerp}(R_{t-1}, \mathrm{mean}_j(g^2), \hat\beta_t)`, likewise :math:`C_t`, with
    :math:`\hat\beta_t = t^{\text{beta2\_decay}}`, :math:`\hat v_{ij} = R_i C_j / \max(\mathrm{mean}(R), \epsilon_1)`;
    a vector keeps the full :math:`v`. Then :math:`u = g/\sqrt{\max(\hat v, \epsilon_1^2)}` and
    :math:`\theta \leftarrow \theta(1-\eta\lambda) - \frac{\alpha_t}{\max(1, \mathrm{RMS}(u)/d)} u` with
    :math:`\alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta))\min(\eta, t^{-1/2})`.

    A step is one op call per param group and dtype (all its CPU tensors, the step counters advanced in C++),
    three sweeps over each factored tensor and two over a vector (torch's single-tensor step makes ~19):
    row/column sums and the parameter's norm, the update's norm, the update; the work of all tensors is
    split across threads in fixed blocks (results do not depend on the thread count). The factors follow
    torch's arithmetic and roundings (float32 to a few ulps, float64 to ~1e-15; Note [Adafactor rounding]).
    CUDA parameters take the same op, whose CUDA driver shares the formulas: per tensor, row and column sums,
    the slices' means, the update's norm and the update, in six launches with deterministic sums and no host
    synchronisation (Note [Adafactor on CUDA]); one call per (param group, device, dtype). Parameters on other
    devices and meta tensors run torch's own implementation; DTensor parameters are refused with an error.

    Args:
        params, lr, beta2_decay, eps, d, weight_decay, foreach, maximize: as in torch.optim.Adafactor (same
            defaults, validation errors and state: ``step``, ``row_var`` / ``col_var`` or ``variance``).
        fused: accepted as torch validates it elsewhere (``fused`` with ``foreach`` is an error), not recorded.
        ema: a :class:`fusedtrain.ensemble.EMA` updated after every step (``ema.update()``; not fused).
        max_grad_norm: clip the joint 2-norm of all gradients inside the step (the factor is applied in the
            kernel's sweeps, as ``clip_grad_norm_`` before the step would have; the norm is kept in
            ``last_grad_norm``).

    GradScaler: supported (``scaler.step(opt)`` hands the scale to the kernel, which unscales in registers;
    a step with ``found_inf`` is skipped). Refused with an error naming them: ``differentiable``,
    ``capturable``, ``l1``, ``master_weights``, ``stochastic_rounding``, ``state_dtype``.
    Empty parameters raise torch's ZeroDivisionError (Adafactor divides by their size), before any write.
    """

    _opt_name = "Adafactor"
    _step_supports_amp_scaling = True
    param_groups: list[dict[str, Any]]

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0, *,
                 foreach: bool | None = None, maximize: bool = False, fused: bool | None = None,
                 differentiable: bool = False, ema: Any = None, max_grad_norm: float | None = None,
                 **refused: Any) -> None:
        check_state_bits("Adafactor", refused.get("state_bits", 32), 4096, rule_8bit=None, rule_4bit=None,
                         no_8bit_reason="its second moments of matrices are already factored (a row and a column "
                         "vector), and its per-element states belong to 1-D parameters, which 8-bit states leave "
                         "in float32")
        check_own_step_options("Adafactor", foreach, fused, differentiable, refused)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.ema = ema
        self.last_grad_norm: Tensor | None = None
        self._plans: dict[int, tuple[Any, ...]] = {}  # group index -> _plan's cached lists
        super().__init__(params, lr, beta2_decay, eps, d, weight_decay, foreach=foreach, maximize=maximize)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Adafactor step: one op call per (param group, dtype) (Note [Adafactor blocks]); every check
        runs before the first write.

        Args:
            closure: a callable that re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = self._amp()
        created: list[Tensor] = []  # parameters whose state this step made: dropped again if the step is refused
        try:
            plans = [self._plan(gi, group, created) for gi, group in enumerate(self.param_groups)]
            calls = [(group, call) for group, (group_calls, _, _) in zip(self.param_groups, plans)
                     for call in group_calls]
            if len(calls) > 1:  # the op's own checks of every call before the first one writes
                for group, call in calls:
                    self._run(group, call, 1.0, 1.0, check_only=True)
            if found_inf is not None and float(found_inf) != 0.0:
                self._drop(created)
                return loss  # GradScaler found an inf/NaN: the step is skipped
        except Exception:
            self._drop(created)
            raise
        # GradScaler's unscale_ and clip_grad_norm_ multiply the gradients by these float32 factors
        inv_scale = 1.0 if grad_scale is None else float(grad_scale.double().reciprocal().float())
        clip = 1.0
        if self.max_grad_norm is not None and (calls or any(torch_params for _, torch_params, _ in plans)):
            grads = [g for _, call in calls for g in call.grads] + [_grad(p) for _, tp, _ in plans for p in tp]
            norm = self._unscaled_norm(grads_norm(grads), grad_scale)
            clip = float(clip_coefficient(norm, self.max_grad_norm))
        for group, (group_calls, torch_params, meta) in zip(self.param_groups, plans):
            for call in group_calls:
                try:
                    self._run(group, call, inv_scale, clip)
                except Exception:
                    if len(calls) == 1:  # the op refused the only call (its checks): nothing was written
                        self._drop(created)
                    raise
            if torch_params or meta:
                self._torch_params_step(group, torch_params + meta, inv_scale, clip)
        if self.ema is not None:
            self.ema.update()
        return loss

    def _drop(self, created: list[Tensor]) -> None:
        """Forget the state a refused or skipped step made (it mutates nothing), and the cached plans."""
        for p in created:
            self.state.pop(p, None)
        self.__dict__.setdefault("_plans", {}).clear()

    def _plan(self, gi: int, group: dict[str, Any], created: list[Tensor]
              ) -> tuple[list[_Call], list[Tensor], list[Tensor]]:
        """_collect's result for a group, reused while the same parameters have gradients (the per-parameter
        Python checks cost more than the kernels on thousands of small tensors): only the gradients are
        read again (the op checks them; a sparse one is refused by torch's message). Rebuilt when the
        group's parameters (the objects in the list), which of them have gradients, or any state entry
        (load_state_dict, a state tensor replaced by hand) change: the key holds the identities of all of
        them, so a stale list can never reach the op."""
        params = group["params"]
        grads = [p.grad for p in params]
        states = self.state
        key = (tuple(map(id, params)), tuple(g is not None for g in grads), id(states),
               tuple(id(v) for p in params if p in states for v in states[p].values()))
        plans = self.__dict__.setdefault("_plans", {})
        cached = plans.get(gi)
        if cached is not None and cached[0] is params and cached[1] == key:
            calls, others, meta = cached[2]
            for call in calls:
                call.grads = [grads[i] for i in call.positions]
            return calls, others, meta
        plan = self._collect(gi, group, created)
        key = key[:3] + (tuple(id(v) for p in params if p in states for v in states[p].values()),)  # with new state
        plans[gi] = (params, key, plan)
        return plan

    def _collect(self, gi: int, group: dict[str, Any], created: list[Tensor]
                 ) -> tuple[list[_Call], list[Tensor], list[Tensor]]:
        """A group's parameters with gradients: the op calls of its CPU ones (one per dtype, with their
        state, made as torch makes it on first use and recorded in ``created``), torch's implementation's
        (CUDA) and meta ones. torch's errors first; cheap checks here, the full ones (check_param) only to
        name what is wrong; the op checks the rest before it writes."""
        # one call per (dtype, pass): a parameter listed twice is updated twice, one update after the other,
        # as torch's for-loop does (one call must see each tensor once), so its k-th occurrence goes to pass k
        calls: dict[tuple[torch.device, torch.dtype, int], _Call] = {}
        seen: dict[int, int] = {}
        others: list[Tensor] = []
        meta: list[Tensor] = []
        states = self.state
        first_dtype: torch.dtype | None = None
        for pos, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Adafactor does not support complex parameters")
            if grad.is_sparse:
                raise RuntimeError("Adafactor does not support sparse gradients")
            device = p.device.type
            if device == "meta":
                meta.append(p)
                continue
            dtype = p.dtype
            if device not in ("cpu", "cuda") or grad.dtype != dtype or grad.shape != p.shape \
                    or grad.device != p.device or dtype not in _DTYPES:
                check_param(self._opt_name, p, where(gi, pos))  # names what is wrong, or lets a DTensor through
            if p.numel() == 0:
                raise ZeroDivisionError(f"float division by zero: fusedtrain.optim.Adafactor: {where(gi, pos)} is "
                                        "empty, and Adafactor divides by a parameter's size (torch.optim.Adafactor "
                                        "raises this too); nothing was updated")
            if first_dtype is None:  # torch's for-loop resolves eps1=None once, from the first parameter it steps
                first_dtype = dtype
            if is_dtensor(p):  # before any write: a refused step changes nothing
                raise RuntimeError(f"fusedtrain.optim.Adafactor: {where(gi, pos)} is a DTensor (FSDP2 / tensor "
                                   "parallel); Adafactor's row and column factors are not defined across shards "
                                   "here (torch.optim.Adafactor fails on DTensors too). Use an element-wise "
                                   "optimizer (e.g. fusedtrain.optim.AdamW) for sharded parameters.")
            if device not in ("cpu", "cuda"):
                others.append(p)
                continue
            state = states[p]
            if len(state) == 0:
                created.append(p)
                state["step"] = new_step()
                if p.dim() > 1:
                    row_shape, col_shape = list(p.shape), list(p.shape)
                    row_shape[-1] = 1
                    col_shape[-2] = 1
                    state["row_var"] = grad.new_zeros(row_shape)
                    state["col_var"] = grad.new_zeros(col_shape)
                else:
                    state["variance"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            step = state["step"]
            if not isinstance(step, Tensor) or step.device.type != "cpu":
                step = cpu_step(state)
            k = seen.get(id(p), 0)
            seen[id(p)] = k + 1
            call = calls.get((p.device, dtype, k))
            if call is None:
                call = calls[(p.device, dtype, k)] = _Call(gi)
            call.params.append(p)
            call.grads.append(grad)
            call.steps.append(step)
            call.positions.append(pos)
            if p.dim() > 1:
                call.row_vars.append(state["row_var"])
                call.col_vars.append(state["col_var"])
            else:
                call.variances.append(state["variance"])
        for call in calls.values():
            call.eps_dtype = first_dtype
        return list(calls.values()), others, meta

    def _run(self, group: dict[str, Any], call: _Call, inv_scale: float, clip: float, check_only: bool = False
             ) -> None:
        """The op on one call's lists; an error of its checks is named by check_param where it can be."""
        lr = _to_scalar(group["lr"])  # torch's scalars, with its types (a tensor lr stays a tensor here)
        weight_decay = group["weight_decay"]
        eps1 = group["eps"][0]
        if eps1 is None:
            eps1 = torch.finfo(call.eps_dtype).eps
        try:
            torch.ops.fusedtrain.adafactor_(
                call.params, call.grads, call.row_vars, call.col_vars, call.variances, call.steps,
                float(group["beta2_decay"]), float(eps1), float(group["eps"][1]), float(lr),
                float(1 - lr * weight_decay), weight_decay != 0, float(group["d"]), bool(group["maximize"]),
                inv_scale, clip, check_only)
        except (RuntimeError, NotImplementedError) as error:  # name the culprit (a sparse gradient dispatches away)
            if any(g.is_sparse for g in call.grads):
                raise RuntimeError("Adafactor does not support sparse gradients") from error
            for p, pos in zip(call.params, call.positions):
                check_param(self._opt_name, p, where(call.group_index, pos))
            raise

    def _torch_params_step(self, group: dict[str, Any], params: list[Tensor], inv_scale: float, clip: float) -> None:
        """torch's own implementation (CUDA and meta parameters), on gradients unscaled and clipped first
        as GradScaler / clip_grad_norm_ would have done."""
        for p in params:
            if p.device.type != "meta" and (inv_scale != 1.0 or clip != 1.0):
                _grad(p).mul_(inv_scale).mul_(clip)
        saved = self.param_groups
        amp: dict[str, Any] = {key: self.__dict__[key] for key in ("grad_scale", "found_inf") if key in self.__dict__}
        fn = _torch_adafactor.step
        if getattr(fn, "hooked", False):  # torch wrapped its class's step with the hook runner; ours ran them
            fn = fn.__wrapped__
        try:
            self.param_groups = [dict(group, params=params)]
            self.__dict__.update(grad_scale=None, found_inf=None)  # the gradients are unscaled already
            fn(self, None)
        finally:
            self.param_groups = saved
            for key in ("grad_scale", "found_inf"):
                self.__dict__.pop(key, None)
            self.__dict__.update(amp)
