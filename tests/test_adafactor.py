"""fusedtrain.optim.Adafactor against torch.optim.Adafactor (Note [Adafactor passes] in
csrc/include/fusedtrain/adafactor.h).

Tolerances: float64 to 1e-12, float32 to a few ulps (rtol 2e-6: the row / column / norm sums are
accumulated in another order than torch's); float16 / bfloat16 by the parity tests' rule: the error against a
float64 run is at most twice torch's own.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import fusedtrain
from _helpers import run_grads, step_scaled_and_clipped

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"),
                                reason="torch.optim.Adafactor needs torch >= 2.5")

SHAPES: list[tuple[int, ...]] = [(1, 7), (7, 1), (3, 5), (33, 17), (2, 3, 4), (4, 3, 3, 3), (7,), (), (1,)]
CONFIGS: list[dict[str, Any]] = [
    dict(),
    dict(lr=0.01, weight_decay=0.1),
    dict(weight_decay=0.1, maximize=True),
    dict(beta2_decay=-1.0, eps=(1e-30, 1e-3)),
    dict(d=1.5, lr=0.05),
]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6)}


def _params(dtype: torch.dtype) -> list[torch.Tensor]:
    ps = [torch.randn(s, dtype=torch.float64).to(dtype) for s in SHAPES]
    ps.append(torch.randn(9, 6, dtype=torch.float64).to(dtype).t())  # dense, not contiguous
    ps.append(torch.randn(8, 10, dtype=torch.float64).to(dtype)[:, ::3])  # strided
    return [p.requires_grad_() for p in ps]


def _clone(ps: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in ps]


def _run(pairs: list[tuple[torch.optim.Optimizer, list[torch.Tensor]]], n: int) -> None:
    shapes = [p.shape for p in pairs[0][1]]
    for _ in range(n):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        for opt, ps in pairs:
            for p, g in zip(ps, grads):
                p.grad = g.to(p.dtype)
            opt.step()


def _scaled_close(x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float) -> None:
    x, y = x.detach(), y.detach()
    scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
    torch.testing.assert_close(x, y, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_torch(cfg: dict[str, Any], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    pa = _params(dtype)
    pb = _clone(pa)
    a = fusedtrain.optim.Adafactor(pa, **cfg)
    b = torch.optim.Adafactor(pb, foreach=False, **cfg)
    _run([(a, pa), (b, pb)], 8)
    for x, y in zip(pa, pb):
        _scaled_close(x, y, **TOL[dtype])
        assert set(a.state[x]) == set(b.state[y])
        for key, value in a.state[x].items():
            other = b.state[y][key]
            assert value.dtype == other.dtype and value.shape == other.shape and value.device == other.device
            if key == "step":
                assert float(value) == float(other) == 8.0
            else:
                _scaled_close(value, other, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_torchs(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    ref = _params(torch.float64)
    pa, pb = _clone(ref, dtype), _clone(ref, dtype)
    kw = dict(lr=0.01, weight_decay=0.05)
    runs = [(fusedtrain.optim.Adafactor(pa, **kw), pa), (torch.optim.Adafactor(pb, foreach=False, **kw), pb),
            (torch.optim.Adafactor(ref, foreach=False, **kw), ref)]
    _run(runs, 6)
    for x, y, r in zip(pa, pb, ref):
        ours = float((x.detach().double() - r.detach()).abs().max()) if r.numel() else 0.0
        theirs = float((y.detach().double() - r.detach()).abs().max()) if r.numel() else 0.0
        assert ours <= 2 * theirs + 1e-3 * float(r.abs().max()), (ours, theirs)


def test_state_dict_round_trips_with_torch() -> None:
    torch.manual_seed(2)
    pa = _params(torch.float64)
    pb, pc = _clone(pa), _clone(pa)
    a = fusedtrain.optim.Adafactor(pa, lr=0.02)
    b = torch.optim.Adafactor(pb, lr=0.02, foreach=False)
    _run([(a, pa), (b, pb)], 2)
    c = fusedtrain.optim.Adafactor(pc, lr=0.5)
    c.load_state_dict(copy.deepcopy(b.state_dict()))  # torch -> ours (a state dict shares the tensors)
    for x, y in zip(pc, pb):
        x.data.copy_(y)
    b2 = torch.optim.Adafactor(_clone(pa), lr=0.5, foreach=False)
    b2.load_state_dict(copy.deepcopy(a.state_dict()))  # ours -> torch
    assert b2.param_groups[0]["lr"] == 0.02
    _run([(c, pc), (b, pb)], 3)
    for x, y in zip(pc, pb):
        _scaled_close(x, y, **TOL[torch.float64])
        assert float(c.state[x]["step"]) == 5.0


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(differentiable=True), ValueError, "differentiable=True is not supported"),
    (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True` together"),
    (dict(l1=0.1), ValueError, "l1=0.1 is not supported by Adafactor"),
    (dict(master_weights=True), ValueError, "master_weights=True is not supported"),
    (dict(state_dtype=torch.bfloat16), ValueError, "state_dtype=torch.bfloat16 is not supported"),
    (dict(bogus=1), TypeError, "unexpected keyword argument 'bogus'"),
    (dict(max_grad_norm=-1.0), ValueError, "Invalid max_grad_norm"),
    (dict(d=0.5), ValueError, "Clipping threshold d should be >= 1"),
    (dict(beta2_decay=0.5), ValueError, "beta2_decay should be <= 0"),
])
def test_option_errors(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fusedtrain.optim.Adafactor([torch.nn.Parameter(torch.randn(3, 4))], **kwargs)


def test_refused_steps_mutate_nothing() -> None:
    good = torch.nn.Parameter(torch.randn(3, 4))
    before = good.detach().clone()
    for bad, error, match in [(torch.nn.Parameter(torch.randn(2, dtype=torch.complex64)), RuntimeError,
                               "Adafactor does not support complex parameters"),
                              (torch.nn.Parameter(torch.randn(0, 3)), ZeroDivisionError, "float division by zero")]:
        opt = fusedtrain.optim.Adafactor([good, bad])
        good.grad, bad.grad = torch.randn(3, 4), torch.randn_like(bad)
        with pytest.raises(error, match=match):
            opt.step()
        assert torch.equal(good, before) and len(opt.state) == 0
    with pytest.raises(ZeroDivisionError):  # torch refuses the empty parameter too
        opt = torch.optim.Adafactor([torch.nn.Parameter(torch.randn(0, 3))], foreach=False)
        opt.param_groups[0]["params"][0].grad = torch.randn(0, 3)
        opt.step()


def test_max_grad_norm_and_grad_scale_equal_unscaled_clipped_gradients() -> None:
    torch.manual_seed(3)
    pa = _params(torch.float32)
    pb = _clone(pa)
    a = fusedtrain.optim.Adafactor(pa, lr=0.02, max_grad_norm=0.5)
    b = fusedtrain.optim.Adafactor(pb, lr=0.02)
    step_scaled_and_clipped(a, pa, b, pb, 0.5)
    for x, y in zip(pa, pb):
        _scaled_close(x, y, rtol=1e-6, atol=1e-6)
    before = [p.detach().clone() for p in pa]
    a.found_inf = torch.tensor(1.0)
    a.step()
    assert all(torch.equal(p, q) for p, q in zip(pa, before))
    assert all(float(a.state[p]["step"]) == 3.0 for p in pa)


def test_grad_scaler_drives_it() -> None:
    """torch.amp.GradScaler hands the scale to the step (``_step_supports_amp_scaling``); results equal
    torch's Adafactor stepped by the same scaler (which unscales the gradients itself)."""
    torch.manual_seed(4)
    pa = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    pb = _clone(pa)
    runs = []
    for cls, ps in ((fusedtrain.optim.Adafactor, pa), (torch.optim.Adafactor, pb)):
        opt = cls(ps, lr=0.01)
        runs.append((opt, ps, torch.amp.GradScaler("cpu", init_scale=256.0)))
    for _ in range(3):
        xs = [torch.randn(p.shape) for p in pa]
        for opt, ps, scaler in runs:
            opt.zero_grad()
            scaler.scale(sum((p * x).sum() for p, x in zip(ps, xs))).backward()
            scaler.step(opt)
            scaler.update()
    for x, y in zip(pa, pb):
        _scaled_close(x, y, rtol=2e-6, atol=2e-6)


