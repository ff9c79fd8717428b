"""Optimizers beyond torch.optim (issue 16): Lion against timm.optim.Lion, ScheduleFreeAdamW / ScheduleFreeSGD against
the schedulefree package's AdamWScheduleFree / SGDScheduleFree (their foreach=False and foreach=True paths)."""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import pytest
import schedulefree
import timm.optim
import torch

import fusedtrain
from _helpers import assert_close_ulps, assert_same_values, clone_params, make_grads, make_params, set_grads, snapshot
from conftest import DEVICES

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6)}
SF = ("ScheduleFreeAdamW", "ScheduleFreeSGD")

# (fusedtrain class, options): every option combination that changes the kernel's arithmetic.
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("Lion", dict(lr=0.01)),
    ("Lion", dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1, maximize=True)),
    ("Lion", dict(lr=0.02, weight_decay=0.5, corrected_weight_decay=True)),
    ("ScheduleFreeAdamW", dict(lr=0.01)),
    ("ScheduleFreeAdamW", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, warmup_steps=5)),
    ("ScheduleFreeAdamW", dict(lr=0.02, warmup_steps=3, r=1.0, weight_lr_power=1.0)),
    ("ScheduleFreeSGD", dict(lr=0.1)),
    ("ScheduleFreeSGD", dict(lr=0.1, momentum=0.8, weight_decay=0.05, warmup_steps=4)),
    ("ScheduleFreeSGD", dict(lr=0.05, r=2.0, weight_lr_power=0.0, warmup_steps=2)),
]
IDS = [name + "-" + "-".join(f"{k}={v}" for k, v in kw.items() if k != "lr") for name, kw in CONFIGS]


def reference(name: str) -> type[torch.optim.Optimizer]:
    return {"Lion": timm.optim.Lion, "ScheduleFreeAdamW": schedulefree.AdamWScheduleFree,
            "ScheduleFreeSGD": schedulefree.SGDScheduleFree}[name]


def ours(name: str) -> type[torch.optim.Optimizer]:
    return getattr(fusedtrain.optim, name)


def pair(name: str, kw: dict[str, Any], dtype: torch.dtype, device: str = "cpu", foreach: bool = False,
         **extra: Any) -> tuple[torch.optim.Optimizer, list[torch.Tensor], torch.optim.Optimizer, list[torch.Tensor]]:
    pa = make_params(device, dtype)
    pb = clone_params(pa)
    a, b = ours(name)(pa, **kw, **extra), reference(name)(pb, **kw, foreach=foreach)
    if name in SF:
        a.train()
        b.train()
    return a, pa, b, pb


def step_both(a: torch.optim.Optimizer, pa: list[torch.Tensor], b: torch.optim.Optimizer, pb: list[torch.Tensor],
              n: int) -> None:
    for _ in range(n):
        grads = make_grads(pa)
        set_grads(pa, grads)
        set_grads(pb, grads)  # (the schedule-free reference normalizes its gradients in place: its own copies)
        a.step()
        b.step()


def assert_same(a: torch.optim.Optimizer, pa: list[torch.Tensor], b: torch.optim.Optimizer, pb: list[torch.Tensor],
                **tol: float) -> None:
    for x, y in zip(pa, pb):
        assert_close_ulps(x, y, **tol)
        sx, sy = a.state[x], b.state[y]
        assert set(sx) == set(sy), (set(sx), set(sy))
        for key in sx:
            assert sx[key].dtype == sy[key].dtype, key
            assert_close_ulps(sx[key], sy[key], **tol)
    for ga, gb in zip(a.param_groups, b.param_groups):
        skip = ("params", "l1", "foreach")  # (foreach: each side's own setting)
        assert {k: v for k, v in ga.items() if k not in skip} == {k: v for k, v in gb.items() if k not in skip}


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_matches_reference(cfg: tuple[str, dict[str, Any]], dtype: torch.dtype, device: str) -> None:
    """12 steps with an lr change halfway (corrected weight decay, the schedule's lr_max); schedule-free switches
    to eval and back twice on the way: params, states and group keys equal the reference's (foreach=False)."""
    name, kw = cfg
    a, pa, b, pb = pair(name, kw, dtype, device)
    step_both(a, pa, b, pb, 5)
    for opt in (a, b):
        for g in opt.param_groups:
            g["lr"] = g["lr"] * 0.5
    if name in SF:
        for _ in range(2):
            a.eval()
            b.eval()
            assert_same(a, pa, b, pb, **TOL[dtype])  # x
            a.train()
            b.train()
    step_both(a, pa, b, pb, 7)
    assert_same(a, pa, b, pb, **TOL[dtype])
    if name in SF:
        a.eval()
        b.eval()
        assert_same(a, pa, b, pb, **TOL[dtype])


