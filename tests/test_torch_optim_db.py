"""PyTorch's own optimizer database (``torch.testing._internal.common_optimizers.optim_db``) run against
fusedtrain's classes.

Every ``OptimizerInput`` torch ships for a class (its CPU configurations, and the CUDA-only ones, which run
here on the CPU) is combined with each implementation flag torch knows (``foreach``, ``fused``,
``differentiable``: fusedtrain accepts all of them for every class) and stepped side by side with
``torch.optim`` (``foreach=False``, the single-tensor reference) on fresh random gradients; parameters and
every state tensor must agree. Every ``ErrorOptimizerInput`` must raise the error torch raises, with a
message matching torch's regex. The classes with ``supports_sparse`` are stepped with (uncoalesced) sparse
gradients as torch's ``test_rosenbrock_sparse`` does, and every configuration is stepped on ``meta``
parameters (torch makes its state there and steps as a no-op). When torch adds configurations to its
database, these tests check them without a change here.

Tolerances: float64 to ~1e-12 relative, float32 to a few ulps (``rtol=2e-6``) of the reference, with the
absolute part scaled by the tensor's magnitude (see ``_helpers.assert_close_ulps``).
"""

from __future__ import annotations

import copy
import inspect
import re
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
# torch's test internals import `expecttest`, a test dependency (scripts/dev.sh installs it): a missing one
# fails collection, loudly, rather than skipping the module
from torch.testing._internal import common_optimizers

import fusedtrain
from _helpers import assert_same_state, clone_params, make_grads, make_params, set_grads

OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6)}
N_STEPS = 7  # torch's own _compare_between runs 7 iterations


