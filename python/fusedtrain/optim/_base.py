"""Shared plumbing of the fusedtrain optimizers: checks, state, the cached step plan, torch fallbacks.

Note [the step]:
A fusedtrain optimizer's ``step()`` is, in eager mode, one call into a C++ step plan (``csrc/plan.cpp``,
Note [step plan]): the plan holds, per segment (one rule, one param group, one device and dtype, one
storage layout), the parameters, states, EMA averages and the drivers' work list; each step it checks in
C++ that none of that changed (reading every gradient's pointer there), computes the clip coefficient,
and runs the kernels. Python's share is O(1) per param group. The plan is built (O(parameters) Python:
every check, the state creation, the grouping) on the first step and whenever something it relies on
changes: parameters added or replaced, ``.data`` or a state tensor replaced, ``load_state_dict``, a
gradient appearing or vanishing, a gradient turning sparse. Under ``torch.compile`` the same segments
run through the ``step_`` op (traceable, with fake kernels); ``differentiable=True`` runs torch's step.

Parameters the fused kernels do not update are "external" and get torch's own implementation, as torch
would step them: sparse gradients (SGD and Adagrad, as torch supports them) and parameters on the meta
device (model-building flows create optimizers on meta parameters; torch's step there is a no-op on
meta tensors).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
import torch.optim.optimizer as _optim_hooks
from torch import Tensor

from .. import _ops
from .._build import has_cuda_kernels
from .._dtensor import check_local_pair, is_dtensor, local, refuse_partitioned_extras, rows_kept_whole
from ..clip import clip_coefficient, grads_norm
from . import _quant
from ._groups import real_view
from .functional import draw_sr_seed

__all__ = ["FusedOptimizerMixin", "to_scalar", "new_step", "cpu_step", "check_param"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
                     torch.complex128)
_HALF = (torch.float16, torch.bfloat16)

# Roles of a parameter in a plan, and kinds of a fused tuple (csrc/plan.cpp).
_ABSENT, _FUSED, _EXTERNAL = 0, 1, 2
_COMPLEX, _DTENSOR = 1, 2
_STALE, _UPDATED, _SKIPPED = 0, 1, 2

# fusedtrain's own options, kept by copies and pickles (Note [copies keep the options]).
_OPTION_KEYS = ("max_grad_norm", "master_weights", "stochastic_rounding", "state_dtype", "_ft_ema", "ema", "state_bits",
                "min_8bit_size")


#: fusedtrain options of the fused optimizers that the classes with a step of their own (Muon, Adafactor)
#: do not take, with their "off" values
OPTIONS_OFF: dict[str, Any] = dict(capturable=False, l1=0.0, master_weights=False, stochastic_rounding=False,
                                   state_dtype=None, state_bits=32)


def check_max_grad_norm(value: float | None, off: str = "clipping") -> float | None:
    """``max_grad_norm`` as a float, or None (``off`` is off); a ValueError for a bool, a non-number or a
    value that is not positive."""
    if value is not None and (isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0)):
        raise ValueError(f"Invalid max_grad_norm: {value!r}; pass a positive number, or None to turn {off} off")
    return None if value is None else float(value)


def check_own_step_options(name: str, foreach: bool | None, fused: bool | None, differentiable: bool,
                           refused: dict[str, Any]) -> None:
    """The constructor checks of a class with a step of its own (Muon, Adafactor): torch's flag errors, no
    ``differentiable`` (torch has no such implementation of these either), and the fusedtrain options it does
    not take (:data:`OPTIONS_OFF`: accepted at their "off" values, refused otherwise, unknown names a TypeError)."""
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if differentiable:
        raise ValueError(f"fusedtrain.optim.{name}: differentiable=True is not supported (torch.optim.{name} has no "
                         "differentiable implementation either)")
    for key, value in refused.items():
        if key not in OPTIONS_OFF:
            raise TypeError(f"{name}.__init__() got an unexpected keyword argument '{key}'")
        if value != OPTIONS_OFF[key]:
            raise ValueError(f"fusedtrain.optim.{name}: {key}={value!r} is not supported by {name}; leave it at "
                             f"{OPTIONS_OFF[key]!r}")


def check_state_bits(name: str, state_bits: int, min_8bit_size: int, *, rule_8bit: str | None,
                     rule_4bit: str | None, no_8bit_reason: str = "", state_dtype: torch.dtype | None = None,
                     differentiable: bool = False) -> None:
    """The constructor checks of ``state_bits`` / ``min_8bit_size`` of optimizer ``name`` (Note [8-bit states in
    the optimizers]): ``rule_8bit`` / ``rule_4bit`` its quantized rules (None: it has none, and
    ``no_8bit_reason`` says why); ``state_dtype`` and ``differentiable`` cannot come with quantized states."""
    if isinstance(state_bits, bool) or state_bits not in (4, 8, 32):
        raise ValueError(f"Invalid state_bits: {state_bits!r}; use 32 (float states), 8 or 4 (blockwise-"
                         "quantized 8-bit or 4-bit states)")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"Invalid min_8bit_size: {min_8bit_size!r}; pass an int >= 0 (parameters with fewer "
                         "elements keep float32 states)")
    if state_bits == 4 and rule_4bit is None:
        raise ValueError(f"Invalid state_bits: 4; fusedtrain.optim.{name} has no 4-bit states (only Adam and "
                         "AdamW have). Use state_bits=32, or state_bits=8 where the optimizer has 8-bit states "
                         "(docs/optim.md, \"8-bit states\" and \"4-bit states\")")
    if state_bits in (4, 8):
        if state_bits == 8 and rule_8bit is None:
            reason = f": {no_8bit_reason}" if no_8bit_reason else ""
            raise ValueError(f"Invalid state_bits: 8; fusedtrain.optim.{name} has no 8-bit states{reason}. Use "
                             "state_bits=32, or an optimizer with 8-bit states (Note [8-bit states in the "
                             "optimizers]: docs/optim.md, \"8-bit states\")")
        if state_dtype is not None:
            raise ValueError(f"state_bits={state_bits} and state_dtype both set the states' precision; pass "
                             "only one")
        if differentiable:
            raise ValueError(f"state_bits={state_bits} cannot be differentiable (torch's implementation, which "
                             "differentiable=True runs, keeps float states); use state_bits=32")


def quantized_states(p: Tensor, state_bits: int, min_8bit_size: int) -> bool:
    """Whether an optimizer with ``state_bits`` / ``min_8bit_size`` keeps ``p``'s states quantized (Note [8-bit
    states in the optimizers]): 8 bits for real parameters of >= 2 dims with >= ``min_8bit_size`` elements
    (DTensors with whole rows on each rank), 4 bits for real plain tensors of >= ``min_8bit_size`` elements."""
    if state_bits not in (4, 8) or p.is_complex() or p.numel() < min_8bit_size:
        return False
    if state_bits == 4:  # one-dimensional packed codes: plain tensors of any shape, no DTensor layout
        return not is_dtensor(p)
    return p.dim() >= 2 and (not is_dtensor(p) or rows_kept_whole(p))


def convert_state_bits(name: str, state: dict[str, Any], key: str, p: Tensor, bits: int, signed: bool) -> bool:
    """State ``key`` of parameter ``p`` (in its state dict ``state``) as codes of ``bits`` (8 or 4: quantized
    from float values, or converted from codes of the other width through their float values) or, for
    ``bits=32``, as float values (codes are dequantized to float32; floats are left as they are). ``signed``:
    the state can be negative (signed codes). Returns whether the state now holds codes. Optimizer ``name``
    names the errors (codes without their scales)."""
    value = state.get(key)
    if not isinstance(value, Tensor):  # (SGD's momentum_buffer may be None in torch's state)
        return False
    absmax_key = key + _quant.ABSMAX_SUFFIX
    absmax4_key, shape4_key = key + _quant.ABSMAX4_SUFFIX, key + _quant.SHAPE4_SUFFIX
    if _quant.is_codes(value):
        four = absmax4_key in state
        if (four and shape4_key not in state) or (not four and absmax_key not in state):
            raise RuntimeError(f"fusedtrain.optim.{name}: the state '{key}' holds quantized codes but "
                               f"'{absmax4_key}' and '{shape4_key}' (4 bits) or '{absmax_key}' (8 bits) are "
                               "missing")
        if bits == (4 if four else 8):
            return True
        # the other width, or float states wanted: through the float values
        if four:
            value = _quant.dequantize4(value, state.pop(absmax4_key), state.pop(shape4_key), torch.float32)
        else:
            value = _quant.dequantize(value, state.pop(absmax_key), torch.float32)
        state[key] = value = value.to(p.device)
    if bits == 4:
        state[key], state[absmax4_key] = _quant.quantize4(value, signed)
        state[shape4_key] = tuple(p.shape)
        return True
    if bits == 8:
        state[key], state[absmax_key] = _quant.quantize(value, signed)
        return True
    return False


def restore_saved_codes(param_groups: list[dict[str, Any]], state: Any, state_dict: dict[str, Any]
                        ) -> Iterator[tuple[Tensor, dict[str, Any], str, Tensor]]:
    """After torch's load_state_dict (which casts every state to its parameter's dtype): takes the quantized
    codes and their scales again from ``state_dict`` as saved, and yields ``(param, its state, key, saved
    value)`` for every other floating state tensor but ``step``, for the caller's own dtype rules."""
    id_map = {pid: p for saved, group in zip(state_dict["param_groups"], param_groups)
              for pid, p in zip(saved["params"], group["params"])}
    for pid, entry in state_dict["state"].items():
        p = id_map.get(pid)
        if p is None or p not in state:
            continue
        mine = state[p]
        for key, value in entry.items():
            if key == "step" or not isinstance(value, Tensor):
                continue
            if _quant.is_codes(value) or any(key.endswith(suffix) and _quant.is_codes(entry.get(key[:-len(suffix)]))
                                             for suffix in (_quant.ABSMAX_SUFFIX, _quant.ABSMAX4_SUFFIX)):
                mine[key] = value.to(device=p.device, copy=True)
            elif value.is_floating_point():
                yield p, mine, key, value