@pytest.mark.parametrize("cfg", CONFIGS[::2], ids=IDS[::2])
def test_matches_reference_foreach(cfg: tuple[str, dict[str, Any]]) -> None:
    """The references' multi-tensor paths (their defaults on CUDA, schedulefree's everywhere) agree as well."""
    name, kw = cfg
    a, pa, b, pb = pair("" + name, kw, torch.float32, foreach=True)
    step_both(a, pa, b, pb, 10)
    assert_same(a, pa, b, pb, **TOL[torch.float32])


def _error(params: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return sum(float((p.detach().double() - r.detach()).pow(2).sum()) for p, r in zip(params, ref)) ** 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_half_precision_error_within_reference(cfg: tuple[str, dict[str, Any]], dtype: torch.dtype,
                                               device: str) -> None:
    """fp16/bf16 run in float32 registers: error vs a float64 run is at most 2x the reference's own in that dtype."""
    name, kw = cfg
    a, pa, b, pb = pair(name, kw, dtype, device)
    pref = clone_params(pa, torch.float64)
    ref = reference(name)(pref, **kw, foreach=False)
    if name in SF:
        ref.train()
    for _ in range(10):
        grads = make_grads(pa)
        for opt, ps in ((a, pa), (b, pb), (ref, pref)):
            set_grads(ps, grads)
            opt.step()
    scale = sum(float(r.detach().pow(2).sum()) for r in pref) ** 0.5
    floor = torch.finfo(dtype).eps * scale
    ours_err, ref_err = _error(pa, pref), _error(pb, pref)
    if ref_err != ref_err:
        # the reference rounds every intermediate to the half dtype: in fp16 eps=1e-8 underflows and its update
        # turns to NaN; ours keeps float32 registers and stays finite
        assert ours_err <= 0.05 * scale, (ours_err, scale)
    else:
        assert ours_err <= 2 * ref_err + floor, (ours_err, ref_err)


# ---------------------------------------------------------------------------------------------------- options
def _clip(params: list[torch.Tensor], max_norm: float) -> None:
    torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)


@pytest.mark.parametrize("cfg", CONFIGS[1::3], ids=IDS[1::3])
def test_max_grad_norm_and_l1(cfg: tuple[str, dict[str, Any]]) -> None:
    """max_grad_norm= equals clip_grad_norm_ before the reference's step; l1= equals adding l1*sign(p) to the
    gradient (after clipping, as the kernels apply it)."""
    name, kw = cfg
    maximize = kw.get("maximize", False)
    a, pa, b, pb = pair(name, kw, torch.float64, max_grad_norm=0.5, l1=0.01)
    if maximize:  # (the L1 term is a penalty whichever the direction: the test flips the gradient first)
        b.param_groups[0]["maximize"] = False
    for _ in range(6):
        grads = make_grads(pa)
        set_grads(pa, grads)
        set_grads(pb, grads)
        _clip(pb, 0.5)
        for p in pb:
            p.grad.mul_(-1 if maximize else 1).add_(0.01 * torch.sign(p.detach()))
        a.step()
        b.step()
    if maximize:
        b.param_groups[0]["maximize"] = True
    assert_same(a, pa, b, pb, **TOL[torch.float64])


