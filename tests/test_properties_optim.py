"""Property-based tests (hypothesis) of fusedtrain's optimizers and gradient-norm clipping against torch.

Random shapes (empty, 0-dim, 1, primes, more than 65536 elements), layouts (transposed, sliced with a step,
channels_last), dtypes, every torch option of each class and fusedtrain's own (max_grad_norm, l1,
master_weights, state_dtype, stochastic_rounding), non-finite gradients; each example is compared with
torch.optim (foreach=False) or with a reference built from torch ops. Every refused call is checked to
mutate nothing.

Examples are derandomized (the same examples on every run and machine, no example database), 25 per test
by default; ``FUSEDTRAIN_SLOW=1`` runs 300. Needs ``hypothesis`` (a test dependency).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
# hypothesis is a test dependency (scripts/dev.sh installs it): a missing one fails collection, loudly
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedtrain
from _helpers import assert_same_values, snapshot

SLOW = os.environ.get("FUSEDTRAIN_SLOW", "") not in ("", "0")
PROPERTY = settings(max_examples=300 if SLOW else 25, derandomize=True, database=None, deadline=None,
                    print_blob=False, suppress_health_check=list(HealthCheck))

OPTIMIZERS = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]
OPTIMIZERS += ["RAdam", "Adamax", "Adadelta", "ASGD", "Rprop"]  # torch.optim's others (issue 15)
LOW = (torch.float16, torch.bfloat16)
F32_TOL = dict(rtol=2e-6, atol=2e-6)
# With max_grad_norm the clip coefficient comes from a norm accumulated in float64 (fusedtrain) or float32
# (torch): the coefficients differ by ~1e-7 relative, and so do the updates.
F32_CLIP_TOL = dict(rtol=2e-5, atol=2e-6)
F64_TOL = dict(rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- tensors
# (shape, layouts it may take). Shapes: 0-dim, empty, one element, primes, > 65536 elements, 4-D.
_SHAPES = [(), (0,), (3, 0), (1,), (2,), (7,), (13,), (5, 3), (13, 7), (3, 5, 7), (2, 3, 5, 7), (1, 4, 1, 3),
           (4, 2, 3, 3)]
_LARGE = [(65537,), (257, 263)]


@st.composite
def tensor_specs(draw: Any, large_ok: bool = True) -> tuple[tuple[int, ...], str]:
    """A shape and a layout valid for it: contiguous, transposed (last two dims), sliced with a step on
    dim 0 (not dense), channels_last (4-D)."""
    pool = _SHAPES + (_LARGE if large_ok else [])
    shape = draw(st.one_of(st.sampled_from(pool), st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)))
    layouts = ["contiguous"]
    if len(shape) >= 2:
        layouts.append("transposed")
    if len(shape) >= 1:
        layouts.append("sliced")
    if len(shape) == 4:
        layouts.append("channels_last")
    return shape, draw(st.sampled_from(layouts))


def make_tensor(shape: tuple[int, ...], layout: str, dtype: torch.dtype, gen: torch.Generator,
                scale: float = 1.0) -> torch.Tensor:
    """Random normal values (drawn in float64, rounded to dtype) laid out as asked."""
    def randn(s: tuple[int, ...]) -> torch.Tensor:
        return (torch.randn(s, dtype=torch.float64, generator=gen) * scale).to(dtype)

    if layout == "transposed":
        return randn(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "sliced":
        return randn((2 * shape[0],) + shape[1:])[::2]
    if layout == "channels_last":
        return randn(shape).contiguous(memory_format=torch.channels_last)
    return randn(shape)


def like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of t (in dtype) with t's strides where t is dense, else contiguous."""
    out = torch.empty_like(t, dtype=dtype or t.dtype, memory_format=torch.preserve_format)
    return out.copy_(t)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


# ------------------------------------------------------------------------------------------- options
_LRS = [2.0**-3, 2.0**-5, 2.0**-7, 2.0**-10]  # exactly representable: a float32 tensor lr holds the same value