def _class_names() -> list[str]:
    """Every optimizer class fusedtrain exports under a torch.optim name: new classes are picked up here."""
    names = []
    for name in fusedtrain.optim.__all__:
        cls = getattr(fusedtrain.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and hasattr(torch.optim, name):
            names.append(name)
    return names


CLASSES = _class_names()


def _info(name: str) -> Any:
    infos = [i for i in common_optimizers.optim_db if i.optim_cls is getattr(torch.optim, name)]
    assert infos, f"torch's optim_db has no entry for torch.optim.{name}"
    return infos[0]


def test_every_class_is_covered() -> None:
    assert set(CLASSES) >= {"SGD", "Adagrad", "RMSprop", "Adam", "AdamW"}, CLASSES
    for name in CLASSES:
        _info(name)


# ----------------------------------------------------------------------------------------- configurations
IMPLS: dict[str, dict[str, bool]] = {
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "differentiable": {"differentiable": True},
}


def _inputs(name: str, dtype: torch.dtype) -> list[tuple[str, dict[str, Any]]]:
    """(description, kwargs) of torch's CPU configurations, then of its CUDA-only ones (capturable, tensor
    lr/betas with capturable), which fusedtrain also runs on the CPU."""
    info = _info(name)
    cpu = info.optim_inputs_func(device="cpu", dtype=dtype)
    out = [(i.desc, i.kwargs) for i in cpu]
    cpu_descs = {i.desc for i in cpu}
    # optim_inputs_func only builds CPU tensors (torch.tensor(0.001)) for the CUDA configurations
    out += [(f"{i.desc} (cuda config)", i.kwargs) for i in info.optim_inputs_func(device="cuda", dtype=dtype)
            if i.desc not in cpu_descs]
    return out


def _cases() -> list[Any]:
    cases = []
    for name in CLASSES:
        for dtype in (torch.float64, torch.float32):
            for desc, _ in _inputs(name, dtype):
                for impl in IMPLS:
                    cases.append(pytest.param(name, dtype, desc, impl,
                                              id=f"{name}-{str(dtype)[6:]}-{desc}-{impl}"))
    return cases


def _accepted_by_torch(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """kwargs less those torch's class does not take at all (``fused`` for RMSprop: fusedtrain takes it)."""
    sig = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in sig}


def _torch_construction_error(name: str, kwargs: dict[str, Any], params: list[torch.Tensor]) -> Exception | None:
    """The error torch.optim raises when constructed with these kwargs (e.g. a tensor lr with foreach=True
    and capturable=False), else None."""
    cls = getattr(torch.optim, name)
    try:
        cls(params, **_accepted_by_torch(cls, copy.deepcopy(kwargs)))
    except (ValueError, RuntimeError, TypeError) as e:
        return e
    return None


def _reference_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """torch's single-tensor implementation with the same hyperparameters.

    ``capturable`` is dropped: torch asserts that capturable parameters are on an accelerator, while
    fusedtrain runs it on the CPU too, where it only decides where ``step`` lives (the CPU either way), so
    the arithmetic is the non-capturable one. With ``differentiable``, fusedtrain runs torch's own step:
    the reference is that step with the very same arguments (capturable included)."""
    drop = ("fused", "foreach") if kwargs.get("differentiable") else ("fused", "foreach", "capturable")
    ref = {k: v for k, v in copy.deepcopy(kwargs).items() if k not in drop}
    ref["foreach"] = False
    return _accepted_by_torch(getattr(torch.optim, name), ref)


def _params(dtype: torch.dtype, with_complex: bool) -> list[torch.Tensor]:
    ps = make_params("cpu", dtype)
    if with_complex:
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        ps.append(torch.randn(5, 3, dtype=cdtype).requires_grad_())
    return ps


# ---- Adafactor and Muon (issue 15): what torch's implementations of these take and compute differently
_NO_EMPTY = {"Adafactor"}  # torch's step divides by a parameter's size (ZeroDivisionError; test_adafactor.py)
_MATRICES_ONLY = {"Muon"}  # torch.optim.Muon takes 2-D parameters only
_BF16_INTERNALS = {"Muon"}  # Newton-Schulz in bfloat16: parameters agree to bfloat16 rounding (test_muon.py)
_NO_DIFFERENTIABLE = {"Muon", "Adafactor"}  # torch has no differentiable implementation: refused
_BF16_FRACTION = 0.02


def _class_params(name: str, dtype: torch.dtype, with_complex: bool) -> list[torch.Tensor]:
    if name in _MATRICES_ONLY:
        ps = [torch.randn(s, dtype=torch.float64).to(dtype) for s in [(3, 5), (5, 3), (1, 7), (7, 1), (4, 4), (0, 4)]]
        ps.append(torch.randn(9, 6, dtype=torch.float64).to(dtype).t())
        return [p.requires_grad_() for p in ps]
    ps = _params(dtype, with_complex)
    return [p for p in ps if p.numel() > 0] if name in _NO_EMPTY else ps


def _assert_close_to_bf16_rounding(a: torch.optim.Optimizer, pa: list[torch.Tensor], b: torch.optim.Optimizer,
                                   pb: list[torch.Tensor], start: list[torch.Tensor], tol: dict[str, float]) -> None:
    """Muon: the states (momentum buffers: torch's arithmetic) to tol; the parameters, which went through
    bfloat16 Newton-Schulz, to a small fraction of how far they moved."""
    moved = max(float((y.detach() - s.detach()).abs().max()) for y, s in zip(pb, start) if y.numel())
    for x, y in zip(pa, pb):
        assert set(a.state[x]) == set(b.state[y]), (set(a.state[x]), set(b.state[y]))
        for key in a.state[x]:
            torch.testing.assert_close(a.state[x][key], b.state[y][key], **tol)
        if x.numel():
            assert float((x.detach() - y.detach()).abs().max()) <= _BF16_FRACTION * moved


def _hyper_tensors_as(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """kwargs with their tensor hyperparameters (lr, betas) cast to ``dtype``."""
    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(dtype)
        if isinstance(v, tuple):
            return tuple(cast(x) for x in v)
        return v
    return {k: cast(v) for k, v in kwargs.items()}


def _has_float32_tensor(kwargs: dict[str, Any]) -> bool:
    return any(isinstance(x, torch.Tensor) and x.dtype == torch.float32
               for v in kwargs.values() for x in (v if isinstance(v, tuple) else (v,)))


def _step_side_by_side(name: str, kwargs: dict[str, Any], dtype: torch.dtype, impl: str,
                       tol: dict[str, float]) -> None:
    # torch's fused kernels take no complex parameters (its test_complex skips fused too), and torch's
    # differentiable step of complex parameters breaks autograd (its tests skip differentiable there)
    with_complex = impl not in ("fused", "differentiable") and _info(name).supports_complex
    pa = _class_params(name, dtype, with_complex)
    start = clone_params(pa)
    if impl == "differentiable" and name in _NO_DIFFERENTIABLE:
        with pytest.raises(ValueError, match="differentiable=True is not supported"):
            getattr(fusedtrain.optim, name)(pa, **kwargs)
        return

    error = _torch_construction_error(name, kwargs, clone_params(pa))
    if error is not None:
        # fusedtrain claims torch's validation: the same error type and message
        with pytest.raises(type(error), match=re.escape(str(error))):
            getattr(fusedtrain.optim, name)(pa, **kwargs)
        return

    pb = clone_params(pa)
    if impl == "differentiable":
        # torch's differentiable step updates the parameters out of place on the autograd graph: the
        # parameters are non-leaf tensors computed from leaves (as in torch's TestDifferentiableOptimizer)
        leaves_a, leaves_b = pa, pb
        pa = [p.clone() for p in leaves_a]
        pb = [p.clone() for p in leaves_b]
    a = getattr(fusedtrain.optim, name)(pa, **kwargs)
    b = getattr(torch.optim, name)(pb, **_reference_kwargs(name, kwargs))
    for _ in range(N_STEPS):
        grads = make_grads(pa)
        set_grads(pa, grads)
        set_grads(pb, grads)
        try:
            b.step()
        except (RuntimeError, AssertionError, ValueError, TypeError) as e:
            # torch's step refuses this configuration here (capturable differentiable on the CPU)
            with pytest.raises(type(e), match=re.escape(str(e))):
                a.step()
            return
        a.step()
    if name in _BF16_INTERNALS:
        _assert_close_to_bf16_rounding(a, pa, b, pb, start, tol)
    else:
        assert_same_state(a, pa, b, pb, **tol)
    if impl == "differentiable":
        # the update stays on the autograd graph: the leaves' gradients agree. (Through several steps,
        # torch's own differentiable step cannot always backpropagate, e.g. amsgrad's or a centered
        # RMSprop's states are updated in place: then fusedtrain raises the same error.)
        weights = [torch.randn(p.shape, dtype=p.dtype) for p in pa]
        try:
            sum((p * w).abs().sum() for p, w in zip(pb, weights)).backward()
        except RuntimeError as e:
            with pytest.raises(RuntimeError, match=re.escape(str(e)[:60])):
                sum((p * w).abs().sum() for p, w in zip(pa, weights)).backward()
            return
        sum((p * w).abs().sum() for p, w in zip(pa, weights)).backward()
        for la, lb in zip(leaves_a, leaves_b):
            assert la.grad is not None and lb.grad is not None
            torch.testing.assert_close(la.grad, lb.grad, **tol)


@pytest.mark.parametrize("name,dtype,desc,impl", _cases())
def test_optim_inputs_match_torch(name: str, dtype: torch.dtype, desc: str, impl: str) -> None:
    base = dict(_inputs(name, dtype))[desc]
    kwargs = {**copy.deepcopy(base), **IMPLS[impl]}
    if dtype == torch.float64 and _has_float32_tensor(kwargs):
        # The database's tensor lr / betas are float32. torch's reference then computes the step size
        # (lr / bias_correction1) and the bias corrections as float32 tensors, i.e. rounded to float32
        # (~6e-8 relative) before they scale a float64 update: as given, the reference is only as exact as
        # float32, and so is the comparison. The same configuration with float64 tensors is exact.
        _step_side_by_side(name, kwargs, dtype, impl, TOL[torch.float32])
        kwargs = _hyper_tensors_as(kwargs, torch.float64)
    _step_side_by_side(name, kwargs, dtype, impl, TOL[dtype])


# ------------------------------------------------------------------------------------------- error inputs
def _error_cases() -> list[Any]:
    cases = []
    for name in CLASSES:
        info = _info(name)
        if info.optim_error_inputs_func is None:
            continue
        for dtype in (torch.float32, torch.float64):
            for i, e in enumerate(info.optim_error_inputs_func(device="cpu", dtype=dtype)):
                desc = e.optimizer_error_input.desc
                cases.append(pytest.param(name, dtype, i, id=f"{name}-{str(dtype)[6:]}-{i}-{desc}"))
    return cases


def _expect_error(error_input: Any, fn: Any) -> None:
    """torch's test_errors: a Warning type is checked with warns, an exception type with raises."""
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            fn()
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            fn()


def _run_error_input(cls: type, error_input: Any, params: Any) -> None:
    kwargs = copy.deepcopy(error_input.optimizer_error_input.kwargs)
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        _expect_error(error_input, lambda: cls(params, **kwargs))
    elif error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
        opt = cls(params, **kwargs)
        _expect_error(error_input, opt.step)
    else:
        raise NotImplementedError(f"unknown error_on {error_input.error_on}")


@pytest.mark.parametrize("name,dtype,index", _error_cases())
def test_error_inputs_match_torch(name: str, dtype: torch.dtype, index: int) -> None:
    # fresh inputs: an entry's tensors are shared between its error inputs
    error_input = _info(name).optim_error_inputs_func(device="cpu", dtype=dtype)[index]
    params = error_input.optimizer_error_input.params
    # exactly as torch's test_errors passes them (params=None: the error comes before params are read) ...
    _run_error_input(getattr(fusedtrain.optim, name), error_input, params)
    if params is None:
        # ... and with real parameters, after checking that torch raises the same with them
        real = [torch.nn.Parameter(torch.randn(2, 3, dtype=dtype))]
        _run_error_input(getattr(torch.optim, name), error_input, real)
        _run_error_input(getattr(fusedtrain.optim, name), error_input, real)


@pytest.mark.parametrize("name", CLASSES)
def test_global_cliquey_flag_errors(name: str) -> None:
    """The errors torch's database lists for CUDA (fused with foreach / differentiable), on the CPU: every
    fusedtrain class takes ``fused=`` and ``foreach=`` and refuses these combinations as torch does."""
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        getattr(fusedtrain.optim, name)(p, foreach=True, fused=True)
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        getattr(fusedtrain.optim, name)(p, fused=True, differentiable=True)


# --------------------------------------------------------------------------------------- sparse gradients
def _rosenbrock(t: torch.Tensor) -> torch.Tensor:
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _drosenbrock(t: torch.Tensor) -> torch.Tensor:
    x, y = t
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))