@pytest.mark.parametrize("cfg", CONFIGS[::4], ids=IDS[::4])
def test_ema_equals_update_after_step(cfg: tuple[str, dict[str, Any]]) -> None:
    name, kw = cfg
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    ema, ema_ref = fusedtrain.ensemble.EMA(model, decay=0.9), fusedtrain.ensemble.EMA(twin, decay=0.9)
    a = ours(name)(model.parameters(), **kw, ema=ema)
    b = reference(name)(twin.parameters(), **kw, foreach=False)
    if name in SF:
        a.train()
        b.train()
    pa, pb = list(model.parameters()), list(twin.parameters())
    for _ in range(5):
        grads = make_grads(pa)
        set_grads(pa, grads)
        set_grads(pb, grads)
        a.step()
        b.step()
        ema_ref.update()
    for x, y in zip(ema.module.parameters(), ema_ref.module.parameters()):
        assert_close_ulps(x, y, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", CONFIGS[::2], ids=IDS[::2])
def test_master_weights_follow_the_float32_trajectory(cfg: tuple[str, dict[str, Any]], dtype: torch.dtype) -> None:
    """The masters take the float32 trajectory of the reference fed the same low-precision gradients; each parameter
    is its master rounded to nearest (also after train()/eval() switches)."""
    name, kw = cfg
    params = [p.detach().to(dtype).requires_grad_() for p in make_params("cpu", torch.float32)]
    ref = [p.detach().float().requires_grad_() for p in params]
    a = ours(name)(params, **kw, master_weights=True)
    b = reference(name)(ref, **kw, foreach=False)
    if name in SF:
        a.train()
        b.train()
    for i in range(6):
        for p, q, g in zip(params, ref, make_grads(params)):
            p.grad = g.to(dtype)
            q.grad = p.grad.float()
        a.step()
        b.step()
        if name in SF and i == 3:
            a.eval()
            b.eval()
            a.train()
            b.train()
    if name in SF:
        a.eval()
        b.eval()
    for p, q in zip(params, ref):
        state = a.state[p]
        assert_close_ulps(state["master_param"], q, rtol=2e-6, atol=2e-7)
        assert torch.equal(p.detach(), state["master_param"].to(dtype))
        for key, value in state.items():
            if key != "master_param":
                assert value.dtype == torch.float32
                assert_close_ulps(value, b.state[q][key], rtol=2e-6, atol=2e-7)


def test_stochastic_rounding_and_bfloat16_states_lion() -> None:
    """Lion takes the generic storage options: bfloat16 params with stochastic rounding, bfloat16 states for float32
    params (close to the float32 run, which it would not be if the options were ignored or mis-stored)."""
    pa = make_params("cpu", torch.float32)
    pb = clone_params(pa)
    a = fusedtrain.optim.Lion(pa, lr=0.01, state_dtype=torch.bfloat16)
    b = timm.optim.Lion(pb, lr=0.01, foreach=False)
    step_both(a, pa, b, pb, 3)
    for p in pa:
        assert a.state[p]["exp_avg"].dtype == torch.bfloat16
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=0, atol=0.1)  # sign flips only where the momentum is ~0
    low = [p.detach().to(torch.bfloat16).requires_grad_() for p in make_params("cpu", torch.float32)]
    c = fusedtrain.optim.Lion(low, lr=1e-4, stochastic_rounding=True)
    start = [p.detach().clone() for p in low]
    for p in low:
        p.grad = torch.ones_like(p)
    for _ in range(4):
        c.step()
    # lr=1e-4 is far below half a bfloat16 ulp of |p| ~ 1: round-to-nearest would never move; stochastic does
    moved = sum(int((p.detach() != s).sum()) for p, s in zip(low, start))
    assert moved > 0


@pytest.mark.parametrize("cautious", [False, True], ids=["plain", "cautious"])
def test_lion_grad_scaler_attributes(cautious: bool) -> None:
    """Lion takes GradScaler's scale and found_inf in the kernel: scale divides the gradient (before the
    cautious mask is counted), found_inf skips the update (both passes of the cautious one)."""
    a, pa, b, pb = pair("Lion", CAUTION[3] if cautious else dict(lr=0.01, weight_decay=0.1), torch.float64)
    if cautious:
        step_both(a, pa, b, pb, 2)
    grads = make_grads(pa)
    set_grads(pa, [g * 1024 for g in grads])
    set_grads(pb, grads)
    a.grad_scale = torch.tensor(1024.0)
    a.found_inf = torch.tensor(0.0)
    a.step()
    b.step()
    assert_same(a, pa, b, pb, **TOL[torch.float64])
    a.found_inf = torch.tensor(1.0)
    before = snapshot(a, pa)
    a.step()
    assert_same_values(before, snapshot(a, pa))


