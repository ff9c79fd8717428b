"""Shared plumbing of the fusedtrain optimizers: checks, state steps, grouping, torch fallback."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._build import has_cuda_kernels
from .._dtensor import check_local_pair, local, refuse_partitioned_extras
from ..clip import clip_coefficient, get_total_norm
from ._groups import Split, splits_for

__all__ = ["FusedOptimizerMixin", "to_scalar", "lr_arg", "new_step", "cpu_step", "check_param"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
                     torch.complex128)


def to_scalar(x: float | Tensor) -> float:
    """A hyperparameter as a Python float (a one-element tensor is read once per step)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def lr_arg(lr: float | Tensor) -> float | Tensor:
    """The learning rate as the kernels take it: a float, or a one-element tensor the op reads itself (on
    the CPU by the host, on the GPU by the kernels, so a GPU lr costs no host synchronisation)."""
    return lr if isinstance(lr, Tensor) else float(lr)


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
    check_local_pair(opt_name, p, grad)


def cpu_step(state: dict[str, Any], device: torch.device | None = None) -> Tensor:
    """The state's ``step`` where the kernels advance it (see Note [step counters] in optim_host.h): a CPU
    scalar tensor, or with ``device`` (capturable) a float32 scalar on the parameter's device.

    A step restored from another home (a capturable/fused torch optimizer, an old float checkpoint) is
    moved once; its value is unchanged.
    """
    step = state["step"]
    if not isinstance(step, Tensor):
        step = state["step"] = new_step(device).fill_(float(step))
    elif device is not None and device.type != "cpu":
        if step.device != device or step.dtype != torch.float32:
            step = state["step"] = step.to(device=device, dtype=torch.float32)
    elif step.device.type != "cpu":
        step = state["step"] = step.to("cpu")
    return step


def new_step(device: torch.device | None = None) -> Tensor:
    """A fresh step counter, as torch.optim makes one: a CPU scalar (capturable=False, fused=False; float64
    when that is the default dtype), or with ``device`` (capturable) a float32 scalar on that device."""
    if device is not None and device.type != "cpu":
        return torch.zeros((), dtype=torch.float32, device=device)
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype)