def test_opcheck() -> None:
    """The op's schema (what it mutates), fake kernel and dispatch, checked by torch.library.opcheck."""
    op = torch.ops.fusedtrain.adafactor_.default
    scalars = (-0.8, 1e-7, 1e-3, 0.01, 0.999, True, 1.0, False)
    params = [torch.randn(4, 6), torch.randn(5), torch.randn(2, 3, 4)]
    grads = [torch.randn_like(p) for p in params]
    rows, cols = [torch.rand(4, 1), torch.rand(2, 3, 1)], [torch.rand(1, 6), torch.rand(2, 1, 4)]
    steps = [torch.tensor(2.0) for _ in params]
    torch.library.opcheck(op, (params, grads, rows, cols, [torch.rand(5)], steps) + scalars)
    torch.library.opcheck(op, ([torch.randn(5)], [torch.randn(5)], [], [], [torch.rand(5)], [torch.tensor(0.0)])
                          + scalars, dict(inv_scale=0.25, clip_coef=0.5))


# ---- one op call per group (Note [Adafactor blocks] in csrc/cpu/optim_adafactor.cpp) ----

#: shapes that take every block layout: vectors over one block and several, whole small slices (conv
#: kernels), 1 x 1 slices, slices larger than a block (row blocks with partial column sums), batched
#: large slices, a 0-dim and a one-element tensor
MIXED: list[tuple[int, ...]] = [(70_001,), (300, 1000), (2, 150, 700), (64, 32, 3, 3), (256, 128, 3, 3),
                                (129, 65, 1, 1), (300, 250, 1, 1), (5, 1, 7), (1, 1), (), (1,), (3,), (17, 3),
                                (40, 3000), (9000, 8)]