@pytest.mark.parametrize("name", SF)
def test_schedulefree_grad_scaler_skips_without_advancing(name: str) -> None:
    """With a GradScaler the scaler unscales and skips the step on inf (the schedule must not advance)."""
    kw = dict(CONFIGS)[name]
    a, pa, b, pb = pair(name, kw, torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(torch.ones(()))  # (what scaling the loss does first: the scale tensor is made)
    grads = make_grads(pa)
    set_grads(pa, [g * 256 for g in grads])
    set_grads(pb, grads)
    scaler.step(a)
    b.step()
    assert_same(a, pa, b, pb, **TOL[torch.float32])
    scaler.update()
    set_grads(pa, [g * float("inf") if i == 1 else g for i, g in enumerate(make_grads(pa))])
    before = snapshot(a, pa)
    scaler.step(a)
    after = snapshot(a, pa)
    after["grads"] = before["grads"]  # (the scaler unscaled them)
    assert_same_values(before, after)


# --------------------------------------------------------------------------------------- state, copies, refusals
@pytest.mark.parametrize("cfg", CONFIGS[::2], ids=IDS[::2])
def test_state_dict_round_trips_with_reference(cfg: tuple[str, dict[str, Any]]) -> None:
    """Ours -> reference and reference -> ours mid-run (schedule-free: saved in eval mode, as its docs ask)."""
    name, kw = cfg
    a, pa, b, pb = pair(name, kw, torch.float64)
    step_both(a, pa, b, pb, 4)
    if name in SF:
        a.eval()
        b.eval()
    sa, sb = a.state_dict(), b.state_dict()
    pa2, pb2 = clone_params(pa), clone_params(pb)
    b2 = reference(name)(pb2, **kw, foreach=False)
    b2.load_state_dict(copy.deepcopy(sa))
    a2 = ours(name)(pa2, **kw)
    a2.load_state_dict(copy.deepcopy(sb))
    if name in SF:
        for opt in (a, b, a2, b2):
            opt.train()
    step_both(a, pa, b2, pb2, 4)
    step_both(a2, pa2, b, pb, 4)
    assert_same(a, pa, b2, pb2, **TOL[torch.float64])
    assert_same(a2, pa2, b, pb, **TOL[torch.float64])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ["Lion", *SF])
def test_copies_keep_options_and_step_alike(name: str, how: str) -> None:
    kw = dict(CONFIGS)[name]
    params = make_params("cpu", torch.float32)
    opt = ours(name)(params, **kw, max_grad_norm=0.3, l1=0.01)
    if name in SF:
        opt.train()
    set_grads(params, make_grads(params))
    opt.step()
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        buf = io.BytesIO()
        torch.save((params, opt), buf)
        buf.seek(0)
        params2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.max_grad_norm == 0.3 and opt2.param_groups[0]["l1"] == 0.01
    grads = make_grads(params)
    set_grads(params, grads)
    set_grads(params2, grads)
    opt.step()
    opt2.step()
    assert_same_values(snapshot(opt, params), snapshot(opt2, params2))
    assert pickle.loads(pickle.dumps(opt2)).max_grad_norm == 0.3


@pytest.mark.parametrize("name", ["Lion", *SF])
def test_refused_step_changes_nothing(name: str) -> None:
    kw = dict(CONFIGS)[name]
    params = make_params("cpu", torch.float32)
    opt = ours(name)(params, **kw)
    if name in SF:
        opt.train()
    set_grads(params, make_grads(params))
    opt.step()
    set_grads(params, make_grads(params))
    params[-2].grad_dtype = None  # torch >= 2.10 refuses the assignment below otherwise
    params[-2].grad = params[-2].grad.double()  # the wrong dtype, after parameters the step could update
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="must match the parameter"):
        opt.step()
    assert_same_values(before, snapshot(opt, params))