@st.composite
def torch_options(draw: Any, name: str) -> dict[str, Any]:
    """Every torch.optim option of the class, in valid combinations."""
    maximize = draw(st.booleans())
    wd = draw(st.sampled_from([0.0, 0.01, 0.1]))
    lr = draw(st.sampled_from(_LRS))
    if name == "SGD":
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
        dampening = draw(st.sampled_from([0.0, 0.3])) if momentum else 0.0
        nesterov = bool(momentum) and dampening == 0.0 and draw(st.booleans())
        return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov,
                    maximize=maximize)
    if name == "Adagrad":
        return dict(lr=lr, lr_decay=draw(st.sampled_from([0.0, 0.05])), weight_decay=wd,
                    initial_accumulator_value=draw(st.sampled_from([0.0, 0.1])),
                    eps=draw(st.sampled_from([1e-10, 1e-6])), maximize=maximize)
    if name == "RMSprop":
        return dict(lr=lr, alpha=draw(st.sampled_from([0.99, 0.9])), eps=draw(st.sampled_from([1e-8, 1e-4])),
                    weight_decay=wd, momentum=draw(st.sampled_from([0.0, 0.5])), centered=draw(st.booleans()),
                    maximize=maximize, capturable=draw(st.booleans()))
    # torch.optim's other element-wise optimizers (issue 15)
    if name in ("RAdam", "Adamax"):
        kw = dict(lr=lr, betas=draw(st.sampled_from([(0.9, 0.999), (0.8, 0.99)])),
                  eps=draw(st.sampled_from([1e-8, 1e-3])), weight_decay=wd, maximize=maximize,
                  capturable=draw(st.booleans()))
        if name == "RAdam":
            kw["decoupled_weight_decay"] = draw(st.booleans())
        return kw
    if name == "Adadelta":
        return dict(lr=lr * 64, rho=draw(st.sampled_from([0.9, 0.5])), eps=draw(st.sampled_from([1e-6, 1e-3])),
                    weight_decay=wd, maximize=maximize, capturable=draw(st.booleans()))
    if name == "ASGD":
        return dict(lr=lr, lambd=draw(st.sampled_from([1e-4, 0.05])), alpha=draw(st.sampled_from([0.75, 0.5])),
                    t0=draw(st.sampled_from([0.0, 2.0, 1e6])), weight_decay=wd, maximize=maximize,
                    capturable=draw(st.booleans()))
    if name == "Rprop":
        return dict(lr=lr, etas=draw(st.sampled_from([(0.5, 1.2), (0.25, 2.0)])),
                    step_sizes=draw(st.sampled_from([(1e-6, 50.0), (2.0**-9, 2.0**-4)])), maximize=maximize,
                    capturable=draw(st.booleans()))
    kw = dict(lr=lr, betas=draw(st.sampled_from([(0.9, 0.999), (0.8, 0.99)])),
              eps=draw(st.sampled_from([1e-8, 1e-6])), weight_decay=wd, amsgrad=draw(st.booleans()),
              maximize=maximize, capturable=draw(st.booleans()))
    if name == "Adam":
        kw["decoupled_weight_decay"] = draw(st.booleans())
    return kw


def with_tensor_lr(kw: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """lr as a one-element tensor (float64 for float64 parameters: torch computes lr / bias_correction in
    the tensor's dtype, so a float32 tensor would round the reference's step size to float32)."""
    return dict(kw, lr=torch.tensor(kw["lr"], dtype=torch.float64 if dtype == torch.float64 else torch.float32))


def reference_kwargs(kw: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, Any]:
    """torch's single-tensor reference: capturable only moves ``step`` (torch refuses it on the CPU), and a
    tensor lr is cast to the reference's dtype when that is float64."""
    out = {k: v for k, v in kw.items() if k != "capturable"}
    if dtype == torch.float64 and isinstance(out["lr"], torch.Tensor):
        out["lr"] = out["lr"].to(torch.float64)
    out["foreach"] = False
    return out


# --------------------------------------------------------------------------------------------- helpers
def seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)  # fusedtrain draws stochastic-rounding seeds from torch's generator
    return torch.Generator().manual_seed(seed)


def reference_grad(q: torch.Tensor, g: torch.Tensor, l1: float, maximize: bool) -> torch.Tensor:
    """The gradient torch.optim must see to reproduce ``l1=``: l1*sign(p) added after maximize's sign
    flip, i.e. subtracted before it when maximizing."""
    g = g.to(q.dtype).clone()
    if l1:
        g += (-l1 if maximize else l1) * torch.sign(q.detach())
    return g


def torch_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor], l1: float,
               maximize: bool, max_grad_norm: float | None, factor: float = 1.0) -> None:
    """clip_grad_norm_ of the raw gradients, then the L1 term, then torch's step (fusedtrain's order);
    ``factor`` scales the clipped gradients (see :class:`Reference`)."""
    for q, g in zip(params, grads):
        q.grad = g.to(q.dtype).clone()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=False)
    for q in params:
        assert q.grad is not None
        if factor != 1.0:
            q.grad.mul_(factor)
        q.grad = reference_grad(q, q.grad, l1, maximize)
    opt.step()


# Note [conditioning slack]: two correct float implementations of an update differ by a few roundings of
# the effective gradient g + wd*p (+ l1*sign(p)) (operation order, FMA or not, a clip coefficient from a
# norm accumulated in float32 or float64). Where that sum cancels to near zero (bfloat16/float16 values
# even cancel exactly: -0.234375 + 0.1*2.34375), the adaptive updates g/(sqrt(v) + eps) with eps = 1e-8
# turn a difference of 1e-9 in g into one of O(lr) in the parameter: both results are right, and no ulp
# tolerance can hold. The reference is therefore run three times, on the (clipped) gradients as given and
# scaled by 1 +- 2^-20 (10x the roundings above), and each element may differ from the reference by twice
# as much as the reference itself moves under that perturbation. Well-conditioned elements move by
# ~2^-20 of their update and keep a few-ulps tolerance.
PERTURBATION = 2.0**-20