def _mixed(dtype: torch.dtype, shapes: list[tuple[int, ...]] = MIXED) -> list[torch.Tensor]:
    ps = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    ps.append(torch.randn(130, 90, dtype=torch.float64).to(dtype).t())  # not contiguous: copied and back
    ps.append(torch.randn(80, 10, dtype=torch.float64).to(dtype)[::2, 1:])
    return [p.requires_grad_() for p in ps]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_group_of_mixed_shapes_matches_torch(dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    pa = _mixed(dtype)
    pb = _clone(pa)
    kw = dict(lr=0.02, weight_decay=0.05, maximize=True)
    a = fusedtrain.optim.Adafactor(pa, **kw)
    b = torch.optim.Adafactor(pb, foreach=False, **kw)
    _run([(a, pa), (b, pb)], 4)
    for x, y in zip(pa, pb):
        _scaled_close(x, y, **TOL[dtype])
        for key, value in a.state[x].items():
            if key != "step":
                _scaled_close(value, b.state[y][key], **TOL[dtype])
        assert float(a.state[x]["step"]) == 4.0


def test_groups_dtypes_and_parameters_without_grad() -> None:
    """Two groups, float32 and float64 in one group (torch's for-loop resolves eps1=None from the first
    parameter it steps, for the whole group), parameters skipped on some steps (their own step counts)."""
    torch.manual_seed(7)
    pa = [torch.randn(6, 5, dtype=torch.float64), torch.randn(7), torch.randn(3, 4),
          torch.randn(9, dtype=torch.float64), torch.randn(2, 2)]
    pa = [p.requires_grad_() for p in pa]
    pb = _clone(pa)

    def groups(ps: list[torch.Tensor]) -> list[dict[str, Any]]:
        return [dict(params=ps[:3], lr=0.03), dict(params=ps[3:], weight_decay=0.1)]

    a = fusedtrain.optim.Adafactor(groups(pa))
    b = torch.optim.Adafactor(groups(pb), foreach=False)
    for step in range(5):
        for opt, ps in ((a, pa), (b, pb)):
            torch.manual_seed(100 + step)
            for i, p in enumerate(ps):
                p.grad = None if (i == 2 and step % 2) else torch.randn(p.shape, dtype=p.dtype)
            opt.step()
    for x, y in zip(pa, pb):
        _scaled_close(x, y, rtol=2e-6, atol=2e-6)
        assert float(a.state[x]["step"]) == float(b.state[y]["step"])


def test_threads_and_isa_do_not_change_results() -> None:
    """Each block's sums are its own and combined in block order: one thread or two give the same bits;
    every SIMD copy agrees with torch (the lanes of the double sums differ, so copies agree to rounding)."""
    from fusedtrain import _build

    torch.manual_seed(8)
    lib = _build.library()
    order = ["baseline", "avx2", "avx512"]
    usable = order[: order.index(lib.cpu_isa_detected()) + 1]
    original, threads = lib.cpu_isa(), torch.get_num_threads()
    ref = _mixed(torch.float32)
    grads = [torch.randn(p.shape) for p in ref]
    try:
        for isa in usable:
            lib.set_cpu_isa(isa)
            results = []
            for n in (1, 2):
                torch.set_num_threads(n)
                ps = _clone(ref)
                opt = fusedtrain.optim.Adafactor(ps, lr=0.05)
                for _ in range(2):
                    for p, g in zip(ps, grads):
                        p.grad = g.clone()
                    opt.step()
                results.append(ps)
            for x, y in zip(*results):
                assert torch.equal(x, y), isa
            pb = _clone(ref)
            b = torch.optim.Adafactor(pb, lr=0.05, foreach=False)
            for _ in range(2):
                for p, g in zip(pb, grads):
                    p.grad = g.clone()
                b.step()
            for x, y in zip(results[0], pb):
                _scaled_close(x, y, **TOL[torch.float32])
    finally:
        lib.set_cpu_isa(original)
        torch.set_num_threads(threads)


def test_op_refuses_bad_lists_and_writes_nothing() -> None:
    op = torch.ops.fusedtrain.adafactor_
    p, v = torch.randn(5), torch.rand(5)
    before = (p.clone(), v.clone())
    step = torch.tensor(3.0)
    scalars = (-0.8, 1e-7, 1e-3, 0.01, 1.0, False, 1.0, False)
    with pytest.raises(RuntimeError, match="variances one per 0-D / 1-D param"):
        op([p], [torch.randn(5)], [], [], [], [step], *scalars)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must match params\[0\]"):
        op([p], [torch.randn(4)], [], [], [v], [step], *scalars)
    with pytest.raises(RuntimeError, match=r"row_vars\[0\] must be a CPU Float tensor of shape \[3, 1\]"):
        op([p, torch.randn(3, 4)], [torch.randn(5), torch.randn(3, 4)], [torch.rand(1, 4)], [torch.rand(1, 4)], [v],
           [step, torch.tensor(0.0)], *scalars)
    with pytest.raises(RuntimeError, match=r"state_steps\[0\] must be a one-element"):
        op([p], [torch.randn(5)], [], [], [v], [torch.zeros(2)], *scalars)
    assert torch.equal(p, before[0]) and torch.equal(v, before[1]) and float(step) == 3.0
    op([p], [torch.randn(5)], [], [], [v], [step], *scalars, check_only=True)
    assert torch.equal(p, before[0]) and float(step) == 3.0
    opt = fusedtrain.optim.Adafactor([torch.nn.Parameter(torch.randn(3))])
    opt.step()  # no gradients: no op call, no state
    assert len(opt.state) == 0


def test_overlapping_parameter_is_named_and_nothing_changes() -> None:
    good = torch.nn.Parameter(torch.randn(3, 4))
    bad = torch.nn.Parameter(torch.randn(1).expand(4))
    before = good.detach().clone()
    opt = fusedtrain.optim.Adafactor([good, bad])
    good.grad, bad.grad = torch.randn(3, 4), torch.randn(4)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\] has internally overlapping"):
        opt.step()
    assert torch.equal(good, before) and len(opt.state) == 0


