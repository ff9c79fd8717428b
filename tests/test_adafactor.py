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
    scale = torch.tensor(1024.0)
    for _ in range(3):
        grads = [torch.randn(p.shape) for p in pa]
        for p, q, g in zip(pa, pb, grads):
            p.grad, q.grad = g * scale, g.clone()
        a.grad_scale, a.found_inf = scale, torch.tensor(0.0)
        a.step()
        torch.nn.utils.clip_grad_norm_(pb, 0.5)
        b.step()
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


@pytest.mark.cuda
def test_cuda_parameters_run_torchs_implementation() -> None:
    """No fused CUDA kernel yet: CUDA parameters get torch's own step, with the same state and results."""
    torch.manual_seed(5)
    pa = [p.detach().cuda().requires_grad_() for p in _params(torch.float32)]
    pb = _clone(pa)
    a = fusedtrain.optim.Adafactor(pa, lr=0.01, weight_decay=0.1)
    b = torch.optim.Adafactor(pb, lr=0.01, weight_decay=0.1, foreach=False)
    for _ in range(3):
        for p, q in zip(pa, pb):
            g = torch.randn(p.shape, device="cuda")
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for x, y in zip(pa, pb):
        _scaled_close(x, y, **TOL[torch.float32])


def test_opcheck() -> None:
    """The op's schema (what it mutates), fake kernel and dispatch, checked by torch.library.opcheck."""
    op = torch.ops.fusedtrain.adafactor_.default
    p, g = torch.randn(4, 6), torch.randn(4, 6)
    scalars = (0.5, 1e-7, 1e-3, 0.01, 0.999, True, 1.0, False)
    torch.library.opcheck(op, (p, g, torch.rand(4, 1), torch.rand(1, 6), None) + scalars)
    v = torch.randn(5)
    torch.library.opcheck(op, (v.clone(), torch.randn(5), None, None, torch.rand(5)) + scalars,
                          dict(inv_scale=0.25, clip_coef=0.5))