def test_lion_refusals() -> None:
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        fusedtrain.optim.Lion([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fusedtrain.optim.Lion([p], lr=-1.0)
    with pytest.raises(ValueError, match="positive max lr"):
        fusedtrain.optim.Lion([p], lr=0.0, corrected_weight_decay=True)
    e = torch.nn.Embedding(5, 3, sparse=True)
    e(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        fusedtrain.optim.Lion(e.parameters()).step()


def test_lion_defaults_match_timm() -> None:
    p = torch.randn(3, requires_grad=True)
    a, b = fusedtrain.optim.Lion([p]), timm.optim.Lion([p])
    assert a.defaults == {**b.defaults, "l1": 0.0}


@pytest.mark.parametrize("name", SF)
def test_schedulefree_defaults_and_refusals(name: str) -> None:
    p = torch.randn(3, requires_grad=True)
    a, b = ours(name)([p]), reference(name)([p])
    assert a.defaults == {**b.defaults, "l1": 0.0}
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="eval mode"):
        a.step()
    assert len(a.state) == 0 and a.param_groups[0]["k"] == 0
    with pytest.raises(ValueError, match="state_dtype"):
        ours(name)([p], state_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="model= must be an nn.Module"):
        ours(name)([p], model=[p])
    c = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    if name == "ScheduleFreeAdamW":
        with pytest.raises(ValueError, match="complex"):
            ours(name)([c])
    else:  # linear in the gradient: complex parameters are stepped as pairs of reals, as the reference does
        c2 = c.detach().clone().requires_grad_()
        a, b = ours(name)([c]), reference(name)([c2], foreach=False)
        a.train()
        b.train()
        for _ in range(3):
            g = torch.randn(3, dtype=torch.complex64)
            c.grad, c2.grad = g.clone(), g.clone()
            a.step()
            b.step()
        a.eval()
        b.eval()
        torch.testing.assert_close(c, c2)


def test_meta_parameters_get_state() -> None:
    p = torch.empty(4, device="meta", requires_grad=True)
    p.grad = torch.empty(4, device="meta")
    opt = fusedtrain.optim.ScheduleFreeSGD([p])
    opt.train()
    opt.step()
    assert opt.state[p]["z"].device.type == "meta"


# -------------------------------------------------------------------------------------------------- model tie
@pytest.mark.parametrize("name", SF)
def test_model_mode_drives_the_switch(name: str) -> None:
    """model=: the model's forward and state_dict bring the optimizer to the model's mode, so evaluation and saving
    see x and training steps see y, without optimizer.train()/eval() calls; equal to the reference switched by
    hand. Copies of the model (with its optimizer) keep the tie; remove() unties."""
    kw = dict(CONFIGS)[name]
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    twin = copy.deepcopy(model)
    a = ours(name)(model.parameters(), **kw, model=model)
    b = reference(name)(twin.parameters(), **kw, foreach=False)
    x = torch.randn(5, 6)
    for epoch in range(2):
        model.train()
        b.train()
        for _ in range(3):
            model(x).square().sum().backward()  # the forward switched the optimizer to train mode
            twin(x).square().sum().backward()
            a.step()
            b.step()
            a.zero_grad()
            b.zero_grad()
        model.eval()
        b.eval()
        saved = model.state_dict()  # x, without a forward in eval mode first
        assert all(not g["train_mode"] for g in a.param_groups)
        for key, value in twin.state_dict().items():
            assert_close_ulps(saved[key], value, **TOL[torch.float32])
        with torch.no_grad():
            assert_close_ulps(model(x), twin(x), **TOL[torch.float32])
    model2, a2 = copy.deepcopy((model, a))
    model2.train()
    model2(x)
    assert all(g["train_mode"] for g in a2.param_groups) and not a.param_groups[0]["train_mode"]
    tie = a.tie_to(model)
    tie.remove()
    model.train()
    model(x)  # the tie given by model= remains
    assert a.param_groups[0]["train_mode"]


@pytest.mark.cuda
@pytest.mark.parametrize("name", SF)
def test_schedulefree_refuses_graph_capture(name: str) -> None:
    p = torch.randn(8, device="cuda", requires_grad=True)
    opt = ours(name)([p])
    opt.train()
    p.grad = torch.randn_like(p)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured"), torch.cuda.graph(graph):
        opt.step()


@pytest.mark.parametrize("cfg", CONFIGS[2:6:3], ids=IDS[2:6:3])
def test_tensor_lr(cfg: tuple[str, dict[str, Any]]) -> None:
    """A tensor lr (read by the kernels for Lion, on the host for the schedule) steps as the references step it."""
    name, kw = cfg
    kw = {**kw, "lr": torch.tensor(kw["lr"], dtype=torch.float64)}
    a, pa, b, pb = pair(name, kw, torch.float64)
    step_both(a, pa, b, pb, 5)
    for x, y in zip(pa, pb):
        assert_close_ulps(x, y, **TOL[torch.float64])


def test_bench_rows_run_the_references(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's "torch" rows of these optimizers are their references (timm, schedulefree), timed."""
    from fusedtrain.bench import optim as optim_bench

    monkeypatch.setitem(optim_bench.PARAM_SETS, "tiny", lambda: [(1000,), (37, 5), (1,)])
    rows = optim_bench.run(torch.device("cpu"), ["tiny"], ["Lion", "ScheduleFreeAdamW", "ScheduleFreeSGD"], reps=2,
                           warmup=1, bandwidth=0.0, progress=False)
    timed = {(r.case.split(",")[0], r.impl) for r in rows if r.median_ms is not None}
    for name, package in (("Lion", "timm"), ("ScheduleFreeAdamW", "schedulefree"), ("ScheduleFreeSGD", "schedulefree")):
        # the reference rows are labelled with the reference's package
        assert {(name, f"{package} for-loop"), (name, f"{package} foreach"), (name, "fusedtrain")} <= timed
    assert optim_bench._reference("Lion") is timm.optim.Lion


class _MixedNet(torch.nn.Module):
    """A float32 layer and a bfloat16 layer (master weights / stochastic rounding apply to the latter)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 8)
        self.b = torch.nn.Linear(8, 3).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)).bfloat16()).float()


@pytest.mark.parametrize("how", ["deepcopy", "torch_save"])
@pytest.mark.parametrize("extras", ["master_weights", "stochastic_rounding"])
@pytest.mark.parametrize("name", ["Lion", *SF])
def test_copies_of_model_and_optimizer_with_every_option(name: str, extras: str, how: str) -> None:
    """(model, optimizer) with ema, max_grad_norm, l1 and master weights or stochastic rounding (schedule-free: tied
    to the model with model=, so no train() call anywhere): a copy keeps every option and the tie, and steps exactly
    like the original; its EMA follows the copied model."""
    torch.manual_seed(0)
    model = _MixedNet()
    ema = fusedtrain.ensemble.EMA(model, decay=0.8)
    tie = {"model": model} if name in SF else {}
    opt = ours(name)(model.parameters(), lr=1e-2, max_grad_norm=0.05, l1=1e-3, ema=ema, **{extras: True}, **tie)

    def round_(m: torch.nn.Module, o: torch.optim.Optimizer, seed: int) -> None:
        torch.manual_seed(seed)  # the data, and the stochastic-rounding seed the step draws
        o.zero_grad()
        m(torch.randn(5, 6)).square().mean().backward()
        o.step()

    for i in range(2):
        round_(model, opt, i)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    assert getattr(opt2, extras) and opt2.max_grad_norm == 0.05 and opt2.param_groups[0]["l1"] == 1e-3
    assert opt2.ema is not None and opt2.ema is not ema
    for m, o in ((model2, opt2), (model, opt)):
        for i in range(2, 5):
            round_(m, o, i)
        m.eval()
        m.state_dict()  # schedule-free: the tie moves the parameters to x
    assert_same_values([p.detach() for p in model.parameters()], [p.detach() for p in model2.parameters()])
    assert_same_values(snapshot(opt, list(model.parameters())), snapshot(opt2, list(model2.parameters())))
    assert_same_values(ema.module.state_dict(), opt2.ema.module.state_dict())
    if name in SF:
        assert not opt.param_groups[0]["train_mode"] and not opt2.param_groups[0]["train_mode"]


# ------------------------------------------------------------------------------------------------ cautious Lion
# caution=True with every combination of the options that change its arithmetic (maximize, weight decay, corrected
# weight decay; corrected without decay is a no-op that must stay one).
CAUTION = [dict(lr=0.01 if wd == 0 else 0.02, betas=(0.8, 0.95) if maximize else (0.9, 0.99), weight_decay=wd,
                corrected_weight_decay=corrected, maximize=maximize, caution=True)
           for maximize in (False, True) for wd in (0.0, 0.3) for corrected in (False, True)]
CAUTION_IDS = ["-".join(f"{k}={v}" for k, v in kw.items() if k not in ("lr", "betas", "caution")) for kw in CAUTION]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kw", CAUTION, ids=CAUTION_IDS)
def test_cautious_lion_matches_timm(kw: dict[str, Any], dtype: torch.dtype, device: str) -> None:
    """timm.optim.Lion(caution=True, foreach=False): params and states after 12 steps with an lr change halfway;
    the per-tensor mask mean is exercised (after the first step the momentum disagrees with many gradients)."""
    test_matches_reference(("Lion", kw), dtype, device)


@pytest.mark.parametrize("kw", CAUTION[::3], ids=CAUTION_IDS[::3])
def test_cautious_lion_matches_timm_foreach(kw: dict[str, Any]) -> None:
    test_matches_reference_foreach(("Lion", kw))


@pytest.mark.parametrize("device", DEVICES)
def test_cautious_lion_scale_clamp(device: str) -> None:
    """A mask mean below 1e-3 is clamped there (timm's clamp_(min=1e-3)): 1 agreeing element of 2001 moves by
    1000 * lr, the others not at all; the float64 result equals timm's."""
    p = torch.zeros(2001, dtype=torch.float64, device=device, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    a, b = fusedtrain.optim.Lion([p], lr=0.01, caution=True), timm.optim.Lion([q], lr=0.01, caution=True, foreach=False)
    for g in (torch.ones(2001, dtype=torch.float64), torch.full((2001,), -0.01, dtype=torch.float64)):
        g = g.to(device)
        g[7] = 0.01
        p.grad, q.grad = g.clone(), g.clone()
        before = p.detach().clone()
        a.step()
        b.step()
    moved = (p.detach() - before).abs()
    assert float(moved[7]) == pytest.approx(0.01 * 1000, rel=1e-12)
    assert int((moved != 0).sum()) == 1
    assert_close_ulps(p, q, **TOL[torch.float64])
    assert_close_ulps(a.state[p]["exp_avg"], b.state[q]["exp_avg"], **TOL[torch.float64])


def test_cautious_lion_groups_and_switch() -> None:
    """caution per param group, and switched on and off between steps, as timm reads it from the group."""
    pa = make_params("cpu", torch.float64)
    pb = clone_params(pa)
    a = fusedtrain.optim.Lion([{"params": pa[:4], "caution": True}, {"params": pa[4:]}], lr=0.01, weight_decay=0.1)
    b = timm.optim.Lion([{"params": pb[:4], "caution": True}, {"params": pb[4:]}], lr=0.01, weight_decay=0.1,
                        foreach=False)
    for i in range(8):
        if i == 4:
            for opt in (a, b):
                opt.param_groups[0]["caution"], opt.param_groups[1]["caution"] = False, True
        step_both(a, pa, b, pb, 1)
    assert_same(a, pa, b, pb, **TOL[torch.float64])


@pytest.mark.parametrize("kw", CAUTION[1::3], ids=CAUTION_IDS[1::3])
def test_cautious_lion_max_grad_norm_and_l1(kw: dict[str, Any]) -> None:
    """The mask and the update see the clipped, L1-augmented gradient (as the reference fed that gradient)."""
    test_max_grad_norm_and_l1(("Lion", kw))


def test_cautious_lion_ema_and_state_dict() -> None:
    kw = CAUTION[3]
    test_ema_equals_update_after_step(("Lion", kw))
    test_state_dict_round_trips_with_reference(("Lion", kw))
    test_tensor_lr(("Lion", kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cautious_lion_master_weights(dtype: torch.dtype) -> None:
    test_master_weights_follow_the_float32_trajectory(("Lion", CAUTION[2]), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("kw", CAUTION[::5], ids=CAUTION_IDS[::5])
def test_cautious_lion_half_precision(kw: dict[str, Any], dtype: torch.dtype, device: str) -> None:
    test_half_precision_error_within_reference(("Lion", kw), dtype, device)


def test_cautious_lion_bfloat16_states() -> None:
    """state_dtype=bfloat16: the kernel stores m rounded to bfloat16 and reads it back for the mask and the
    update; equal to timm whose exp_avg is rounded to bfloat16 after each step."""
    pa = make_params("cpu", torch.float32)
    pb = clone_params(pa)
    a = fusedtrain.optim.Lion(pa, lr=0.01, weight_decay=0.1, caution=True, state_dtype=torch.bfloat16)
    b = timm.optim.Lion(pb, lr=0.01, weight_decay=0.1, caution=True, foreach=False)
    for _ in range(5):
        step_both(a, pa, b, pb, 1)
        for q in pb:
            if q in b.state:
                b.state[q]["exp_avg"] = b.state[q]["exp_avg"].bfloat16().float()
    for x, y in zip(pa, pb):
        assert a.state[x]["exp_avg"].dtype == torch.bfloat16
        assert_close_ulps(x, y, **TOL[torch.float32])
        assert torch.equal(a.state[x]["exp_avg"].float(), b.state[y]["exp_avg"])


def _bf16_neighbour(nearest: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """The bfloat16 value next to ``nearest`` (bfloat16) on the side of ``exact`` (float32), as float32."""
    d = torch.sign(exact - nearest.float()).int()
    bits = nearest.view(torch.int16).int() + torch.where(nearest.float() > 0, d, -d)
    return bits.short().view(torch.bfloat16).float()


def test_cautious_lion_stochastic_rounding() -> None:
    """bfloat16 params with stochastic rounding, second step (where the mask is not all ones): each result is one
    of the two bfloat16 neighbours of the exact float32 cautious step from the same values, not always the nearest
    one, and the rounding errors add up to about zero."""
    torch.manual_seed(3)
    low = [(torch.rand(3000) + 0.5).bfloat16().requires_grad_(), (torch.rand(40, 50) + 0.5).bfloat16().requires_grad_()]
    ref = [p.detach().float().requires_grad_() for p in low]
    a = fusedtrain.optim.Lion(low, lr=1e-3, caution=True, stochastic_rounding=True)
    b = timm.optim.Lion(ref, lr=1e-3, caution=True, foreach=False)
    for _ in range(2):
        for p, q in zip(low, ref):  # the same starting values and momentum (bfloat16 states: exact in float32)
            q.data.copy_(p.detach().float())
            if p in a.state:
                b.state[q]["exp_avg"].copy_(a.state[p]["exp_avg"])
        for p, q in zip(low, ref):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.bfloat16(), g.bfloat16().float()
        a.step()
        b.step()
    not_nearest, bias, var = 0, 0.0, 0.0
    for p, q in zip(low, ref):
        exact, got = q.detach(), p.detach().float()
        nearest = exact.bfloat16()
        other = _bf16_neighbour(nearest, exact)
        hit = exact == nearest.float()
        assert bool((got == nearest.float()).logical_or((got == other) & ~hit).all())
        not_nearest += int(((got != nearest.float()) & ~hit).sum())
        # unbiased: the sum of the rounding errors is within a few standard deviations (an update that missed
        # the caution scale 1/mean(mask) would be off by ~lr/2 per agreeing element: many deviations)
        bias += float((got - exact).sum())
        var += float(((other - nearest.float()) ** 2).sum()) / 4
    assert not_nearest > 0
    assert abs(bias) <= 5 * var ** 0.5, (bias, var ** 0.5)


def test_cautious_lion_refused_step_changes_nothing() -> None:
    params = make_params("cpu", torch.float32)
    opt = fusedtrain.optim.Lion(params, lr=0.01, caution=True)
    set_grads(params, make_grads(params))
    opt.step()
    set_grads(params, make_grads(params))
    params[-2].grad_dtype = None
    params[-2].grad = params[-2].grad.double()
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="must match the parameter"):
        opt.step()
    assert_same_values(before, snapshot(opt, params))
