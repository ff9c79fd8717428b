"""Adafactor in three sweeps per parameter (Note [Adafactor passes] in csrc/include/fusedtrain/adafactor.h)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..clip import clip_coefficient, grads_norm
from ._base import check_param, new_step, where

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


#: fusedtrain options of other optimizers that Adafactor does not take, with their "off" values
_REFUSED = dict(capturable=False, l1=0.0, master_weights=False, stochastic_rounding=False, state_dtype=None,
                state_bits=32)


def _grad(p: Tensor) -> Tensor:
    """The gradient of a parameter the step takes (one with a gradient)."""
    assert p.grad is not None
    return p.grad


class Adafactor(_torch_adafactor):  # type: ignore[misc,valid-type]
    r"""Adafactor (Shazeer & Stern, 2018) in torch's variant, a drop-in for :class:`torch.optim.Adafactor`.

    For a parameter of >= 2 dimensions the second moment is factored over its last two (rows and
    columns): :math:`R_t = \mathrm{lerp}(R_{t-1}, \mathrm{mean}_j(g^2), \hat\beta_t)`, likewise :math:`C_t`, with
    :math:`\hat\beta_t = t^{\text{beta2\_decay}}`, :math:`\hat v_{ij} = R_i C_j / \max(\mathrm{mean}(R), \epsilon_1)`;
    a vector keeps the full :math:`v`. Then :math:`u = g/\sqrt{\max(\hat v, \epsilon_1^2)}` and
    :math:`\theta \leftarrow \theta(1-\eta\lambda) - \frac{\alpha_t}{\max(1, \mathrm{RMS}(u)/d)} u` with
    :math:`\alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta))\min(\eta, t^{-1/2})`.

    Each step of a parameter is three sweeps over it in one fused CPU kernel (torch's single-tensor step
    makes ~19): row/column sums and the parameter's norm, the update's norm, the update; the factors
    follow torch's arithmetic and roundings (float32 to a few ulps, float64 to ~1e-15; Note [Adafactor
    rounding]). CUDA parameters run torch's own implementation (no fused CUDA kernel yet).

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
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if differentiable:
            raise ValueError("fusedtrain.optim.Adafactor: differentiable=True is not supported (torch.optim.Adafactor "
                             "has no differentiable implementation either)")
        for name, value in refused.items():
            if name not in _REFUSED:
                raise TypeError(f"Adafactor.__init__() got an unexpected keyword argument '{name}'")
            if value != _REFUSED[name]:
                raise ValueError(f"fusedtrain.optim.Adafactor: {name}={value!r} is not supported by Adafactor; "
                                 f"leave it at {_REFUSED[name]!r}")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool)
                                          or not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0)):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r}; pass a positive number, or None to turn "
                             "clipping off")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.ema = ema
        self.last_grad_norm: Tensor | None = None
        super().__init__(params, lr, beta2_decay, eps, d, weight_decay, foreach=foreach, maximize=maximize)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Adafactor step (Note [Adafactor passes]); every check runs before the first write.

        Args:
            closure: a callable that re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        plans = [self._collect(gi, group) for gi, group in enumerate(self.param_groups)]
        if found_inf is not None and float(found_inf) != 0.0:
            return loss  # GradScaler found an inf/NaN: the step is skipped
        fused = [p for fused_params, _, _ in plans for p in fused_params]
        # GradScaler's unscale_ and clip_grad_norm_ multiply the gradients by these float32 factors
        inv_scale = 1.0 if grad_scale is None else float(grad_scale.double().reciprocal().float())
        clip = 1.0
        if self.max_grad_norm is not None and (fused or any(torch_params for _, torch_params, _ in plans)):
            grads = [_grad(p) for fp, tp, _ in plans for p in fp + tp]
            norm = grads_norm(grads)
            if grad_scale is not None:
                norm = norm / grad_scale.to(norm.device)
            self.last_grad_norm = norm
            clip = float(clip_coefficient(norm, self.max_grad_norm))
        for group, (fused_params, torch_params, meta) in zip(self.param_groups, plans):
            for p in fused_params:
                self._fused_param_step(group, p, inv_scale, clip)
            if torch_params or meta:
                self._torch_params_step(group, torch_params + meta, inv_scale, clip)
        if self.ema is not None:
            self.ema.update()
        return loss

    def _collect(self, gi: int, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """A group's parameters with gradients: (fused on the CPU, torch's implementation (CUDA), meta),
        checked with torch's errors first; nothing is written."""
        fused: list[Tensor] = []
        others: list[Tensor] = []
        meta: list[Tensor] = []
        for pos, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Adafactor does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Adafactor does not support sparse gradients")
            if p.device.type == "meta":
                meta.append(p)
                continue
            check_param(self._opt_name, p, where(gi, pos))
            if p.numel() == 0:
                raise ZeroDivisionError(f"float division by zero: fusedtrain.optim.Adafactor: {where(gi, pos)} is "
                                        "empty, and Adafactor divides by a parameter's size (torch.optim.Adafactor "
                                        "raises this too); nothing was updated")
            (fused if p.device.type == "cpu" else others).append(p)
        return fused, others, meta

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        """torch's state, made as torch makes it."""
        state = self.state[p]
        grad = _grad(p)
        if len(state) == 0:
            state["step"] = new_step()
            if grad.dim() > 1:
                row_shape, col_shape = list(grad.shape), list(grad.shape)
                row_shape[-1] = 1
                col_shape[-2] = 1
                state["row_var"] = grad.new_zeros(row_shape)
                state["col_var"] = grad.new_zeros(col_shape)
            else:
                state["variance"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        return state

    def _fused_param_step(self, group: dict[str, Any], p: Tensor, inv_scale: float, clip: float) -> None:
        state = self._init_state(p)
        step_t = state["step"]
        if not isinstance(step_t, Tensor):
            step_t = state["step"] = new_step().fill_(float(step_t))
        step_t += 1
        step = step_t.item()
        # torch's scalars, in Python, with its types (a tensor lr stays a tensor there)
        lr = _to_scalar(group["lr"])
        eps1, eps2 = group["eps"]
        if eps1 is None:
            eps1 = torch.finfo(p.dtype).eps
        weight_decay = group["weight_decay"]
        rho = min(lr, 1 / (step**0.5))
        torch.ops.fusedtrain.adafactor_(
            p, _grad(p), state.get("row_var"), state.get("col_var"), state.get("variance"),
            float(step ** group["beta2_decay"]), float(eps1), float(eps2), float(rho),
            float(1 - lr * weight_decay), weight_decay != 0, float(group["d"]), bool(group["maximize"]),
            inv_scale, clip)

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