def test_cached_plan_reads_fresh_gradients_and_refuses_a_sparse_one() -> None:
    """The second step reuses the first one's lists (same parameters with gradients): new gradient tensors
    are read, and a gradient that turned sparse is refused with torch's message before any write."""
    torch.manual_seed(9)
    pa = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(6))]
    pb = _clone(pa)
    a = fusedtrain.optim.Adafactor(pa, lr=0.05)
    b = torch.optim.Adafactor(pb, lr=0.05, foreach=False)
    _run([(a, pa), (b, pb)], 3)
    for x, y in zip(pa, pb):
        _scaled_close(x, y, **TOL[torch.float32])
    before = [p.detach().clone() for p in pa]
    pa[0].grad = torch.randn(4, 3)
    pa[1].grad = torch.randn(6).to_sparse()
    with pytest.raises(RuntimeError, match="Adafactor does not support sparse gradients"):
        a.step()
    assert all(torch.equal(p, q) for p, q in zip(pa, before))
    assert all(float(a.state[p]["step"]) == 3.0 for p in pa)


def test_cached_plan_sees_a_replaced_state_tensor_and_parameter() -> None:
    """The reused lists follow a state tensor replaced by hand (a "move the state" recipe) and a parameter
    replaced in place in the group's list, as torch's step does."""
    torch.manual_seed(10)
    pa = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(6))]
    pb = _clone(pa)
    a = fusedtrain.optim.Adafactor(pa, lr=0.05)
    b = torch.optim.Adafactor(pb, lr=0.05, foreach=False)
    _run([(a, pa), (b, pb)], 2)
    for opt, ps in ((a, pa), (b, pb)):
        opt.state[ps[1]]["variance"] = opt.state[ps[1]]["variance"] * 4.0
        opt.state[ps[0]]["row_var"] = opt.state[ps[0]]["row_var"].clone() + 0.5
    _run([(a, pa), (b, pb)], 2)
    for x, y in zip(pa, pb):
        _scaled_close(x, y, **TOL[torch.float32])
    fresh = torch.nn.Parameter(torch.randn(6))
    for opt, ps, new in ((a, pa, fresh), (b, pb, torch.nn.Parameter(fresh.detach().clone()))):
        opt.param_groups[0]["params"][1] = new
        ps[1] = new
    _run([(a, pa), (b, pb)], 2)
    for x, y in zip(pa, pb):
        _scaled_close(x, y, **TOL[torch.float32])


