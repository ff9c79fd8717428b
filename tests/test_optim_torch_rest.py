"""What is particular to RAdam, Adamax, Adadelta, ASGD and Rprop (issue 15), beyond the shared parity, API
and torch optim_db tests that cover them through tests/_helpers.py: ASGD's tensor scalars (eta, mu) under
GradScaler skips and torch's default dtype, Rprop's sign logic on exact zeros, sign flips and NaN,
RAdam's rectification threshold, and the low-precision state options of every class."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import fusedtrain
from _helpers import assert_same_state, clone_params, make_grads, make_params, set_grads, step_together

NAMES = ["RAdam", "Adamax", "Adadelta", "ASGD", "Rprop"]
KW: dict[str, dict[str, Any]] = {"RAdam": dict(lr=1e-2), "Adamax": dict(lr=1e-2), "Adadelta": dict(lr=0.5),
                                 "ASGD": dict(lr=1e-2, t0=2), "Rprop": dict(lr=1e-2)}
F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=2e-6, atol=2e-6)


def _pair(name: str, dtype: torch.dtype, **kw: Any) -> tuple[Any, list[torch.Tensor], Any, list[torch.Tensor]]:
    pa = make_params("cpu", dtype)
    pb = clone_params(pa)
    kw = {**KW[name], **kw}
    return getattr(fusedtrain.optim, name)(pa, **kw), pa, getattr(torch.optim, name)(pb, **kw, foreach=False), pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_asgd_eta_mu_bitwise_and_with_float64_default_dtype(dtype: torch.dtype) -> None:
    """eta and mu are torch's values exactly (torch rounds them to the default dtype, then to the state's):
    with float32 and with float64 as torch's default dtype, and across the averaging start (t0=2)."""
    saved = torch.get_default_dtype()
    try:
        for default in (torch.float32, torch.float64):
            torch.set_default_dtype(default)
            a, pa, b, pb = _pair("ASGD", dtype, lambd=0.05, alpha=0.6)
            step_together([(a, pa), (b, pb)], 8)
            assert_same_state(a, pa, b, pb, **(F64 if dtype == torch.float64 else F32))
            for x, y in zip(pa, pb):
                for key in ("eta", "mu"):
                    assert a.state[x][key].dtype == b.state[y][key].dtype == default
                    assert torch.equal(a.state[x][key], b.state[y][key]), key
    finally:
        torch.set_default_dtype(saved)


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_skip_leaves_every_state_alone(name: str) -> None:
    """A step GradScaler skips (an inf gradient) changes no parameter, state, step counter or tensor scalar
    (ASGD's eta and mu); the next steps equal torch's on the unscaled gradients."""
    a, pa, b, pb = _pair(name, torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(torch.ones(()))  # (the scaler makes its scale on its first scale() call)
    for i in range(5):
        grads = make_grads(pa)
        set_grads(pb, grads)
        b.step()
        set_grads(pa, [g * scaler.get_scale() for g in grads])
        scaler.step(a)
        scaler.update()
        if i == 2:  # now a skipped step: nothing may move
            before = {id(p): {k: v.clone() for k, v in a.state[p].items()} for p in pa}
            values = [p.detach().clone() for p in pa]
            bad = make_grads(pa)
            bad[2][5] = float("inf")
            set_grads(pa, bad)
            scaler.step(a)
            scaler.update()
            for p, v in zip(pa, values):
                assert torch.equal(p.detach(), v)
                for k, x in a.state[p].items():
                    assert torch.equal(x, before[id(p)][k]), k
    assert_same_state(a, pa, b, pb, **F32)


def test_rprop_zero_nan_and_sign_flips_match_torch_bitwise() -> None:
    """Exact zeros (no step-size change, no move), sign flips (the gradient zeroed and remembered as 0),
    repeated signs and NaN gradients (torch's sign(NaN) is 0: the step size is kept, the parameter does not
    move, prev becomes NaN) give torch's parameters and states bit for bit."""
    p = torch.randn(64, dtype=torch.float64).float().requires_grad_()
    q = p.detach().clone().requires_grad_()
    a = fusedtrain.optim.Rprop([p], lr=0.01, etas=(0.3, 1.7), step_sizes=(1e-3, 0.04))
    b = torch.optim.Rprop([q], lr=0.01, etas=(0.3, 1.7), step_sizes=(1e-3, 0.04), foreach=False)
    g0 = torch.randn(64)
    for k in range(9):
        g = g0 * (-1.0) ** (torch.arange(64) % (k + 2) == 0).float() if k % 3 else g0.clone()
        g[k::7] = 0.0
        if k == 4:
            g[3] = float("nan")
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)
        for key in ("prev", "step_size"):
            torch.testing.assert_close(a.state[p][key], b.state[q][key], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.6)])
def test_radam_rectification_threshold(betas: tuple[float, float]) -> None:
    """RAdam takes the un-rectified step while rho_t <= 5 and the rectified one after (with beta2 = 0.6,
    rho_inf = 4: never rectified); both branches equal torch's in float64."""
    a, pa, b, pb = _pair("RAdam", torch.float64, betas=betas)
    step_together([(a, pa), (b, pb)], 9)
    assert_same_state(a, pa, b, pb, **F64)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_states_close_to_float32(name: str) -> None:
    """state_dtype=torch.bfloat16: the states are bfloat16 and the parameters stay within bfloat16's
    precision of the float32 trajectory (a few steps; the step counters and ASGD's eta and mu are not
    element-wise states and keep torch's dtypes)."""
    pa = make_params("cpu", torch.float32)
    pb = clone_params(pa)
    a = getattr(fusedtrain.optim, name)(pa, **KW[name], state_dtype=torch.bfloat16)
    b = getattr(torch.optim, name)(pb, **KW[name], foreach=False)
    step_together([(a, pa), (b, pb)], 4)
    for x, y in zip(pa, pb):
        for key, value in a.state[x].items():
            assert value.dtype == (b.state[y][key].dtype if key in ("step", "eta", "mu") else torch.bfloat16), key
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_rounding_keeps_updates_below_half_an_ulp(name: str) -> None:
    """bfloat16 parameters at 1.0 with a constant gradient and updates of ~1e-4 (below half of bfloat16's
    ulp there): round-to-nearest never moves them, stochastic rounding follows the float32 trajectory on
    average."""
    torch.manual_seed(0)
    kw = dict(KW[name], lr=0.05 if name == "Adadelta" else 1e-4)
    results = {}
    for mode in ("f32", "nearest", "stochastic"):
        p = torch.ones(4096, dtype=torch.float32 if mode == "f32" else torch.bfloat16).requires_grad_()
        opt = getattr(fusedtrain.optim, name)([p], **kw, stochastic_rounding=mode == "stochastic")
        for _ in range(12):
            p.grad = torch.ones_like(p)
            opt.step()
        assert p.dtype == (torch.float32 if mode == "f32" else torch.bfloat16)
        results[mode] = p.detach().double()
    assert torch.equal(results["nearest"], torch.ones(4096, dtype=torch.float64))
    moved = float((1.0 - results["f32"]).mean())
    assert moved > 5e-4, moved
    assert abs(float((results["stochastic"] - results["f32"]).mean())) < 0.25 * moved