# Note [the step's wrapper]:
# torch.optim.Optimizer wraps each class's ``step`` once (``_patch_step_function``) in a function that opens a
# ``torch.autograd.profiler.record_function`` range named "Optimizer.step#<class>.step" and runs the global and
# per-optimizer step pre and post hooks. That range is a dispatcher call that builds a TorchScript object, with
# or without a profiler attached: 18 us a step with warm caches and ~220 us with cold ones on the 2-core VM,
# as much as the rest of fusedtrain's step over 2004 one-element tensors (benchmarks/NOTES.md, "Cold step,
# fourth pass"). fusedtrain's classes wrap their step in the same hook runner, with the same range name,
# opened by ``torch._C._profiler._RecordFunctionFast`` (the C++ range torch's compiled code uses: it records
# only when a profiler or a RecordFunction observer is attached; ~1 us warm, ~30 us cold). Under
# ``torch.compile`` the call goes through torch's own wrapper, which Dynamo knows how to trace.
try:
    from torch._C._profiler import _RecordFunctionFast as _FastRange
except ImportError:  # pragma: no cover - torch builds without it use torch's wrapper throughout
    _FastRange = None


def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` (a class's ``step``) wrapped as ``torch.optim.Optimizer.profile_hook_step`` wraps it (Note
    [the step's wrapper]): the profiler range "Optimizer.step#<class>.step" around the global and then the
    optimizer's step pre hooks, the step, ``_optimizer_step_code`` and the post hooks."""
    traced = torch.optim.Optimizer.profile_hook_step(func)
    if _FastRange is None:
        return traced

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return traced(*args, **kwargs)
        self = args[0]
        with _FastRange(f"Optimizer.step#{self.__class__.__name__}.step"):
            for pre_hook in chain(_optim_hooks._global_optimizer_pre_hooks.values(),
                                  self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(
                            f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
            out = func(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in chain(self._optimizer_step_post_hooks.values(),
                                   _optim_hooks._global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper


class KeepsOptions:
    """What every fusedtrain optimizer class shares, mixed in before its torch base class (also by Muon and
    Adafactor, whose steps are their own): Note [copies keep the options] (torch.optim's ``__getstate__``
    keeps ``defaults``, ``state`` and ``param_groups`` only; fusedtrain's options live on the object and go
    with it: deepcopy, pickle, torch.save), GradScaler's attributes, and the unscaled gradient norm."""

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        for key in _OPTION_KEYS:
            if key in self.__dict__:
                state[key] = self.__dict__[key]
        return state

    def _patch_step_function(self) -> None:
        """torch.optim.Optimizer's hook (Note [the step's wrapper]): the class's ``step`` wrapped once, on the
        first instance, with fusedtrain's profiling and hook runner instead of torch's."""
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{self.__class__.__name__}.zero_grad"
        if not getattr(self.__class__.step, "hooked", None):
            self.__class__.step = profile_hook_step(self.__class__.step)  # type: ignore[method-assign]

    def _amp(self) -> tuple[Tensor | None, Tensor | None]:
        """GradScaler's grad_scale / found_inf (set on the optimizer during ``scaler.step``)."""
        d = self.__dict__
        return d.get("grad_scale"), d.get("found_inf")

    def _unscaled_norm(self, norm: Tensor, grad_scale: Tensor | None) -> Tensor:
        """The gradients' joint norm ``norm`` (float32 or wider) divided by GradScaler's scale, before any
        narrowing; kept as ``last_grad_norm``."""
        if grad_scale is not None:
            norm = norm / grad_scale.to(norm.device)
        self.last_grad_norm = norm
        return norm


def to_scalar(x: float | Tensor, name: str = "hyperparameter") -> float:
    """A hyperparameter as a Python float. A one-element tensor is read on the host, which a CUDA graph
    being captured cannot do: such values are refused there (only ``lr`` may be a device tensor)."""
    if isinstance(x, Tensor):
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"fusedtrain: {name} is a CUDA tensor, which the step would have to read on the host while a CUDA "
                "graph is being captured; pass it as a float (only lr may be a tensor on the device: the kernels "
                "read it there)")
        return float(x.item())
    return float(x)


def where(group_index: int, position: int) -> str:
    """How errors name a parameter: ``param_groups[g]['params'][i]``."""
    return f"param_groups[{group_index}]['params'][{position}]"


def check_param(opt_name: str, p: Tensor, name: str = "a parameter") -> None:
    """Refuse, before anything is mutated, a parameter the fused kernels cannot update (dense gradient)."""
    grad = p.grad
    assert grad is not None
    if p.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"fusedtrain.optim.{opt_name}: {name} is on '{p.device}'; the fused kernels update CPU "
                           f"and CUDA tensors. Use torch.optim.{opt_name} for this device.")
    if p.device.type == "cuda" and not has_cuda_kernels():
        raise RuntimeError(
            f"fusedtrain.optim.{opt_name} got a CUDA parameter ({name}), but this fusedtrain build has no CUDA "
            "kernels. Rebuild with a CUDA build of torch and nvcc available (unset FUSEDTRAIN_CPU_ONLY): "
            "`pip install --no-build-isolation -e .`")
    if p.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(f"fusedtrain.optim.{opt_name} supports float32, float64, float16, bfloat16 and complex "
                           f"parameters; {name} is {p.dtype}")
    if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
        raise RuntimeError(
            f"fusedtrain.optim.{opt_name}: {name}: its .grad ({grad.dtype} {tuple(grad.shape)} on {grad.device}) "
            f"must match the parameter ({p.dtype} {tuple(p.shape)} on {p.device}); nothing was updated")
    check_local_pair(opt_name, p, grad)
    t = local(p)
    if t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
        raise RuntimeError(
            f"fusedtrain.optim.{opt_name}: {name} has internally overlapping memory (e.g. an expanded tensor), so "
            "an in-place update would write one location several times; make it a real tensor (.clone()) before "
            "creating the optimizer. Nothing was updated.")


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


@dataclass
class _Collected:
    """One walk over the param groups: every parameter's role, checked (nothing written yet)."""
    roles: list[list[int]] = field(default_factory=list)
    fused: list[list[int]] = field(default_factory=list)      # positions per group
    external: list[tuple[int, list[int]]] = field(default_factory=list)


@dataclass
class _Segment:
    """One update call: a group's parameters of one device, dtype, storage layout and update pass."""
    group: int
    positions: list[int]
    params: list[Tensor]
    kind: str  # "plain", "master" or "stochastic" (see FusedOptimizerMixin._kind)
    averages: list[Tensor] | None  # the EMA averages fused into the update
    first: bool  # the parameters' first update of a kind the rule treats specially (SGD's buffers)
    rule: str = ""  # the optimizer's rule, or its 8-bit variant (Note [8-bit states in the optimizers])


@dataclass
class _Plan:
    """The Python side of a step plan: the C++ plan and what the Python step does around it."""
    impl: Any
    group_params: list[list[Tensor]]
    external: list[tuple[int, list[int]]]
    fused_ema: list[Tensor]      # parameters whose averages the kernels move
    fresh: list[Tensor]          # SGD: parameters whose momentum buffers start with this update
    sharded: bool                # DTensor parameters: the clip norm is reduced across ranks in Python
    grads_of: list[tuple[int, int]]  # (group, position) of every fused parameter (for a sharded norm)
    device: torch.device | None
    stochastic: bool = False     # some segment rounds stochastically: a seed is drawn each step
    on_cuda: bool = False        # the first device is a GPU (a step under CUDA-graph capture is checked)


# Note [amp scaling and closures]: ``_step_supports_amp_scaling`` tells torch.amp.GradScaler to hand the step
# its scale instead of unscaling the gradients in a pass of its own, and tells Lightning (which reads it to
# decide whether the gradients are still scaled when it clips them) to refuse gradient clipping. The claim
# only holds where a GradScaler is in use, and none is while step() runs a closure: GradScaler.step refuses
# closures, so the gradients a closure makes are unscaled. Lightning's bf16-mixed (no GradScaler) and 32-bit
# steps call step(closure) and clip inside the closure: there the instance declares False, so
# ``gradient_clip_val`` works, while GradScaler's steps (no closure) keep the in-kernel unscale.
def _unscaled_closure(opt: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
    """``closure`` wrapped so that ``opt`` declares no amp-scaling support while it runs."""
    def run() -> Any:
        before = opt.__dict__.get("_step_supports_amp_scaling")
        opt.__dict__["_step_supports_amp_scaling"] = False
        try:
            return closure()
        finally:
            if before is None:
                opt.__dict__.pop("_step_supports_amp_scaling", None)
            else:
                opt.__dict__["_step_supports_amp_scaling"] = before
    return run


class FusedOptimizerMixin(KeepsOptions):
    r"""Mixed into subclasses of the torch.optim class of the same name.

    The torch base class provides the constructor's checks, defaults, ``param_groups``, ``state``,
    ``state_dict``/``load_state_dict``, hooks and ``zero_grad``; the subclass declares its rule and states
    and the mixin provides ``step`` (Note [the step]).

    The options fusedtrain adds to every optimizer's constructor (keyword arguments):

    - ``ema``: a :class:`fusedtrain.ensemble.EMA` (or ``SWA``) whose averages the step's kernel updates in
      the same pass; equal to calling ``ema.update()`` after each step. A step that GradScaler skips
      (found_inf) leaves the EMA untouched (averages, buffers and ``num_updates``).
    - ``max_grad_norm``: clip the joint 2-norm of all gradients of this optimizer to this value inside the
      step (equal to ``torch.nn.utils.clip_grad_norm_`` before it; the norm is kept in ``last_grad_norm``).
      GradScaler's scale is honoured: the norm of the scaled gradients is taken in float32 (or float64) and
      divided by the scale before anything is narrowed.
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
    - ``state_bits`` (optimizers with an 8-bit rule: Adam, AdamW, SGD, Adagrad, RMSprop, NAdam, RAdam, Adamax,
      Adadelta, Lion, Lamb, Lars; the others refuse 8 with a ValueError that says why): 8 stores the states
      of every real parameter of >= 2 dims with at least ``min_8bit_size`` elements (default 4096) as
      blockwise-quantized 8-bit codes plus one float32 absmax per block of up to 256 elements of a dim-0 slice
      (Note [8-bit states in the optimizers]; DTensor parameters sharded along dim 0, as FSDP2 shards them,
      included); 4 (Adam and AdamW only; the others refuse it) stores the states of every real, non-DTensor
      parameter with at least ``min_8bit_size`` elements as packed 4-bit codes plus one float32 absmax per 128
      elements (Note [4-bit optimizer states] in csrc/include/fusedtrain/quant4.h); 32 (the default): float
      states.

    Copies (``copy.deepcopy``, ``pickle``, ``torch.save``) keep these options and step exactly as the
    original (a deepcopy of ``(model, opt)`` together keeps the EMA attached to the copied model).
    """

    _torch_cls: type[torch.optim.Optimizer]
    _opt_name: str
    _rule: str
    _supports_sparse: bool = False  # torch.optim's implementation takes sparse gradients (SGD, Adagrad)
    param_groups: list[dict[str, Any]]
    state: Any
    defaults: dict[str, Any]
    # torch.amp.GradScaler hands optimizers that declare this its scale and found_inf (as attributes
    # grad_scale / found_inf during step) instead of unscaling the gradients itself; the kernels divide
    # the gradients by the scale in registers and skip the update when found_inf is set. False while
    # step() runs a closure (Note [amp scaling and closures]).
    _step_supports_amp_scaling = True
    #: Clip the joint 2-norm of all gradients of this optimizer to this value inside the step (None: off).
    max_grad_norm: float | None = None
    #: float16/bfloat16 parameters get float32 master weights (state ``master_param``) updated by the kernel,
    #: which writes the rounded value back into the parameter in the same pass.
    master_weights: bool = False
    #: bfloat16 parameters without master weights are stored with stochastic rounding.
    stochastic_rounding: bool = False
    #: dtype of the optimizer states (None: torch's choice; see ``_state_dtype_for``).
    state_dtype: torch.dtype | None = None
    #: bits per state element: 32 (float states), 8 or 4 (Note [8-bit states in the optimizers]).
    state_bits: int = 32
    #: at state_bits=8 or 4, parameters with fewer elements keep float states (as bitsandbytes does).
    min_8bit_size: int = 4096
    # The rule's 8-bit variant (None: the optimizer has none) and which of its states can be negative
    # (int8 codes on the signed map; the others get uint8 codes on the unsigned map).
    _rule_8bit: str | None = None
    # The rule's 4-bit variant (None: the optimizer has none; Adam and AdamW have "adam4bit").
    _rule_4bit: str | None = None
    _signed_states: frozenset[str] = frozenset()
    # States the 8-bit rule keeps float, as the float rule keeps them (Note [mixed state lists] in
    # csrc/include/fusedtrain/rules_quant.h; Schedule-Free AdamW's z): no codes, no "_absmax".
    _float_8bit_states: frozenset[str] = frozenset()
    # Why an optimizer without an 8-bit rule has none (the state_bits=8 error says it).
    _no_8bit_reason: str = ""

    # ------------------------------------------------------------------ what each optimizer declares
    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        """The state keys the rule updates, in the order of its state lists (e.g. exp_avg, exp_avg_sq)."""
        raise NotImplementedError

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        """Creates the missing state of ``p`` under torch's keys (called before its first fused update)."""
        raise NotImplementedError

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """The rule's hyperparameters for ``group``, by name (``fusedtrain._ops.rules()``)."""
        raise NotImplementedError

    def _rule_max_norm(self) -> float | None:
        """A rule's own gradient clipping (LAMB's global clipping with timm's semantics): its max norm, or None.
        The kernels then read ``_rule_clip_coef(norm, max_norm)`` as their clip value (Bound::clip_coef in
        math.h), with ``norm`` the joint 2-norm of the step's gradients (unscaled, as for ``max_grad_norm``)."""
        return None

    def _rule_clip_coef(self, norm: Tensor, max_norm: float) -> Tensor:
        """The clip value the rule's kernels read, from the gradients' joint norm (see ``_rule_max_norm``)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------- construction
    def _init_extras(self, ema: Any, max_grad_norm: float | None, l1: float, master_weights: bool = False,
                     stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None,
                     state_bits: int = 32, min_8bit_size: int = 4096) -> None:
        """The options fusedtrain adds to torch's: ``ema``, ``max_grad_norm``, ``master_weights``,
        ``stochastic_rounding``, ``state_dtype``, ``state_bits``, ``min_8bit_size`` (optimizer-wide) and ``l1``
        (a param-group option like ``weight_decay``, recorded in every group and in ``defaults``)."""
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"Invalid state_dtype: {state_dtype}; use None (torch's choice), torch.float32 or "
                             "torch.bfloat16")
        self._init_state_bits(state_bits, min_8bit_size, state_dtype)
        self.master_weights = bool(master_weights)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.state_dtype = state_dtype
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        refuse_partitioned_extras(self.param_groups)
        self.ema = ema
        self.defaults["l1"] = l1
        for group in self.param_groups:
            group.setdefault("l1", l1)
            if not (isinstance(group["l1"], (int, float)) and group["l1"] >= 0):
                raise ValueError(f"Invalid l1 value: {group['l1']!r}; the L1 coefficient must be a number >= 0")

    def _init_state_bits(self, state_bits: int, min_8bit_size: int, state_dtype: torch.dtype | None) -> None:
        """Checks and records ``state_bits`` / ``min_8bit_size`` (Note [8-bit states in the optimizers])."""
        check_state_bits(self._opt_name, state_bits, min_8bit_size, rule_8bit=self._rule_8bit,
                         rule_4bit=self._rule_4bit, no_8bit_reason=self._no_8bit_reason, state_dtype=state_dtype,
                         differentiable=any(g.get("differentiable", False) for g in self.param_groups))
        self.state_bits = int(state_bits)
        self.min_8bit_size = int(min_8bit_size)

    # Note [8-bit states in the optimizers]:
    # With state_bits=8, a real parameter of >= 2 dims with at least min_8bit_size elements is updated by
    # the rule's 8-bit variant (_rule_8bit, e.g. "adam8bit": Note [quantized rules] in
    # csrc/include/fusedtrain/rules_quant.h); its state keeps torch's keys for the codes (exp_avg: int8
    # codes of the parameter's shape; exp_avg_sq: uint8) and adds "<key>_absmax" (float32, one per block of
    # up to 256 elements of one dim-0 slice: Note [row blocks] in quant.h), see optim/_quant.py. A DTensor
    # parameter qualifies when its rows are whole on each rank (rows_kept_whole: placements Shard(0) /
    # Replicate, as FSDP2 shards): its codes and absmax are DTensors placed like it (what
    # torch.distributed.checkpoint saves and reshards), and the kernels update the local shards. Other
    # DTensors (Shard(d > 0), _StridedShard) keep float32 states, since their blocks would straddle ranks.
    # Parameters of 0 or 1 dims (biases, norms) keep float32 states everywhere: FSDP2 cuts a 1-D parameter
    # anywhere, so its blocks could not stay on one rank, and quantizing it only when unsharded would give a
    # single-process run and an FSDP2 run different state_dict keys, which torch.distributed.checkpoint
    # cannot load into each other. Smaller parameters keep float32 states (as bitsandbytes does: the
    # scales would cost more than the codes save), in segments of the float rule. Float states met where
    # codes are wanted (a torch.optim checkpoint, a state_bits=32 run) are quantized, and codes met where
    # floats are wanted are dequantized, at load_state_dict and before a parameter's first update.
    # state_bits=4 (Adam and AdamW: _rule_4bit, "adam4bit") works the same way with the 4-bit format: the
    # packed codes under the state's key, "<key>_absmax4" and "<key>_shape4" (optim/_quant.py); states of
    # the other width are converted through their float values. An 8-bit rule may keep some states float
    # (_float_8bit_states: Schedule-Free AdamW's z, the iterate itself); those stay as the float rule keeps them.
    def _quantized(self, p: Tensor) -> bool:
        """Whether ``p``'s states are 8-bit or 4-bit (Note [8-bit states in the optimizers])."""
        return quantized_states(p, self.state_bits, self.min_8bit_size)

    def _rule_of(self, p: Tensor) -> str:
        """The rule that updates ``p``: the optimizer's, or its 8-bit or 4-bit variant."""
        if not self._quantized(p):
            return self._rule
        quantized = self._rule_4bit if self.state_bits == 4 else self._rule_8bit
        return quantized if quantized is not None else self._rule

    def _rule_state_keys(self, group: dict[str, Any], rule: str) -> list[str]:
        """The state keys of ``rule``'s state lists: ``_state_keys``, each followed by its ``_absmax`` for the
        8-bit rule (``_absmax4`` for the 4-bit one), except the states the 8-bit rule keeps float."""
        keys = self._state_keys(group)
        if rule == self._rule:
            return keys
        if rule == self._rule_4bit:
            return [k for key in keys for k in (key, key + _quant.ABSMAX4_SUFFIX)]
        return [k for key in keys
                for k in ((key,) if key in self._float_8bit_states else (key, key + _quant.ABSMAX_SUFFIX))]

    def _convert_state(self, group: dict[str, Any], p: Tensor, key: str) -> None:
        """State ``key`` of ``p`` into the form its rule updates: codes and absmax (8-bit), or a float tensor
        of the state dtype (Note [mixed-precision layouts])."""
        float_kept = self.state_bits == 8 and key in self._float_8bit_states  # (Schedule-Free AdamW's z)
        bits = self.state_bits if self._quantized(p) and not float_kept else 32
        state = self.state[p]
        if convert_state_bits(self._opt_name, state, key, p, bits, key in self._signed_states):
            return
        if not isinstance(state[key], Tensor):  # (SGD's momentum_buffer may be None in torch's state)
            return
        want = self._state_dtype_for(p)
        if state[key].dtype != want:
            state[key] = self._state_in(group, p, key, want)

    @staticmethod
    def _check_compat_flags(foreach: bool | None, fused: bool | None, differentiable: bool) -> None:
        """torch's checks of foreach / fused for classes whose torch constructor does not make them."""
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        self.__dict__["_ft_plan"] = None

    # Note [copies keep the options] (KeepsOptions): the plan and other caches do not go with a copy
    # (rebuilt on its first step).
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self.__dict__["_ft_plan"] = None
        for group in self.param_groups:
            group.setdefault("l1", 0.0)

    def _step_device(self, group: dict[str, Any], p: Tensor) -> torch.device | None:
        """Where a parameter's step counter lives: its device when the group is capturable (or a
        :class:`~fusedtrain.optim.CapturedStep` drives the optimizer), else the CPU."""
        return p.device if group.get("capturable", False) or self.__dict__.get("_ft_device_steps") else None

    def _use_torch_step(self) -> bool:
        """differentiable groups run torch's own implementation (same state keys)."""
        return any(g.get("differentiable", False) for g in self.param_groups)

    def _torch_step(self, closure: Callable[[], Any] | None) -> Any:
        fn = self._torch_cls.step
        if getattr(fn, "hooked", False):  # torch wrapped its class's step with the hook runner; ours ran them
            fn = fn.__wrapped__  # type: ignore[attr-defined]
        return fn(self, closure)

    # ------------------------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's load_state_dict; ``step`` counters are moved once to where the fused kernels
        advance them (the CPU, or the parameter's device for a capturable group)."""
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self.__dict__["_ft_plan"] = None
        has_codes = any(_quant.is_codes(v) for entry in state_dict["state"].values() for v in entry.values())
        self._restore_state_dtypes(state_dict, self.master_weights or self.state_dtype is not None or has_codes)
        if not self._use_torch_step():
            for group in self.param_groups:
                for p in group["params"]:
                    entry = self.state.get(p)
                    if entry and "step" in entry:
                        self._home_counters(entry, self._step_device(group, p))
                    if entry and not p.is_complex() and (has_codes or self.state_bits != 32):
                        for key in self._state_keys(group):  # Note [8-bit states in the optimizers]
                            if key in entry:
                                self._convert_state(group, p, key)

    def _restore_state_dtypes(self, state_dict: dict[str, Any], all_states: bool) -> None:
        """torch's load_state_dict casts every state to its parameter's dtype. Taken again from the saved tensors,
        with no precision lost: the 8-bit codes and their absmax (as saved); the rule's tensor scalars (NAdam's
        mu_product, ASGD's eta and mu), which torch makes in float32 and the kernels read in float32 or float64,
        where the cast narrowed them to a float16 / bfloat16 parameter's dtype (a low-precision one saved becomes
        float32); with ``all_states`` (master weights, ``state_dtype``, codes), the master weights (float32) and
        the states (``_state_dtype_for``)."""
        scalars = _ops.RULES[self._rule]["aux"]
        if not (all_states or scalars):
            return  # torch's cast narrowed nothing the kernels need back (no codes either)
        for p, mine, key, value in restore_saved_codes(self.param_groups, self.state, state_dict):
            if key in scalars:
                if mine[key].dtype in (torch.float32, torch.float64):
                    continue  # (a float64 parameter's upcast keeps every bit, as in torch's own loaded run)
                want = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32
            elif all_states:
                want = torch.float32 if key == "master_param" else self._state_dtype_for(p)
            else:
                continue
            if mine[key].dtype != want:
                mine[key] = value.to(device=p.device, dtype=want, copy=True)

    # ----------------------------------------------------------------------------------------- step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        r"""Performs one optimization step (Note [the step]): one fused kernel per (device, dtype) of each
        group, all reached through one cached C++ plan.

        With an EMA attached (``ema=``), the same kernels also update the averages of the parameters
        they change; the EMA's other parameters and its buffers follow in one more pass. The result
        equals ``step()`` followed by ``ema.update()``; a step GradScaler skips updates no average.

        With ``max_grad_norm`` set, one fused reduction computes the joint 2-norm of all gradients
        (unscaled when a GradScaler hands its scale) and the kernels multiply each gradient by
        :math:`\min(1, \text{max\_norm}/(\lVert g\rVert + 10^{-6}))` in registers: the same update as
        ``clip_grad_norm_`` before the step, without its pass over the gradients and without a host
        synchronisation. The norm is kept in ``last_grad_norm``.

        Every check runs before the first parameter, state or counter is written: a refused step changes
        nothing.

        Args:
            closure: a callable that re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        if closure is not None or torch.compiler.is_compiling() or self._use_torch_step():
            return self._step_general(closure)
        # Without a closure, grad mode is set directly: torch.no_grad()'s decorator costs ~70 us a step with
        # cold caches (Note [the step's wrapper]).
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._step_planned()
        finally:
            torch._C._set_grad_enabled(enabled)
        return None

    @torch.no_grad()
    def _step_general(self, closure: Callable[[], Any] | None) -> Any:
        """``step`` with a closure, under ``torch.compile``, or with torch's step (``differentiable=True``)."""
        if closure is not None:
            closure = _unscaled_closure(self, closure)
        if self._use_torch_step():
            loss = self._torch_step(closure)
            if self.ema is not None:
                self.ema.update()
            return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._step_traced()
        else:
            self._step_planned()
        return loss

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The gradients' joint 2-norm (unscaled, float32 or float64) of the last step, when ``max_grad_norm``
        is set."""
        return self.__dict__.get("_ft_last_norm")

    @last_grad_norm.setter
    def last_grad_norm(self, value: Tensor | None) -> None:
        self.__dict__["_ft_last_norm"] = value

    def _step_planned(self) -> None:
        grad_scale, found_inf = self._amp()
        ema = self.ema
        groups = self.param_groups
        for _ in range(2):
            plan: _Plan | None = self.__dict__.get("_ft_plan")
            built = plan is None
            if plan is None:
                plan = self.__dict__["_ft_plan"] = self._build_plan()
            if plan.on_cuda and torch.cuda.is_current_stream_capturing():
                self._check_capturable()
            hypers = [_ops.hyper_list(self._rule, self._hyper(g)) for g in groups]
            lrs = self.__dict__.get("_ft_lrs") or [local(g["lr"]) if isinstance(g["lr"], Tensor) else g["lr"]
                                                   for g in groups]
            l1s = [g.get("l1", 0.0) for g in groups]
            clip_coef = None
            max_norm = self.max_grad_norm
            rule_max = self._rule_max_norm()
            if rule_max is not None:
                try:
                    norm = self._sharded_norm(plan, grad_scale)
                except RuntimeError:
                    if built:
                        raise
                    self.__dict__["_ft_plan"] = None  # a gradient changed (e.g. sparse): the rebuild's checks name it
                    continue
                if norm is None:
                    continue  # a gradient vanished: rebuild
                self.last_grad_norm = norm
                clip_coef = self._rule_clip_coef(norm, rule_max)
            if max_norm is not None and plan.sharded:
                norm = self._sharded_norm(plan, grad_scale)
                if norm is None:
                    continue  # a gradient vanished: rebuild
                self.last_grad_norm = norm
                clip_coef, max_norm = clip_coefficient(norm, max_norm), None
            weight, weight_tensor = (0.0, None)
            if ema is not None and plan.fused_ema:
                weight, weight_tensor = ema.weight_args(plan.device)
            sr_seed = draw_sr_seed(plan.device) if plan.stochastic else None
            status, norm, device_found_inf = plan.impl.step(
                [g["params"] for g in groups], self.state, hypers, lrs, l1s, grad_scale, found_inf, max_norm,
                clip_coef, weight, weight_tensor, sr_seed)
            if status == _STALE:
                self.__dict__["_ft_plan"] = None
                continue
            if max_norm is not None:
                self.last_grad_norm = norm
            if status == _SKIPPED:
                return
            if plan.external:
                self._external_step(plan.external, grad_scale, found_inf)
            if plan.fresh:
                self._after_update(plan.fresh)
                self.__dict__["_ft_plan"] = None  # their next update is not a first step
            if ema is not None:
                ema.finish_fused_update(plan.fused_ema, found_inf=found_inf if device_found_inf else None)
            return
        raise RuntimeError("fusedtrain: the step plan went stale right after it was built; please report this")

    def _check_capturable(self) -> None:
        """torch's rule for a step captured in a CUDA graph: step counters on the device (capturable=True),
        or every replay would repeat the counts (and the bias corrections) baked in at capture."""
        if _ops.RULES[self._rule]["counts_steps"] and not self.__dict__.get("_ft_device_steps"):
            if not all(g.get("capturable", False) for g in self.param_groups):
                raise RuntimeError(
                    f"Attempting CUDA graph capture of step() for an instance of fusedtrain.optim.{self._opt_name} "
                    "but param_groups' capturable is False: the step counters would be baked into the graph. "
                    "Pass capturable=True, or use fusedtrain.optim.CapturedStep, which keeps them on the device.")

    def _sharded_norm(self, plan: _Plan, grad_scale: Tensor | None) -> Tensor | None:
        """The joint norm of DTensor gradients, reduced across ranks (Note [norm across shards])."""
        grads = []
        for gi, pos in plan.grads_of:
            g = plan.group_params[gi][pos].grad
            if g is None:
                return None
            grads.append(g)
        norm = local(grads_norm(grads))
        return norm / grad_scale.to(norm.device) if grad_scale is not None else norm

    # ----------------------------------------------------------------------------------- the plan
    def _collect(self) -> _Collected:
        """Every parameter's role (no gradient, fused, external), with every check that can refuse the step:
        all of it before anything is written."""
        out = _Collected()
        name = self._opt_name
        has_external_options = False
        for gi, group in enumerate(self.param_groups):
            roles, fused, external = [], [], []
            for pos, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    roles.append(_ABSENT)
                    continue
                if g.is_sparse or g.layout != torch.strided:
                    if not self._supports_sparse:
                        raise RuntimeError(
                            f"fusedtrain.optim.{name}: {where(gi, pos)} has a sparse gradient, which "
                            f"torch.optim.{name} does not support either; use torch.optim.SparseAdam for parameters "
                            "with sparse gradients (e.g. nn.Embedding(sparse=True))")
                    roles.append(_EXTERNAL)
                    external.append(pos)
                    continue
                if p.device.type == "meta":
                    roles.append(_EXTERNAL)
                    external.append(pos)
                    continue
                check_param(name, p, where(gi, pos))
                roles.append(_FUSED)
                fused.append(pos)
            if external:
                has_external_options = True
                self._check_external(gi, group, external)
                out.external.append((gi, external))
            out.roles.append(roles)
            out.fused.append(fused)
        if has_external_options and self.max_grad_norm is not None:
            raise RuntimeError(
                f"fusedtrain.optim.{name}: max_grad_norm= cannot include sparse gradients or meta parameters (their "
                "update runs torch's implementation); clip them yourself before step() and drop max_grad_norm")
        return out

    def _check_external(self, gi: int, group: dict[str, Any], positions: list[int]) -> None:
        """What torch's implementation, which updates the external parameters (at ``positions`` of param group
        ``gi``), cannot do."""
        name = self._opt_name
        params = [group["params"][i] for i in positions]
        refusal = self._sparse_refusal(group)
        if refusal is not None and any(p.grad is not None and p.grad.is_sparse for p in params):
            raise RuntimeError(refusal)  # torch's own message, raised before anything is written
        if group.get("l1", 0.0):
            raise RuntimeError(f"fusedtrain.optim.{name}: l1= is applied by the fused kernels and cannot reach the "
                               f"sparse-gradient / meta parameters of param_groups[{gi}]; put them in a group with "
                               "l1=0")
        for pos, p in zip(positions, params):
            if p.grad is not None and p.grad.is_sparse and self._quantized(p):
                raise RuntimeError(
                    f"fusedtrain.optim.{name}: {where(gi, pos)} has a sparse gradient, which torch's implementation "
                    f"updates, with float states; this parameter's are {self.state_bits}-bit (state_bits="
                    f"{self.state_bits}, {p.numel()} >= min_8bit_size elements). Pass min_8bit_size > {p.numel()} "
                    "(float states for it) or state_bits=32; nothing was updated")
            if self._kind(p) != "plain":
                raise RuntimeError(f"fusedtrain.optim.{name}: master_weights / stochastic_rounding cannot apply to the "
                                   f"sparse-gradient / meta parameters of param_groups[{gi}] (torch's implementation "
                                   "updates them); keep them in float32")

    def _kind(self, p: Tensor) -> str:
        """The storage scheme of a parameter: "master" (float16/bfloat16 with ``master_weights``),
        "stochastic" (bfloat16 with ``stochastic_rounding``) or "plain"."""
        if self.master_weights and p.dtype in _HALF:
            return "master"
        if self.stochastic_rounding and p.dtype == torch.bfloat16:
            return "stochastic"
        return "plain"

    def _prepare_state(self, group: dict[str, Any], p: Tensor) -> None:
        """Creates what the kernels need of ``p``'s state (its rule's states, a master copy) in the dtypes
        of Note [mixed-precision layouts]."""
        self._init_state(group, p)
        if self._kind(p) == "master":
            self._master(p)
        state = self.state[p]
        if "step" in state:
            self._home_counters(state, self._step_device(group, p))
        if not p.is_complex():
            for key in self._state_keys(group):
                self._convert_state(group, p, key)

    def _home_counters(self, state: dict[str, Any], device: torch.device | None) -> None:
        """The step counter and the rule's tensor scalars where the kernels advance them (Note [step counters]
        in optim_host.h): the CPU, or (capturable) the parameter's device, in float32 there."""
        step = cpu_step(state, device)
        for key in _ops.RULES[self._rule]["aux"]:
            value = state.get(key)
            if isinstance(value, Tensor) and value.device != step.device:
                state[key] = value.to(step.device, torch.float32 if step.device.type != "cpu" else value.dtype)

    def _state_in(self, group: dict[str, Any], p: Tensor, key: str, dtype: torch.dtype) -> Tensor:
        """State ``key`` of ``p`` converted to ``dtype`` (master weights, ``state_dtype``)."""
        return self.state[p][key].to(dtype)

    def _sparse_refusal(self, group: dict[str, Any]) -> str | None:
        """torch's error for a sparse gradient with this group's options (None: torch steps it)."""
        return None

    def _segments(self, collected: _Collected) -> tuple[list[_Segment], list[Tensor], list[Tensor]]:
        """The plan's segments (one rule, group, device, dtype, storage layout and update pass each), the
        parameters whose EMA averages they carry, and the SGD parameters whose first update they are."""
        ema = self.ema
        segments: list[_Segment] = []
        fused_ema: list[Tensor] = []
        fresh_all: list[Tensor] = []
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            fresh = self._fresh_params(group, [params[i] for i in collected.fused[gi]])
            fresh_all += [params[i] for i in collected.fused[gi] if id(params[i]) in fresh]
            # A parameter listed twice is updated twice, one pass after the other, as torch does (with a
            # warning from add_param_group); its average is then left to the EMA's own pass.
            passes: list[list[int]] = []
            seen: dict[int, int] = {}
            for pos in collected.fused[gi]:
                k = seen.get(id(params[pos]), 0)
                seen[id(params[pos])] = k + 1
                if k == len(passes):
                    passes.append([])
                passes[k].append(pos)
            repeated = {i for i, n in seen.items() if n > 1}
            for k, positions in enumerate(passes):
                split: dict[tuple[Any, ...], list[int]] = {}
                for pos in positions:
                    p = params[pos]
                    real = p.real.dtype if p.is_complex() else p.dtype
                    # (torch collects every occurrence's buffer before updating: each occurrence of a new
                    # parameter starts from its gradient, the last one's buffer is kept)
                    first = id(p) in fresh
                    split.setdefault((self._kind(p), p.device, real, first, self._rule_of(p)), []).append(pos)
                for (kind, _device, _dtype, first, rule), idx in split.items():
                    ps = [params[i] for i in idx]
                    averages = None
                    if (ema is not None and kind == "plain" and rule == self._rule
                            and not any(id(p) in repeated for p in ps)
                            and all(self._state_dtype_for(p) == p.dtype for p in ps)):
                        averages = ema.averages_for(ps)
                        if averages is not None and not all(local(a).device == local(p).device
                                                            and a.dtype == p.dtype for a, p in zip(averages, ps)):
                            averages = None
                    if averages is not None:
                        fused_ema += ps
                    segments.append(_Segment(gi, idx, ps, kind, averages, first, rule))
        return segments, fused_ema, fresh_all

    def _seg_overrides(self, seg: _Segment) -> list[tuple[int, float]]:
        return [(_ops.RULES[seg.rule]["hyper"].index("first_step"), 1.0)] if seg.first else []

    def _seg_states(self, seg: _Segment, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The segment's state lists (concatenated, as the kernels see them), step counters and tensor
        scalars (Note [tensor scalars] in csrc/include/fusedtrain/rules.h, concatenated)."""
        states = [self.state[p] for p in seg.params]
        flat = [real_view(local(s[key])) for key in self._rule_state_keys(group, seg.rule) for s in states]
        rule = _ops.RULES[seg.rule]
        steps = [s["step"] for s in states] if rule["counts_steps"] else []
        aux = [s[key] for key in rule["aux"] for s in states]
        return flat, steps, aux

    def _plan_segment(self, seg: _Segment) -> dict[str, Any]:
        """A segment as the C++ plan takes it: it reaches the parameters and averages through their
        objects every step, and holds the optimizer's own tensors (Note [step plan] in csrc/plan.cpp)."""
        group = self.param_groups[seg.group]
        states, steps, aux = self._seg_states(seg, group)
        return {
            "rule": seg.rule, "group": seg.group, "positions": seg.positions,
            "kinds": [(_COMPLEX if p.is_complex() else 0) | (_DTENSOR if is_dtensor(p) else 0) for p in seg.params],
            "averages": list(seg.averages) if seg.averages is not None else [],
            "masters": [local(self.state[p]["master_param"]) for p in seg.params] if seg.kind == "master" else [],
            "states": states, "steps": steps, "aux": aux, "stochastic": seg.kind == "stochastic",
            "overrides": self._seg_overrides(seg),
            "hyper": _ops.hyper_list(seg.rule, self._hyper(group)),
        }

    def _fresh_params(self, group: dict[str, Any], params: list[Tensor]) -> set[int]:
        """ids of the parameters whose next update is their first of a kind the rule treats specially
        (SGD's momentum buffer starts as the gradient); empty for other rules."""
        return set()

    def _after_update(self, fresh: list[Tensor]) -> None:
        """Called after an update that was the first of ``fresh`` (see ``_fresh_params``)."""

    def _build_plan(self) -> _Plan:
        collected = self._collect()
        # Nothing was written until here; now the missing states (torch's keys) are created.
        for gi, group in enumerate(self.param_groups):
            for pos in collected.fused[gi]:
                self._prepare_state(group, group["params"][pos])
        segments, fused_ema, fresh = self._segments(collected)
        group_params = [g["params"] for g in self.param_groups]
        impl = _ops.StepPlan(self._opt_name, group_params, collected.roles,
                             [self._plan_segment(seg) for seg in segments], self.state)
        grads_of = [(gi, pos) for gi, fused in enumerate(collected.fused) for pos in fused]
        sharded = any(is_dtensor(group_params[gi][pos]) for gi, pos in grads_of)
        devices = impl.devices
        device = devices[0] if devices else None
        return _Plan(impl=impl, group_params=group_params, external=collected.external, fused_ema=fused_ema,
                     fresh=fresh, sharded=sharded, grads_of=grads_of, device=device,
                     stochastic=impl.has_stochastic, on_cuda=device is not None and device.type == "cuda")

    def _step_traced(self) -> None:
        """The step as ``step_`` op calls (torch.compile traces these; fake kernels give their effects)."""
        grad_scale, found_inf = self._amp()
        collected = self._collect()
        for gi, group in enumerate(self.param_groups):
            for pos in collected.fused[gi]:
                self._prepare_state(group, group["params"][pos])
        segments, fused_ema, fresh = self._segments(collected)
        clip_coef = None
        rule_max = self._rule_max_norm()
        if segments and (rule_max is not None or self.max_grad_norm is not None):
            norm = self._unscaled_norm(local(grads_norm([p.grad for seg in segments for p in seg.params])), grad_scale)
            if rule_max is not None:
                clip_coef = self._rule_clip_coef(norm, rule_max)
            if self.max_grad_norm is not None:
                clip_coef = clip_coefficient(norm, self.max_grad_norm)
        ema = self.ema
        weight, weight_tensor = 0.0, None
        if ema is not None and fused_ema:
            weight, weight_tensor = ema.weight_args(segments[0].params[0].device, found_inf)
        for seg in segments:
            group = self.param_groups[seg.group]
            hyper = _ops.hyper_list(seg.rule, self._hyper(group))
            for i, v in self._seg_overrides(seg):
                hyper[i] = v
            states, steps, aux = self._seg_states(seg, group)
            targets = [local(self.state[p]["master_param"]) for p in seg.params] if seg.kind == "master" \
                else [real_view(local(p)) for p in seg.params]
            grads = [real_view(local(p.grad)) for p in seg.params]
            lr = group["lr"]
            device = targets[0].device
            kw: dict[str, Any] = {"lr_tensor": local(lr)} if isinstance(lr, Tensor) else {"lr": float(lr)}
            for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf), ("clip_coef", clip_coef)):
                if value is not None:
                    kw[name] = value if value.device.type == "cpu" else value.to(device)
            if seg.kind == "stochastic":
                kw.update(stochastic_rounding=True, sr_seed=draw_sr_seed(device))
            if seg.averages is not None:
                kw.update(ema_params=[real_view(local(a)) for a in seg.averages], ema_weight=weight,
                          ema_weight_tensor=weight_tensor)
            if seg.kind == "master":
                kw["param_copies"] = [local(p) for p in seg.params]
            _ops.step_(seg.rule, hyper, targets, grads, states, steps, l1=float(group.get("l1", 0.0)),
                       aux_states=aux, **kw)
        self._after_update(fresh)
        if collected.external:
            self._external_step(collected.external, grad_scale, found_inf)
        if ema is not None:  # found_inf, when given, is decided by the kernels here (no host read)
            ema.finish_fused_update(fused_ema, found_inf=found_inf)

    def _external_step(self, external: list[tuple[int, list[int]]], grad_scale: Tensor | None,
                       found_inf: Tensor | None) -> None:
        """torch's own implementation on the external parameters (Note [the step]), with GradScaler's
        unscaling done first as GradScaler would have done it."""
        if found_inf is not None and float(found_inf) != 0.0:
            return
        saved = self.param_groups
        groups = []
        for gi, positions in external:
            params = [saved[gi]["params"][i] for i in positions]
            for p in params:
                self._external_state(saved[gi], p)
                if grad_scale is not None and p.grad is not None:
                    p.grad.mul_(1.0 / float(grad_scale))
            group = dict(saved[gi], params=params, foreach=False)
            if "fused" in group:
                group["fused"] = None
            groups.append(group)
        try:
            self.param_groups = groups
            self._torch_step(None)
        finally:
            self.param_groups = saved

    def _external_state(self, group: dict[str, Any], p: Tensor) -> None:
        """State torch's step expects to exist already for a parameter (Adagrad's, made in its constructor)."""

    # --------------------------------------------------------------------------- state dtypes, masters
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
        low = p.dtype in _HALF
        if self.master_weights and low:
            return self.state_dtype if self.state_dtype in (torch.float32, p.dtype) else torch.float32
        if self.state_dtype is not None and p.dtype == torch.float32:
            return self.state_dtype
        return p.dtype

    @property
    def ema(self) -> Any:
        """The :class:`fusedtrain.ensemble.EMA` updated with every step (``None``: no averaging)."""
        return self.__dict__.get("_ft_ema")

    @ema.setter
    def ema(self, value: Any) -> None:
        if value is not None and not all(hasattr(value, a) for a in ("next_weight", "averages_for",
                                                                      "finish_fused_update", "update",
                                                                      "weight_args")):
            raise TypeError(f"ema must be a fusedtrain.ensemble.EMA (or SWA), got {type(value).__name__}")
        self.__dict__["_ft_ema"] = value
        self.__dict__["_ft_plan"] = None