# ---- CUDA (Note [Adafactor on CUDA] in csrc/cuda/optim_adafactor.cu) ----

def _to_cuda(ps: list[torch.Tensor]) -> list[torch.Tensor]:
    """CUDA twins with the same values (.cuda() keeps a transposed parameter's strides: the op's working copy)."""
    return [p.detach().cuda().requires_grad_() for p in ps]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cuda_equals_cpu(dtype: torch.dtype) -> None:
    """Every block layout of the CPU driver (MIXED) against the CUDA kernels, 4 steps with weight decay and
    maximize: the same formulas, double sums in another order, so float64 to ~1e-12, float32 to a few ulps and
    the half types to one ulp of their own."""
    torch.manual_seed(9)
    pa = _mixed(dtype)
    pc = _to_cuda(pa)
    kw = dict(lr=0.02, weight_decay=0.05, maximize=True)
    a, c = fusedtrain.optim.Adafactor(pa, **kw), fusedtrain.optim.Adafactor(pc, **kw)
    tol = TOL.get(dtype, dict(rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps))
    for _ in range(4):
        for p, q in zip(pa, pc):
            g = torch.randn(p.shape, dtype=torch.float64).to(dtype)
            p.grad, q.grad = g, g.cuda()
        a.step()
        c.step()
    for x, y in zip(pa, pc):
        assert y.is_cuda
        _scaled_close(y.cpu(), x, **tol)
        assert set(a.state[x]) == set(c.state[y])
        for key, value in a.state[x].items():
            other = c.state[y][key]
            if key == "step":
                assert other.device.type == "cpu" and float(other) == float(value) == 4.0
            else:
                assert other.is_cuda and other.dtype == value.dtype and other.shape == value.shape
                _scaled_close(other.cpu(), value, **tol)


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_cuda_matches_torch(cfg: dict[str, Any]) -> None:
    torch.manual_seed(10)
    pa = [p.detach().cuda().requires_grad_() for p in _params(torch.float32)]
    pb = _clone(pa)
    a = fusedtrain.optim.Adafactor(pa, **cfg)
    b = torch.optim.Adafactor(pb, foreach=False, **cfg)
    for _ in range(5):
        for p, q in zip(pa, pb):
            g = torch.randn(p.shape, device="cuda")
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for x, y in zip(pa, pb):
        _scaled_close(x, y, **TOL[torch.float32])