def _sparse_grad(param: torch.Tensor, w: int) -> torch.Tensor:
    """torch's test_rosenbrock_sparse gradient: only the x (or y) component, as an uncoalesced sparse tensor
    whose two entries at the same index sum to it."""
    grad = _drosenbrock(param.detach())
    if w:
        i, v = torch.tensor([[0, 0]]), torch.stack([grad[0] / 4.0, grad[0] - grad[0] / 4.0])
    else:
        i, v = torch.tensor([[1, 1]]), torch.stack([grad[1] - grad[1] / 4.0, grad[1] / 4.0])
    return torch.sparse_coo_tensor(i, v, (2,), dtype=param.dtype)


def _sparse_cases() -> list[Any]:
    """torch's test_rosenbrock_sparse configurations: its optim inputs (foreach on and off; no fused, no
    differentiable) with the keys of ``metadata_for_sparse`` removed, deduplicated, lr set from it."""
    cases = []
    for name in CLASSES:
        info = _info(name)
        if not info.supports_sparse:
            continue
        kwarg_updates, schedulers = info.metadata_for_sparse
        seen: list[dict[str, Any]] = []
        for desc, kw in _inputs(name, torch.float64):
            if "(cuda config)" in desc:
                continue
            for foreach in (False, True):
                kwargs = {k: v for k, v in copy.deepcopy(kw).items() if k not in kwarg_updates}
                kwargs["foreach"] = foreach
                if kwargs in seen:
                    continue
                seen.append(dict(kwargs))
                if "lr" in kwarg_updates:
                    kwargs["lr"] = kwarg_updates["lr"]
                for with_lrsched in ([False, True] if schedulers else [False]):
                    cases.append(pytest.param(name, kwargs, with_lrsched,
                                              id=f"{name}-{desc}-foreach={foreach}-lrsched={with_lrsched}"))
    return cases


