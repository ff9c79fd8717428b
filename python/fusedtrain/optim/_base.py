"""Shared plumbing of the fusedtrain optimizers: checks, state steps, grouping, torch fallback."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._build import has_cuda_kernels
from ._groups import Split, splits_for

__all__ = ["FusedOptimizerMixin", "to_scalar", "new_step", "cpu_step", "check_param"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
                     torch.complex128)


def to_scalar(x: float | Tensor) -> float:
    """A hyperparameter as a Python float (a one-element tensor is read once per step)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def check_param(opt_name: str, p: Tensor) -> None:
    """Refuse, before anything is mutated, what the fused kernels cannot update."""
    grad = p.grad
    assert grad is not None
    if grad.is_sparse:
        raise RuntimeError(
            f"fusedtrain.optim.{opt_name} does not support sparse gradients; use torch.optim.SparseAdam or "
            f"torch.optim.{opt_name} for parameters with sparse gradients (e.g. nn.Embedding(sparse=True))")
    if p.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"fusedtrain.optim.{opt_name} updates CPU and CUDA tensors; got a parameter on "
                           f"'{p.device}'. Use torch.optim.{opt_name} for this device.")
    if p.device.type == "cuda" and not has_cuda_kernels():
        raise RuntimeError(
            f"fusedtrain.optim.{opt_name} got a CUDA parameter, but this fusedtrain build has no CUDA kernels. "
            "Rebuild with a CUDA build of torch and nvcc available (unset FUSEDTRAIN_CPU_ONLY): "
            "`pip install --no-build-isolation -e .`")
    if p.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(f"fusedtrain.optim.{opt_name} supports float32, float64, float16, bfloat16 and complex "
                           f"parameters; got {p.dtype}")
    if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
        raise RuntimeError(
            f"fusedtrain.optim.{opt_name}: a parameter's .grad ({grad.dtype} {tuple(grad.shape)} on {grad.device}) "
            f"must match the parameter ({p.dtype} {tuple(p.shape)} on {p.device})")


def cpu_step(state: dict[str, Any]) -> Tensor:
    """The state's ``step`` as the CPU scalar tensor the kernels advance (see Note [step counters]).

    A step restored from a capturable/fused torch optimizer (on the GPU) or an old float checkpoint
    is moved once; its value is unchanged.
    """
    step = state["step"]
    if not isinstance(step, Tensor):
        step = state["step"] = new_step().fill_(float(step))
    elif step.device.type != "cpu":
        step = state["step"] = step.to("cpu")
    return step


def new_step() -> Tensor:
    """A fresh step counter, as torch.optim makes one with capturable=False and fused=False."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype)


class FusedOptimizerMixin:
    """Mixed into subclasses of the torch.optim class of the same name.

    The torch base class provides the constructor's checks, defaults, ``param_groups``, ``state``,
    ``state_dict``/``load_state_dict``, hooks and ``zero_grad``; the subclass replaces ``step``.
    """

    _torch_cls: type[torch.optim.Optimizer]
    _opt_name: str
    param_groups: list[dict[str, Any]]
    state: Any

    @staticmethod
    def _check_compat_flags(foreach: bool | None, fused: bool | None, differentiable: bool) -> None:
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")

    def _use_torch_step(self) -> bool:
        """capturable / differentiable groups run torch's own implementation (same state keys)."""
        return any(g.get("capturable", False) or g.get("differentiable", False) for g in self.param_groups)

    def _torch_step(self, closure: Callable[[], Any] | None) -> Any:
        fn = self._torch_cls.step
        if getattr(fn, "hooked", False):  # torch wrapped its class's step with the hook runner; ours ran them
            fn = fn.__wrapped__  # type: ignore[attr-defined]
        return fn(self, closure)

    def _groups_to_update(self) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[Split]]]:
        """(group, params with a grad, their grads, device/dtype splits) of every group, all checked
        before any update runs, so a refused step changes nothing.

        Note [per-step host cost]: a step's Python work is a few list comprehensions per group. The full
        per-parameter checks and the (device, dtype) grouping run when a group's set of parameters
        with gradients changes; other steps only look for sparse gradients.
        """
        plans: dict[int, tuple[tuple[int, ...], list[Split]]] = self.__dict__.setdefault("_ft_plans", {})
        work = []
        for group in self.param_groups:
            params = group["params"]
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                params = [p for p, g in zip(params, grads) if g is not None]
                grads = [g for g in grads if g is not None]
            if not params:
                continue
            key = tuple(map(id, params))
            plan = plans.get(id(group))
            if plan is None or plan[0] != key or any(g.is_sparse for g in grads):
                for p in params:
                    check_param(self._opt_name, p)
                plan = plans[id(group)] = (key, splits_for(params))
            work.append((group, params, grads, plan[1]))
        return work

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's load_state_dict; ``step`` counters restored from a capturable/fused torch
        optimizer (on the GPU) are moved to the CPU once, where the fused kernels advance them."""
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if not self._use_torch_step():
            for entry in self.state.values():
                if "step" in entry:
                    cpu_step(entry)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step: one fused kernel per (device, dtype) of each group.

        With an EMA attached (``ema=``), the same kernels also update the averages of the parameters
        they change; the EMA's other parameters and its buffers follow in one more pass. The result
        equals ``step()`` followed by ``ema.update()``.

        Args:
            closure: a callable that re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        ema = self.ema
        if self._use_torch_step():
            loss = self._torch_step(closure)
            if ema is not None:
                ema.update()
            return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._groups_to_update()
        weight = ema.next_weight() if ema is not None else 0.0
        fused: list[Tensor] = []
        for group, params, grads, splits in work:
            averages = ema.averages_for(params) if ema is not None else None
            self._update_group(group, params, grads, splits, averages or [], weight)
            if averages:
                fused += params
        if ema is not None:
            ema.finish_fused_update(fused)
        return loss

    @property
    def ema(self) -> Any:
        """The :class:`fusedtrain.ensemble.EMA` updated with every step (``None``: no averaging)."""
        return self.__dict__.get("_ft_ema")

    @ema.setter
    def ema(self, value: Any) -> None:
        if value is not None and not all(hasattr(value, a) for a in ("next_weight", "averages_for",
                                                                      "finish_fused_update", "update")):
            raise TypeError(f"ema must be a fusedtrain.ensemble.EMA (or SWA), got {type(value).__name__}")
        self.__dict__["_ft_ema"] = value

    def _update_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], splits: list[Split],
                      ema_params: list[Tensor], ema_weight: float) -> None:
        """Creates missing state and runs the optimizer's fused op on one param group (moving
        ``ema_params``, when given, toward the updated parameters in the same pass)."""
        raise NotImplementedError