@pytest.mark.cuda
def test_cuda_is_deterministic_and_mixes_with_cpu_parameters() -> None:
    """Fixed-order sums: two runs give the same bits; CPU and CUDA parameters in one group make one op call
    per device, each equal to an optimizer that holds only its own parameters."""
    torch.manual_seed(11)
    ref = _mixed(torch.float32)
    grads = [torch.randn(p.shape) for p in ref]

    def stepped(on_cuda: list[bool]) -> list[torch.Tensor]:
        """Copies of the parameters of ``ref`` marked True (on CUDA where on_cuda says so) after 3 steps."""
        ps = [p.detach().cuda() if cuda else p.detach().clone() for p, cuda in zip(ref, on_cuda)]
        ps = [p.requires_grad_() for p in ps]
        opt = fusedtrain.optim.Adafactor(ps, lr=0.03, weight_decay=0.1)
        run_grads(opt, ps, [[g.to(p.device) for p, g in zip(ps, grads)]] * 3)
        return ps

    cuda = stepped([True] * len(ref))
    assert all(torch.equal(x, y) for x, y in zip(cuda, stepped([True] * len(ref))))
    mixed = stepped([i % 2 == 0 for i in range(len(ref))])
    for i, (x, y) in enumerate(zip(mixed, cuda)):
        if i % 2 == 0:
            assert x.is_cuda and torch.equal(x, y)
    cpu = [p for i, p in enumerate(ref) if i % 2]
    cpu_only = [p.detach().clone().requires_grad_() for p in cpu]
    opt = fusedtrain.optim.Adafactor(cpu_only, lr=0.03, weight_decay=0.1)
    run_grads(opt, cpu_only, [[g for i, g in enumerate(grads) if i % 2]] * 3)
    assert all(torch.equal(x, y) for x, y in zip(mixed[1::2], cpu_only))


@pytest.mark.cuda
def test_cuda_grad_scaler_and_clipping_match_cpu() -> None:
    torch.manual_seed(12)
    pa = _mixed(torch.float32, [(33, 17), (70_001,), (4, 3, 3, 3)])
    pc = [p.detach().cuda().requires_grad_() for p in pa]
    xs = [torch.randn(p.shape) for p in pa]
    runs = []
    for ps, device in ((pa, "cpu"), (pc, "cuda")):
        opt = fusedtrain.optim.Adafactor(ps, lr=0.02, max_grad_norm=0.5)
        scaler = torch.amp.GradScaler(device, init_scale=1024.0)
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(sum((p * x.to(device)).sum() for p, x in zip(ps, xs))).backward()
            scaler.step(opt)
            scaler.update()
        runs.append(ps)
    for x, y in zip(*runs):
        _scaled_close(y.cpu(), x, **TOL[torch.float32])


@pytest.mark.cuda
def test_cuda_op_refuses_a_cpu_state_and_writes_nothing() -> None:
    op = torch.ops.fusedtrain.adafactor_
    p, g = torch.randn(4, 6, device="cuda"), torch.randn(4, 6, device="cuda")
    rows, cols = torch.rand(4, 1, device="cuda"), torch.rand(1, 6)  # col_var on the wrong device
    step = torch.tensor(3.0)
    before = (p.clone(), rows.clone(), cols.clone())
    with pytest.raises(RuntimeError, match=r"col_vars\[0\] must be a CUDA Float tensor of shape \[1, 6\]"):
        op([p], [g], [rows], [cols], [], [step], -0.8, 1e-7, 1e-3, 0.01, 1.0, False, 1.0, False)
    assert torch.equal(p, before[0]) and torch.equal(rows, before[1]) and torch.equal(cols, before[2])
    assert float(step) == 3.0