class Reference:
    """torch.optim.<name>(foreach=False) on copies of the parameters (in ``dtype``), three times: nominal
    and with the gradients perturbed (Note [conditioning slack])."""

    def __init__(self, name: str, params: list[torch.Tensor], kw: dict[str, Any], case: dict[str, Any],
                 dtype: torch.dtype | None = None, perturbed: bool = True) -> None:
        self.case = case
        self.runs = []
        for factor in (1.0, 1.0 + PERTURBATION, 1.0 - PERTURBATION) if perturbed else (1.0,):
            ps = [leaf(like(p, dtype)) for p in params]
            self.runs.append((factor, ps, getattr(torch.optim, name)(ps, **reference_kwargs(kw, dtype))))

    @property
    def params(self) -> list[torch.Tensor]:
        return self.runs[0][1]

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.runs[0][2]

    def step(self, grads: list[torch.Tensor]) -> None:
        for factor, ps, opt in self.runs:
            torch_step(opt, ps, grads, self.case["l1"], self.case["kw"]["maximize"], self.case["max_grad_norm"],
                       factor)

    def round_states(self, dtype: torch.dtype) -> None:
        """Every floating state rounded to dtype (what storing it in dtype does)."""
        with torch.no_grad():
            for _, ps, opt in self.runs:
                for q in ps:
                    for key, value in opt.state[q].items():
                        if key != "step" and value.is_floating_point():
                            value.copy_(value.to(dtype))

    def values(self, i: int, key: str | None = None) -> list[torch.Tensor]:
        """Parameter i (or its state ``key``) in the three runs, nominal first."""
        return [(ps[i] if key is None else opt.state[ps[i]][key]).detach() for _, ps, opt in self.runs]

    def slack(self, i: int, key: str | None = None) -> torch.Tensor:
        nominal, *perturbed = (v.double() for v in self.values(i, key))
        moved = torch.stack([(v - nominal).abs() for v in [nominal, *perturbed]]).amax(0)
        return moved.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def close(x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float, slack: torch.Tensor | None = None) -> None:
    """|x - y| <= atol * max(1, max|y|) + rtol * |y| (+ 2 * slack, Note [conditioning slack]) elementwise,
    NaN equal to NaN and inf to inf."""
    x, y = x.detach(), y.detach()
    assert x.shape == y.shape, (x.shape, y.shape)
    xd, yd = x.double(), y.to(x.dtype).double()
    finite = yd[torch.isfinite(yd)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    bound = atol * scale + rtol * yd.abs()
    if slack is not None:
        bound = bound + 2 * slack
    ok = (xd == yd) | (xd.isnan() & yd.isnan()) | ((xd - yd).abs() <= bound)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        at = tuple(bad)
        raise AssertionError(f"{int((~ok).sum())} of {ok.numel()} elements differ; first at {bad}: "
                             f"got {float(xd[at])!r}, want {float(yd[at])!r}, allowed {float(bound[at])!r}")


def assert_matches(a: torch.optim.Optimizer, pa: list[torch.Tensor], ref: Reference, skip: tuple[str, ...] = (),
                   **tol: float) -> None:
    """Parameters and every state entry of ``a`` against the reference (same keys; steps equal)."""
    for i, x in enumerate(pa):
        y = ref.params[i]
        close(x, y, slack=ref.slack(i), **tol)
        sx, sy = a.state.get(x, {}), ref.opt.state.get(y, {})
        assert set(sx) - set(skip) == set(sy), (set(sx), set(sy))
        for key in sy:
            if key == "step":
                assert float(sx[key]) == float(sy[key])
            else:
                close(sx[key], sy[key], slack=ref.slack(i, key), **tol)


def l2_error(params: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    err = sum(float((p.detach().double() - r.detach().double()).pow(2).sum()) for p, r in zip(params, ref))
    return math.sqrt(err)


# ------------------------------------------------------------------------------ optimizer parity, dense
@st.composite
def optimizer_cases(draw: Any, dtypes: tuple[torch.dtype, ...]) -> dict[str, Any]:
    name = draw(st.sampled_from(OPTIMIZERS))
    dtype = draw(st.sampled_from(dtypes))
    kw = draw(torch_options(name))
    if draw(st.booleans()):
        kw = with_tensor_lr(kw, dtype)
    n_large = 0
    specs = []
    for _ in range(draw(st.integers(1, 4))):
        spec = draw(tensor_specs(large_ok=n_large == 0))
        n_large += math.prod(spec[0]) > 65536
        specs.append(spec)
    return dict(name=name, dtype=dtype, kw=kw, specs=specs, seed=draw(st.integers(0, 2**31 - 1)),
                max_grad_norm=draw(st.sampled_from([None, 0.5, 10.0])), l1=draw(st.sampled_from([0.0, 0.01])),
                steps=draw(st.integers(1, 4)), grad_layout=draw(st.sampled_from(["contiguous", "like_param"])))


def _as_layout(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """g with p's strides where p is dense (transposed, channels_last), else contiguous."""
    return torch.empty_like(p, dtype=g.dtype, memory_format=torch.preserve_format).copy_(g)


def _ours(case: dict[str, Any], params: list[torch.Tensor], **extra: Any) -> torch.optim.Optimizer:
    return getattr(fusedtrain.optim, case["name"])(params, **case["kw"], max_grad_norm=case["max_grad_norm"],
                                                   l1=case["l1"], **extra)


def _grads(params: list[torch.Tensor], gen: torch.Generator, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.randn(p.shape, dtype=torch.float64, generator=gen).to(dtype) for p in params]


@PROPERTY
@given(optimizer_cases(dtypes=(torch.float64, torch.float32)))
def test_dense_float_matches_torch(case: dict[str, Any]) -> None:
    """float64 to 1e-12, float32 to a few ulps: any shape/layout, every option, max_grad_norm, l1, tensor lr."""
    dtype = case["dtype"]
    gen = seeded(case["seed"])
    pa = [leaf(make_tensor(s, lay, dtype, gen)) for s, lay in case["specs"]]
    ref = Reference(case["name"], pa, case["kw"], case, dtype)
    a = _ours(case, pa)
    for _ in range(case["steps"]):
        grads = _grads(pa, gen, dtype)
        if case["grad_layout"] == "like_param":  # transposed / channels_last gradients for such parameters
            grads = [_as_layout(g, p) for g, p in zip(grads, pa)]
        for p, g in zip(pa, grads):
            p.grad = g.clone()
        a.step()
        ref.step(grads)
        for p, g in zip(pa, grads):
            assert torch.equal(p.grad, g)  # the step does not rewrite the gradients (clipping is in registers)
    tol = F64_TOL if dtype == torch.float64 else (F32_CLIP_TOL if case["max_grad_norm"] else F32_TOL)
    assert_matches(a, pa, ref, **tol)


@PROPERTY
@given(optimizer_cases(dtypes=LOW))
def test_half_precision_error_within_torch(case: dict[str, Any]) -> None:
    """float16/bfloat16 without master weights: the error against a float64 run fed the same (rounded)
    gradients is at most twice torch's own error in that dtype, plus one rounding of the parameters per
    step (steps * eps * |params|: what an exact float32 computation rounded once per step may lose where
    torch's error happens to be ~0).

    Where torch's own run is not finite (it rounds every intermediate to the half dtype: eps = 1e-8 or a
    small variance underflows), the bound comes from the float32 computation whose parameters and states
    are stored rounded to the half dtype after every step (what updating half-precision parameters and
    states means). If even that one is not finite (float16 states underflow: a centered RMSprop's
    v - mean^2 turns negative), no reference exists and nothing is claimed for that example."""
    name, dtype, kw = case["name"], case["dtype"], case["kw"]
    gen = seeded(case["seed"])
    pa = [leaf(make_tensor(s, lay, dtype, gen)) for s, lay in case["specs"]]
    pb = [leaf(like(p)) for p in pa]
    b = getattr(torch.optim, name)(pb, **reference_kwargs(kw))
    exact = Reference(name, pa, kw, case, torch.float64, perturbed=False)
    stored = Reference(name, pa, kw, case, torch.float32, perturbed=False)
    a = _ours(case, pa)
    for _ in range(case["steps"]):
        grads = _grads(pa, gen, dtype)
        for p, g in zip(pa, grads):
            p.grad = g.clone()
        a.step()
        torch_step(b, pb, grads, case["l1"], kw["maximize"], case["max_grad_norm"])
        exact.step(grads)
        stored.step(grads)
        with torch.no_grad():
            for q in stored.params:
                q.copy_(q.to(dtype))
        stored.round_states(dtype)
    scale = math.sqrt(sum(float(r.detach().pow(2).sum()) for r in exact.params))
    floor = case["steps"] * torch.finfo(dtype).eps * max(scale, 1e-30)
    ours, theirs = l2_error(pa, exact.params), l2_error(pb, exact.params)
    if not math.isfinite(theirs):
        theirs = l2_error(stored.params, exact.params)
        if not math.isfinite(theirs):
            return
    assert math.isfinite(ours), "fusedtrain's half-precision step produced non-finite parameters"
    assert ours <= 2 * theirs + floor, (ours, theirs, floor)


@PROPERTY
@given(optimizer_cases(dtypes=LOW))
def test_master_weights_follow_float32_torch(case: dict[str, Any]) -> None:
    """master_weights=True: the master (state ``master_param``) takes torch's float32 trajectory fed the
    same low-precision gradients, the parameter is the master rounded to nearest, the states are float32."""
    dtype = case["dtype"]
    gen = seeded(case["seed"])
    pa = [leaf(make_tensor(s, lay, dtype, gen)) for s, lay in case["specs"]]
    ref = Reference(case["name"], pa, case["kw"], case, torch.float32)
    a = _ours(case, pa, master_weights=True)
    for _ in range(case["steps"]):
        grads = _grads(pa, gen, dtype)
        for p, g in zip(pa, grads):
            p.grad = g.clone()
        a.step()
        ref.step(grads)
    tol = F32_CLIP_TOL if case["max_grad_norm"] else F32_TOL
    for i, p in enumerate(pa):
        master = a.state[p]["master_param"]
        assert master.dtype == torch.float32 and p.dtype == dtype
        close(master, ref.params[i], slack=ref.slack(i), **tol)
        assert torch.equal(p.detach(), master.to(dtype))
        assert set(a.state[p]) == set(ref.opt.state[ref.params[i]]) | {"master_param"}
        for key, value in ref.opt.state[ref.params[i]].items():
            if key == "step":
                assert float(a.state[p][key]) == float(value)
            else:
                assert a.state[p][key].dtype == torch.float32, key
                close(a.state[p][key], value, slack=ref.slack(i, key), **tol)


@PROPERTY
@given(optimizer_cases(dtypes=(torch.float32,)))
def test_bfloat16_states_follow_rounded_torch(case: dict[str, Any]) -> None:
    """state_dtype=bfloat16 for float32 parameters: the reference is torch's float32 step whose states are
    rounded to bfloat16 after each step (the kernel loads bfloat16 states, computes in float32, stores
    them rounded to nearest). Where the reference and the kernel differ by a float32 ulp next to a bfloat16
    rounding boundary a stored state may differ by one bfloat16 ulp (2^-8 relative) and the following
    updates of that element by as much: the tolerance is 2^-7 of the states, and of each element's summed
    update magnitudes for the parameters (plus Note [conditioning slack])."""
    gen = seeded(case["seed"])
    pa = [leaf(make_tensor(s, lay, torch.float32, gen)) for s, lay in case["specs"]]
    ref = Reference(case["name"], pa, case["kw"], case, torch.float32)
    a = _ours(case, pa, state_dtype=torch.bfloat16)
    moved = [torch.zeros(p.shape, dtype=torch.float64) for p in pa]
    for _ in range(case["steps"]):
        grads = _grads(pa, gen, torch.float32)
        for p, g in zip(pa, grads):
            p.grad = g.clone()
        a.step()
        before = [q.detach().double().clone() for q in ref.params]
        ref.step(grads)
        for m, q, q0 in zip(moved, ref.params, before):
            m += (q.detach().double() - q0).abs()
        ref.round_states(torch.bfloat16)
    for i, (p, m) in enumerate(zip(pa, moved)):
        q = ref.params[i]
        close(p, q, rtol=4 * torch.finfo(torch.float32).eps, atol=0.0, slack=ref.slack(i) + 2.0**-8 * m)
        for key, value in ref.opt.state[q].items():
            if key == "step":
                assert float(a.state[p][key]) == float(value)
                continue
            mine = a.state[p][key]
            assert mine.dtype == torch.bfloat16, key
            close(mine.float(), value, rtol=2.0**-7, atol=2.0**-7, slack=ref.slack(i, key))


@PROPERTY
@given(optimizer_cases(dtypes=(torch.bfloat16,)))
def test_stochastic_rounding_lands_on_a_neighbour(case: dict[str, Any]) -> None:
    """stochastic_rounding=True on bfloat16 parameters, one step: each parameter is one of the two bfloat16
    neighbours of torch's float32 step from the same values (widened by a few float32 ulps and by Note
    [conditioning slack]); the states are torch's rounded to nearest bfloat16 (within one bfloat16 ulp)."""
    gen = seeded(case["seed"])
    pa = [leaf(make_tensor(s, lay, torch.bfloat16, gen)) for s, lay in case["specs"]]
    ref = Reference(case["name"], pa, case["kw"], case, torch.float32)
    ref.round_states(torch.bfloat16)  # the states are bfloat16 (the parameters' dtype): Adagrad's initial sum too
    a = _ours(case, pa, stochastic_rounding=True)
    grads = _grads(pa, gen, torch.bfloat16)
    for p, g in zip(pa, grads):
        p.grad = g.clone()
    start = [p.detach().float() for p in pa]
    a.step()
    ref.step(grads)
    for i, (p, p0) in enumerate(zip(pa, start)):
        runs = torch.stack([v.float() for v in ref.values(i)])
        # float32 rounding differences scale with the operands (the start and the update), not with a
        # result that may have cancelled to near zero
        slack = 8 * torch.finfo(torch.float32).eps * (p0.abs() + (runs[0] - p0).abs()) + 1e-30
        lo = _bf16_down(runs.amin(0) - slack)
        hi = _bf16_up(runs.amax(0) + slack)
        got = p.detach().float()
        assert bool(((got >= lo) & (got <= hi)).all()), float((got - runs[0]).abs().max())
        for key, value in ref.opt.state[ref.params[i]].items():
            if key != "step":
                close(a.state[p][key].float(), value.bfloat16().float(), rtol=2.0**-7, atol=2.0**-7,
                      slack=ref.slack(i, key))


def _bf16_down(x: torch.Tensor) -> torch.Tensor:
    """The largest bfloat16 value <= x (x float32)."""
    r = x.bfloat16().float()
    return torch.where(r > x, torch.nextafter(r.bfloat16(), torch.tensor(-math.inf, dtype=torch.bfloat16)).float(), r)


def _bf16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value >= x (x float32)."""
    r = x.bfloat16().float()
    return torch.where(r < x, torch.nextafter(r.bfloat16(), torch.tensor(math.inf, dtype=torch.bfloat16)).float(), r)


@PROPERTY
@given(optimizer_cases(dtypes=(torch.float64, torch.float32)), st.data())
def test_nonfinite_gradients_propagate_like_torch(case: dict[str, Any], data: Any) -> None:
    """NaN / inf / -inf in some gradients at some steps: torch propagates them into the parameters and
    states; fusedtrain puts NaN and inf in the same places (compared with equal_nan)."""
    dtype = case["dtype"]
    gen = seeded(case["seed"])
    pa = [leaf(make_tensor(s, lay, dtype, gen)) for s, lay in case["specs"]]
    ref = Reference(case["name"], pa, case["kw"], case, dtype)
    a = _ours(case, pa)
    bad_step = data.draw(st.integers(0, case["steps"] - 1))
    for step in range(case["steps"]):
        grads = _grads(pa, gen, dtype)
        if step == bad_step:
            nonempty = [g for g in grads if g.numel()]
            if nonempty:
                g = nonempty[data.draw(st.integers(0, len(nonempty) - 1))]
                for _ in range(data.draw(st.integers(1, 3))):
                    set_flat(g, data.draw(st.integers(0, g.numel() - 1)),
                             data.draw(st.sampled_from([math.nan, math.inf, -math.inf])))
        for p, g in zip(pa, grads):
            p.grad = g.clone()
        a.step()
        ref.step(grads)
    tol = F64_TOL if dtype == torch.float64 else (F32_CLIP_TOL if case["max_grad_norm"] else F32_TOL)
    assert_matches(a, pa, ref, **tol)


# ---------------------------------------------------------------------------------- refused calls
@st.composite
def refusal_cases(draw: Any) -> dict[str, Any]:
    name = draw(st.sampled_from(OPTIMIZERS))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kinds = ["grad_dtype", "grad_shape", "expanded_param"]
    if name not in ("SGD", "Adagrad"):  # torch steps SGD and Adagrad with sparse gradients
        kinds.append("sparse_grad")
    return dict(name=name, dtype=dtype, kw=draw(torch_options(name)), kind=draw(st.sampled_from(kinds)),
                warmup=draw(st.integers(0, 2)), seed=draw(st.integers(0, 2**31 - 1)),
                n_groups=draw(st.integers(1, 3)), bad_group=draw(st.integers(0, 2)),
                specs=[draw(tensor_specs(large_ok=False)) for _ in range(draw(st.integers(2, 5)))],
                max_grad_norm=draw(st.sampled_from([None, 1.0])))


@PROPERTY
@given(refusal_cases())
def test_refused_step_mutates_nothing(case: dict[str, Any]) -> None:
    """A step fusedtrain refuses (a gradient whose dtype or shape is not the parameter's, after 0-2 good
    steps so that checks may be cached; an expanded parameter, which no in-place update can write; a sparse
    gradient where torch has no sparse rule) raises before any parameter, gradient, state tensor, step
    counter or group of ANY group changed (torch itself may have updated the earlier groups by then)."""
    name, dtype, kw = case["name"], case["dtype"], case["kw"]
    gen = seeded(case["seed"])
    params = [leaf(make_tensor(s, lay, dtype, gen)) for s, lay in case["specs"]]
    params = [p for p in params if p.numel()] or [leaf(torch.randn(3, dtype=dtype))]
    n_groups = min(case["n_groups"], len(params))
    bad_group = case["bad_group"] % n_groups
    groups: list[list[torch.Tensor]] = [[] for _ in range(n_groups)]
    for i, p in enumerate(params):
        groups[i % n_groups].append(p)
    expanded = None
    if case["kind"] == "expanded_param":
        expanded = leaf(torch.randn(1, 5, dtype=dtype).expand(4, 5))  # stride 0: its 4 rows share memory
        groups[bad_group].append(expanded)
    opt = getattr(fusedtrain.optim, name)([{"params": g} for g in groups], **kw,
                                          max_grad_norm=case["max_grad_norm"])
    everything = [p for g in groups for p in g]
    for _ in range(case["warmup"]):
        for p in params:  # the expanded parameter gets no gradient yet: it is skipped
            p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen).to(dtype)
        opt.step()
    for p in params:
        p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen).to(dtype)
    victim = groups[bad_group][-1]
    if case["kind"] == "grad_dtype":
        other = torch.float64 if dtype == torch.float32 else torch.float32
        victim.grad.data = victim.grad.data.to(other)  # .grad = ... refuses this; .data does not
    elif case["kind"] == "grad_shape":
        victim.grad.data = torch.randn(victim.numel() + 1, dtype=dtype)
    elif case["kind"] == "sparse_grad":
        victim.grad = victim.grad.to_sparse()
    else:
        assert expanded is not None
        expanded.grad = torch.randn(4, 5, dtype=dtype)
    before = snapshot(opt, everything)
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        opt.step()
    assert_same_values(before, snapshot(opt, everything))


# ------------------------------------------------------------------------------ total norm, clipping
NORM_TYPES = [0.5, 1.0, 2.0, 3.0, math.inf, -math.inf, 0.0]


@st.composite
def norm_cases(draw: Any, dtypes: tuple[torch.dtype, ...]) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    return dict(specs=[draw(tensor_specs()) for _ in range(n)],
                dtypes=[draw(st.sampled_from(dtypes)) for _ in range(n)],
                norm_type=draw(st.sampled_from(NORM_TYPES)), seed=draw(st.integers(0, 2**31 - 1)),
                nonfinite=draw(st.sampled_from([None, None, math.nan, math.inf, -math.inf])),
                zeros=draw(st.booleans()), error_if_nonfinite=draw(st.booleans()),
                scale=draw(st.sampled_from([1.0, 1e-3, 1e3])))


def norm_tensors(case: dict[str, Any]) -> list[torch.Tensor]:
    gen = seeded(case["seed"])
    ts = [make_tensor(s, lay, dt, gen, case["scale"]) for (s, lay), dt in zip(case["specs"], case["dtypes"])]
    nonempty = [t for t in ts if t.numel()]
    if case["zeros"] and nonempty:  # exact zeros matter for the 0-"norm": zero the first half (or all of 1)
        t = nonempty[0]
        t.masked_fill_((torch.arange(t.numel()) < max(1, t.numel() // 2)).reshape(t.shape), 0.0)
    if case["nonfinite"] is not None and nonempty:
        set_flat(nonempty[-1], nonempty[-1].numel() - 1, case["nonfinite"])
    return ts


def set_flat(t: torch.Tensor, i: int, value: float) -> None:
    """t's i-th element (in index order) set in place, whatever t's strides."""
    if t.dim() == 0:
        t.fill_(value)
    else:
        t[tuple(int(k) for k in torch.unravel_index(torch.tensor(i), t.shape))] = value


def call(fn: Callable[[], Any]) -> tuple[Any, Exception | None]:
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - the error itself is what is compared
        return None, e


def exact_norm(ts: list[torch.Tensor], p: float) -> float:
    """torch's definition, exactly: the p-norm of the per-tensor p-norms. For p = 0 and +-inf that is exact
    in float64 (for p = 0 it counts the tensors with a non-zero element, however many tensors are given);
    for other p it equals (sum over all elements of |x|^p)^(1/p), summed with math.fsum (correctly
    rounded), so the reference is accurate to ~2 float64 ulps whatever the number of elements."""
    if p in (0.0, math.inf, -math.inf):
        per = torch.stack([torch.linalg.vector_norm(t.detach().double(), p) for t in ts])
        return float(torch.linalg.vector_norm(per, p))
    terms = torch.cat([t.detach().double().reshape(-1).abs().pow(p) for t in ts])
    return math.fsum(terms.tolist()) ** (1.0 / p)


def _norm_matches(ours: torch.Tensor, theirs: torch.Tensor, ts: list[torch.Tensor], p: float) -> None:
    assert ours.dtype == theirs.dtype and ours.dim() == 0
    if p in (0.0, math.inf, -math.inf) or not math.isfinite(float(theirs)):
        # counts, maxima and minima are exact; NaN/inf results are the same
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
        return
    if all(t.dtype == torch.float64 for t in ts):
        # float64: both sum tens of thousands of terms in float64 (their rounding errors differ); the
        # house tolerance of float64 parity
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
        return
    exact = exact_norm(ts, p)
    # At least as close to the exact value as torch (which rounds each tensor's norm to its dtype before
    # combining them), up to one rounding in the narrowest dtype given (a fused norm of several float32
    # tensors is rounded to float32 once, even when float64 tensors come along).
    eps = max(torch.finfo(t.dtype).eps for t in ts)
    assert abs(float(ours) - exact) <= abs(float(theirs) - exact) + 2 * eps * exact, (float(ours), float(theirs), exact)


@PROPERTY
@given(norm_cases(dtypes=(torch.float32, torch.float64)))
def test_get_total_norm_matches_torch(case: dict[str, Any]) -> None:
    """Any list (one tensor too), any norm type, zeros, non-finite values, empty tensors, mixed dtypes,
    error_if_nonfinite both ways: torch's value and dtype, or torch's error type (torch refuses the
    +-inf norm of an empty tensor: so must fusedtrain)."""
    ts = norm_tensors(case)
    p, err = case["norm_type"], case["error_if_nonfinite"]
    theirs, terr = call(lambda: torch.nn.utils.get_total_norm(ts, p, err, foreach=False))
    ours, oerr = call(lambda: fusedtrain.get_total_norm(ts, p, err))
    if terr is not None:
        assert oerr is not None and type(oerr) is type(terr), (terr, oerr, ours)
        if "non-finite" in str(terr):
            assert "non-finite" in str(oerr)
        return
    assert oerr is None, oerr
    _norm_matches(ours, theirs, ts, p)
    if len(ts) == 1:  # a single tensor may be passed as such
        _norm_matches(fusedtrain.get_total_norm(ts[0], p), theirs, ts, p)


@PROPERTY
@given(norm_cases(dtypes=(torch.float32, torch.float64)), st.sampled_from([1e-3, 0.5, 1e6]))
def test_clip_grad_norm_matches_torch(case: dict[str, Any], max_norm: float) -> None:
    """The returned norm, the clipped gradients (NaN where torch has NaN), and torch's errors; a refused
    call (error_if_nonfinite, inf norm of an empty gradient) leaves every gradient unchanged."""
    ts = norm_tensors(case)
    p, err = case["norm_type"], case["error_if_nonfinite"]
    pa = [leaf(torch.zeros_like(t)) for t in ts]
    pb = [leaf(torch.zeros_like(t)) for t in ts]
    for x, y, t in zip(pa, pb, ts):
        x.grad, y.grad = t.clone(), t.clone()
    theirs, terr = call(lambda: torch.nn.utils.clip_grad_norm_(pb, max_norm, p, err, foreach=False))
    before = [x.grad.clone() for x in pa]
    ours, oerr = call(lambda: fusedtrain.clip_grad_norm_(pa, max_norm, p, err))
    if terr is not None:
        assert oerr is not None and type(oerr) is type(terr), (terr, oerr)
        for x, g in zip(pa, before):
            torch.testing.assert_close(x.grad, g, rtol=0, atol=0, equal_nan=True)
        return
    assert oerr is None, oerr
    _norm_matches(ours, theirs, ts, p)
    exact_ties = p in (0.0, math.inf, -math.inf)
    tol = dict(rtol=0.0, atol=0.0) if exact_ties else (
        dict(rtol=1e-12, atol=0.0) if all(t.dtype == torch.float64 for t in ts) else dict(rtol=1e-5, atol=0.0))
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x.grad, y.grad, equal_nan=True, **tol)


@PROPERTY
@given(st.sampled_from(LOW), st.sampled_from([1.0, 2.0, math.inf, 0.5, 3.0]),
       st.lists(st.sampled_from([1, 7, 4097, 70_000, 1_000_000]), min_size=1, max_size=3),
       st.sampled_from([1e-2, 1.0, 100.0, 1e4]), st.integers(0, 2**31 - 1))
def test_half_precision_total_norm(dtype: torch.dtype, p: float, sizes: list[int], value: float, seed: int) -> None:
    """float16/bfloat16 gradients. torch's API returns the norm in the gradients' dtype, so where the true
    norm exceeds float16's largest value (65504; e.g. 10^6 elements of 100: 1e5) torch returns inf, and so
    must fusedtrain's get_total_norm (it is torch's API). The right assertion is therefore not "finite"
    but "the true norm (float64) rounded to the dtype": inf exactly when the true value overflows, else
    within one rounding of it and at least as close as torch's own result (torch rounds each tensor's norm
    to the dtype before combining them). An implementation that accumulated in the half dtype would
    overflow (or lose the small terms) far earlier and fail this. The step's own norm must not overflow:
    see test_regressions_13.py (last_grad_norm in float32)."""
    gen = seeded(seed)
    ts = [(value * (1 + 0.1 * torch.rand(n, dtype=torch.float64, generator=gen))).to(dtype) for n in sizes]
    ours = fusedtrain.get_total_norm(ts, p)
    theirs = torch.nn.utils.get_total_norm(ts, p, foreach=False)
    exact = exact_norm(ts, p)
    rounded = torch.tensor(exact, dtype=torch.float64).to(dtype)
    assert ours.dtype == dtype == theirs.dtype
    if math.isinf(float(rounded)):
        assert math.isinf(float(ours)) and float(ours) > 0
        return
    assert math.isfinite(float(ours)), (float(ours), exact)
    ulp = float(torch.finfo(dtype).eps) * exact
    assert abs(float(ours) - exact) <= max(abs(float(theirs) - exact), ulp), (float(ours), float(theirs), exact)