@pytest.mark.parametrize("name,kwargs,with_lrsched", _sparse_cases())
def test_sparse_gradients_match_torch(name: str, kwargs: dict[str, Any], with_lrsched: bool) -> None:
    """Cyclic coordinate descent on the Rosenbrock function with uncoalesced sparse gradients: fusedtrain and
    torch.optim (both given the same sparse gradients) stay together, parameters and state."""
    schedulers = _info(name).metadata_for_sparse[1] if with_lrsched else []
    runs = []
    for cls, kw in ((getattr(fusedtrain.optim, name), kwargs), (getattr(torch.optim, name), kwargs)):
        params = [torch.nn.Parameter(torch.tensor([1.5, 1.5], dtype=torch.float64))]
        opt = cls(params, **copy.deepcopy(kw))
        runs.append((params, opt, [s(opt) for s in schedulers]))
    for i in range(60):
        for params, opt, scheds in runs:
            def closure(params: list[torch.Tensor] = params, opt: torch.optim.Optimizer = opt) -> torch.Tensor:
                opt.zero_grad()
                loss = _rosenbrock(params[0])
                params[0].grad = _sparse_grad(params[0], i % 2)
                return loss.detach()

            opt.step(closure)
            for s in scheds:
                if isinstance(s, ReduceLROnPlateau):
                    s.step(_rosenbrock(params[0].detach()))
                else:
                    s.step()
        (pa, a, _), (pb, b, _) = runs
        assert_same_state(a, pa, b, pb, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- meta device
def _meta_cases() -> list[Any]:
    return [pytest.param(name, desc, id=f"{name}-{desc}") for name in CLASSES
            for desc, _ in _inputs(name, torch.float32)]


@pytest.mark.parametrize("name,desc", _meta_cases())
def test_meta_parameters_step_like_torch(name: str, desc: str) -> None:
    """Model-building flows create optimizers on ``meta`` parameters: torch steps them (a no-op on the
    values) and creates its state there; fusedtrain must do the same, not crash. Where torch's step refuses
    a configuration on meta (capturable: "params and state_steps must be on supported devices"), fusedtrain
    raises the same error."""
    base = dict(_inputs(name, torch.float32))[desc]
    shapes = [(3, 4), (0, 4)] if name in _MATRICES_ONLY else [(3, 4), (7,), (), (0,)]
    runs = []
    for is_torch in (True, False):
        cls = getattr(torch.optim if is_torch else fusedtrain.optim, name)
        params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
        kwargs = {**copy.deepcopy(base), "foreach": False}
        opt = cls(params, **(_accepted_by_torch(cls, kwargs) if is_torch else kwargs))  # (Muon takes no foreach)
        for _ in range(2):
            for p in params:
                p.grad = torch.empty(p.shape, device="meta")
            if is_torch:
                try:
                    opt.step()
                except (RuntimeError, AssertionError, ValueError) as e:
                    torch_error: Exception | None = e
                    break
                torch_error = None
            elif torch_error is not None:
                with pytest.raises(type(torch_error), match=re.escape(str(torch_error))):
                    opt.step()
                return
            else:
                opt.step()
        runs.append((params, opt))
    (pb, b), (pa, a) = runs
    for x, y in zip(pa, pb):
        assert x.device.type == "meta" and x.shape == y.shape
        sx, sy = a.state[x], b.state[y]
        assert set(sx) == set(sy), (set(sx), set(sy))
        for key in sx:
            vx, vy = sx[key], sy[key]
            assert (vx.device, vx.dtype, vx.shape) == (vy.device, vy.dtype, vy.shape), key
            if key == "step":
                assert float(vx) == float(vy) == 2.0