class FusedOptimizerMixin:
    r"""Mixed into subclasses of the torch.optim class of the same name.

    The torch base class provides the constructor's checks, defaults, ``param_groups``, ``state``,
    ``state_dict``/``load_state_dict``, hooks and ``zero_grad``; the subclass replaces ``step``.

    The options fusedtrain adds to every optimizer's constructor (keyword arguments):

    - ``ema``: a :class:`fusedtrain.ensemble.EMA` (or ``SWA``) whose averages the step's kernel updates in
      the same pass; equal to calling ``ema.update()`` after each step.
    - ``max_grad_norm``: clip the joint 2-norm of all gradients of this optimizer to this value inside the
      step (equal to ``torch.nn.utils.clip_grad_norm_`` before it; the norm is kept in ``last_grad_norm``).
      GradScaler's scale is honoured.
    - ``l1``: L1 penalty folded into the gradient, :math:`g \leftarrow g + \lambda_1\operatorname{sign}(\theta)`,
      inside the kernel (a param-group option; with ``weight_decay``, the elastic net).
    - ``master_weights``: float16/bfloat16 parameters get float32 master weights (state ``master_param``,
      made from the parameter on its first step); the kernel updates the master and writes the rounded
      value into the parameter in the same pass. States are float32 then.
    - ``stochastic_rounding``: bfloat16 parameters (without master weights) are stored with stochastic
      rounding, so updates smaller than half a bfloat16 ulp survive on average.
    - ``state_dtype``: ``torch.bfloat16`` keeps the states of float32 (or master-weight) parameters in
      bfloat16 (half the state memory and traffic); None: the parameter's dtype (float32 with master
      weights), as torch does.
    """

    _torch_cls: type[torch.optim.Optimizer]
    _opt_name: str
    param_groups: list[dict[str, Any]]
    state: Any
    # torch.amp.GradScaler hands optimizers that declare this its scale and found_inf (as attributes
    # grad_scale / found_inf during step) instead of unscaling the gradients itself; the kernels divide
    # the gradients by the scale in registers and skip the update when found_inf is set.
    _step_supports_amp_scaling = True
    #: Clip the joint 2-norm of all gradients of this optimizer to this value inside the step (None: off).
    max_grad_norm: float | None = None
    #: The gradients' joint 2-norm (unscaled) of the last step, when ``max_grad_norm`` is set.
    last_grad_norm: Tensor | None = None
    #: float16/bfloat16 parameters get float32 master weights (state ``master_param``) updated by the kernel,
    #: which writes the rounded value back into the parameter in the same pass.
    master_weights: bool = False
    #: bfloat16 parameters without master weights are stored with stochastic rounding.
    stochastic_rounding: bool = False
    #: dtype of the optimizer states (None: torch's choice; see ``_state_dtype_for``).
    state_dtype: torch.dtype | None = None

    def _init_extras(self, ema: Any, max_grad_norm: float | None, l1: float, master_weights: bool = False,
                     stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None) -> None:
        """The options fusedtrain adds to torch's: ``ema``, ``max_grad_norm``, ``master_weights``,
        ``stochastic_rounding``, ``state_dtype`` (optimizer-wide) and ``l1`` (a param-group option like
        ``weight_decay``, recorded in every group and in ``defaults``)."""
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"Invalid state_dtype: {state_dtype}; use None (torch's choice), torch.float32 or "
                             "torch.bfloat16")
        self.master_weights = bool(master_weights)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.state_dtype = state_dtype
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r}; pass a positive number, or None to turn "
                             "clipping off")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        refuse_partitioned_extras(self.param_groups)
        self.ema = ema
        defaults: dict[str, Any] = self.__dict__["defaults"]
        defaults["l1"] = l1
        for group in self.param_groups:
            group.setdefault("l1", l1)
            if not (isinstance(group["l1"], (int, float)) and group["l1"] >= 0):
                raise ValueError(f"Invalid l1 value: {group['l1']!r}; the L1 coefficient must be a number >= 0")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        for group in self.param_groups:
            group.setdefault("l1", 0.0)

    @staticmethod
    def _step_device(group: dict[str, Any], p: Tensor) -> torch.device | None:
        """Where a parameter's step counter lives: its device when the group is capturable, else the CPU."""
        return p.device if group.get("capturable", False) else None

    @staticmethod
    def _check_compat_flags(foreach: bool | None, fused: bool | None, differentiable: bool) -> None:
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")

    def _use_torch_step(self) -> bool:
        """differentiable groups run torch's own implementation (same state keys)."""
        return any(g.get("differentiable", False) for g in self.param_groups)

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
        """torch.optim's load_state_dict; ``step`` counters are moved once to where the fused kernels
        advance them (the CPU, or the parameter's device for a capturable group)."""
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if self.master_weights or self.state_dtype is not None:
            self._restore_state_dtypes(state_dict)
        if not self._use_torch_step():
            for group in self.param_groups:
                for p in group["params"]:
                    entry = self.state.get(p)
                    if entry and "step" in entry:
                        cpu_step(entry, self._step_device(group, p))

    def _restore_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict casts every floating state to its parameter's dtype; master weights and
        ``state_dtype`` states are taken again from the saved tensors in their own dtype (no precision lost)."""
        id_map = {pid: p for saved, group in zip(state_dict["param_groups"], self.param_groups)
                  for pid, p in zip(saved["params"], group["params"])}
        for pid, entry in state_dict["state"].items():
            p = id_map.get(pid)
            if p is None or p not in self.state:
                continue
            mine = self.state[p]
            for key, value in entry.items():
                if key == "step" or not isinstance(value, Tensor) or not value.is_floating_point():
                    continue
                want = torch.float32 if key == "master_param" else self._state_dtype_for(p)
                if mine[key].dtype != want:
                    mine[key] = value.to(device=p.device, dtype=want, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        r"""Performs one optimization step: one fused kernel per (device, dtype) of each group.

        With an EMA attached (``ema=``), the same kernels also update the averages of the parameters
        they change; the EMA's other parameters and its buffers follow in one more pass. The result
        equals ``step()`` followed by ``ema.update()``.

        With ``max_grad_norm`` set, one fused reduction computes the joint 2-norm of all gradients
        (unscaled when a GradScaler hands its scale) and the kernels multiply each gradient by
        :math:`\min(1, \text{max\_norm}/(\lVert g\rVert + 10^{-6}))` in registers: the same update as
        ``clip_grad_norm_`` before the step, without its pass over the gradients and without a host
        synchronisation. The norm is kept in ``last_grad_norm``.

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
        scalars = self._step_scalars(work)
        weight = ema.next_weight() if ema is not None else 0.0
        fused: list[Tensor] = []
        for group, params, grads, splits in work:
            for part_params, part_grads, part_splits, kind in self._precision_parts(params, grads, splits):
                extra: dict[str, Any] = dict(scalars, l1=group.get("l1", 0.0))
                masters = None
                if kind == "master":
                    masters = [self._master(p) for p in part_params]
                elif kind == "stochastic":
                    extra["stochastic_rounding"] = True
                # The EMA is fused only where the stored parameter is the kernel's nearest rounding.
                averages = ema.averages_for(part_params) if ema is not None and kind == "plain" else None
                self._update_group(group, part_params, part_grads, part_splits, averages or [], weight, extra,
                                   masters)
                if averages:
                    fused += part_params
        if ema is not None:
            ema.finish_fused_update(fused)
        return loss

    def _precision_parts(self, params: list[Tensor], grads: list[Tensor], splits: list[Split]
                         ) -> list[tuple[list[Tensor], list[Tensor], list[Split], str]]:
        """The group's parameters by storage scheme: "plain", "master" (float16/bfloat16 with
        ``master_weights``) and "stochastic" (bfloat16 with ``stochastic_rounding``)."""
        if not (self.master_weights or self.stochastic_rounding):
            return [(params, grads, splits, "plain")]
        kinds = []
        for p in params:
            if self.master_weights and p.dtype in (torch.float16, torch.bfloat16):
                kinds.append("master")
            elif self.stochastic_rounding and p.dtype == torch.bfloat16:
                kinds.append("stochastic")
            else:
                kinds.append("plain")
        if len(set(kinds)) == 1:
            return [(params, grads, splits, kinds[0])]
        parts = []
        for kind in ("plain", "master", "stochastic"):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if idx:
                sub = [params[i] for i in idx]
                parts.append((sub, [grads[i] for i in idx], splits_for(sub), kind))
        return parts

    def _master(self, p: Tensor) -> Tensor:
        """The float32 master copy of a low-precision parameter (state key ``master_param``), made from
        the parameter on first use."""
        state = self.state[p]
        master = state.get("master_param")
        if master is None:
            master = state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format)
        return master

    def _zeros(self, p: Tensor) -> Tensor:
        """A zero state tensor for parameter ``p`` in the state dtype (Note [mixed-precision layouts]):
        float32 (or ``state_dtype``) under master weights, ``state_dtype`` for float32 parameters, else the
        parameter's dtype, as torch.optim makes them."""
        return torch.zeros_like(p, dtype=self._state_dtype_for(p), memory_format=torch.preserve_format)

    def _state_dtype_for(self, p: Tensor) -> torch.dtype:
        low = p.dtype in (torch.float16, torch.bfloat16)
        if self.master_weights and low:
            return self.state_dtype if self.state_dtype in (torch.float32, p.dtype) else torch.float32
        if self.state_dtype is not None and p.dtype == torch.float32:
            return self.state_dtype
        return p.dtype

    def _step_scalars(self, work: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[Split]]]
                      ) -> dict[str, Any]:
        """GradScaler's grad_scale / found_inf (set on the optimizer during ``scaler.step``) and the clip
        coefficient of ``max_grad_norm``, as op keywords."""
        scalars: dict[str, Any] = {}
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None:
            scalars["grad_scale"] = grad_scale
        if found_inf is not None:
            scalars["found_inf"] = found_inf
        if self.max_grad_norm is not None and work:
            # all shards of DTensor gradients (Note [norm across shards]); the value is the same on every rank
            norm = local(get_total_norm([g for _, _, grads, _ in work for g in grads]))
            if grad_scale is not None:
                norm = norm / grad_scale.to(norm.device)
            self.last_grad_norm = norm
            scalars["clip_coef"] = clip_coefficient(norm, self.max_grad_norm)
        return scalars

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
                      ema_params: list[Tensor], ema_weight: float, scalars: dict[str, Any],
                      masters: list[Tensor] | None = None) -> None:
        """Creates missing state and runs the optimizer's fused op on one param group (moving
        ``ema_params``, when given, toward the updated parameters in the same pass; ``scalars``: the op's
        grad_scale / found_inf / clip_coef / l1 / stochastic_rounding keywords; ``masters``: float32 master
        weights the kernel updates in place of ``params``, writing the rounded values into ``params``)."""
        raise NotImplementedError
