"""Gradient clipping (fused norm, max_grad_norm), GradScaler's grad_scale / found_inf, tensor lr,
capturable step counters, torch.compile and CUDA graphs: each against torch's own way of doing it."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import fusedtrain
from _helpers import (CONFIGS, assert_same_state, clone_params, config_id, make_grads, make_params, ours, set_grads,
                      theirs, torch_kwargs)
from conftest import DEVICES

NORM_TYPES = [2.0, 1.0, math.inf, 3.0, 0.5]


def _tensors(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    return [p.detach() * 3 for p in make_params(device, dtype)]


def _exact_norm(tensors: list[torch.Tensor], p: float) -> float:
    flat = torch.cat([t.detach().double().reshape(-1).cpu() for t in tensors])
    return float(torch.linalg.vector_norm(flat, p))


# ----------------------------------------------------------------------------------------------- total norm
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", NORM_TYPES, ids=str)
def test_total_norm_matches_float64(device: str, dtype: torch.dtype, p: float) -> None:
    if dtype == torch.float16 and p < 1:
        pytest.skip("the 0.5-norm of these tensors (~4e7) overflows float16")
    ts = _tensors(device, dtype)
    if math.isinf(p):  # torch refuses the inf-norm of a list holding an empty tensor, and so do we
        with pytest.raises(RuntimeError, match="empty tensor"):
            fusedtrain.get_total_norm(ts, p)
        ts = [t for t in ts if t.numel()]
    got = fusedtrain.get_total_norm(ts, p)
    assert got.dtype == dtype and got.device.type == device and got.dim() == 0
    exact = _exact_norm(ts, p)
    # accumulated in double: only the final rounding to the tensors' dtype remains
    rel = {torch.float64: 1e-12, torch.float32: 2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert abs(float(got) - exact) <= rel * exact
    if dtype in (torch.float32, torch.float64):
        ref = torch.nn.utils.get_total_norm(ts, p) if hasattr(torch.nn.utils, "get_total_norm") else None
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


def test_total_norm_edges() -> None:
    assert float(fusedtrain.get_total_norm([])) == 0.0
    assert float(fusedtrain.get_total_norm([torch.empty(0), torch.empty(3, 0)])) == 0.0
    x = torch.randn(100)
    x[17] = float("nan")
    assert math.isnan(float(fusedtrain.get_total_norm([torch.randn(5), x], math.inf)))
    assert math.isnan(float(fusedtrain.get_total_norm([x], 2.0)))
    y = torch.randn(10)
    y[3] = float("inf")
    assert float(fusedtrain.get_total_norm([y], 2.0)) == math.inf
    # orders the kernel does not take fall back to torch's definition: the norm of the per-tensor norms
    ts = [torch.randn(7), torch.randn(3, 3)]
    for p in (0.0, -math.inf):
        per_tensor = torch.stack([torch.linalg.vector_norm(t, p) for t in ts])
        torch.testing.assert_close(fusedtrain.get_total_norm(ts, p), torch.linalg.vector_norm(per_tensor, p))
    # complex tensors: the 2-norm of |z|
    z = torch.randn(11, dtype=torch.complex64)
    torch.testing.assert_close(fusedtrain.get_total_norm([z]), torch.linalg.vector_norm(z), rtol=1e-6, atol=0)
    # mixed dtypes: one kernel per dtype, combined as torch combines per-tensor norms
    mixed = [torch.randn(50), torch.randn(20, dtype=torch.float64)]
    assert abs(float(fusedtrain.get_total_norm(mixed)) - _exact_norm(mixed, 2.0)) < 1e-5


def test_total_norm_op_errors() -> None:
    with pytest.raises(RuntimeError, match="norm_type must be positive"):
        fusedtrain._ops.total_norm([torch.randn(3)], -1.0)
    with pytest.raises(RuntimeError, match="one device and dtype"):
        fusedtrain._ops.total_norm([torch.randn(3), torch.randn(3, dtype=torch.float64)], 2.0)
    with pytest.raises(RuntimeError, match="empty"):
        fusedtrain._ops.total_norm([], 2.0)
    with pytest.raises(RuntimeError, match="dtype"):
        fusedtrain._ops.total_norm([torch.ones(3, dtype=torch.int64)], 2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_total_norm_opcheck(device: str) -> None:
    ts = [torch.randn(5, device=device), torch.randn(4, 3, device=device).t(), torch.randn((), device=device)]
    torch.library.opcheck(torch.ops.fusedtrain.total_norm.default, (ts, 2.0))
    torch.library.opcheck(torch.ops.fusedtrain.total_norm.default, (ts, math.inf))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [2.0, math.inf, 1.0], ids=str)
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(device: str, p: float, max_norm: float) -> None:
    params = [q for q in make_params(device, torch.float32) if q.numel()]  # torch: no inf-norm of empty
    ref = clone_params(params)
    grads = make_grads(params)
    set_grads(params, grads)
    set_grads(ref, grads)
    got = fusedtrain.clip_grad_norm_(params, max_norm, p)
    want = torch.nn.utils.clip_grad_norm_(ref, max_norm, p)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for a, b in zip(params, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-6, atol=1e-7)


def test_clip_grad_norm_api() -> None:
    w = torch.randn(10, requires_grad=True)
    assert float(fusedtrain.clip_grad_norm_(w, 1.0)) == 0.0  # no grad: torch returns tensor(0.)
    w.grad = torch.full((10,), float("inf"))
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedtrain.clip_grad_norm_([w], 1.0, error_if_nonfinite=True)
    g = torch.randn(10)
    w.grad = g.clone()
    fusedtrain.clip_grad_norm_((q for q in [w]), 0.1)  # any iterable, generators included
    torch.testing.assert_close(w.grad.norm(), torch.tensor(0.1), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------- max_grad_norm
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")][::2],
                         ids=config_id)
def test_max_grad_norm_equals_clip_then_step(device: str, dtype: torch.dtype, cfg: tuple[str, dict[str, Any]]) -> None:
    name, kw = cfg
    params = make_params(device, dtype)
    ref = clone_params(params)
    max_norm = 2.0  # below the gradients' norm (~ sqrt(600)): clipping is active on every step
    opt = ours(name)(params, **kw, max_grad_norm=max_norm)
    ropt = theirs(name)(ref, **torch_kwargs(name, kw))
    for _ in range(8):
        grads = make_grads(params)
        set_grads(params, grads)
        set_grads(ref, grads)
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        ropt.step()
        torch.testing.assert_close(opt.last_grad_norm.to(norm.dtype), norm, rtol=1e-6, atol=0)
        for p, g in zip(params, grads):  # the gradients themselves are not rewritten
            assert torch.equal(p.grad, g.to(p.dtype))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    assert_same_state(opt, params, ropt, ref, **tol)


def test_max_grad_norm_validation() -> None:
    w = [torch.randn(3, requires_grad=True)]
    for bad in (0, -1.0, "1"):
        with pytest.raises(ValueError, match="max_grad_norm"):
            fusedtrain.optim.Adam(w, max_grad_norm=bad)


# ------------------------------------------------------------------------------------------- GradScaler
def _scaler_run(opt_cls: type, kw: dict[str, Any], unscale_and_clip: bool, steps: int = 8,
                inf_steps: tuple[int, ...] = (2, 5)) -> tuple[list[torch.Tensor], torch.optim.Optimizer, float]:
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    params = list(model.parameters())
    opt = opt_cls(params, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3)
    data = torch.Generator().manual_seed(3)
    for i in range(steps):
        x = torch.randn(32, 6, generator=data)
        y = torch.randn(32, 3, generator=data)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if i in inf_steps:
            params[0].grad[0, 0] = float("inf")
        if unscale_and_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 0.5)
        scaler.step(opt)
        scaler.update()
    return params, opt, scaler.get_scale()


@pytest.mark.parametrize("name,kw", [("Adam", dict(lr=0.01)), ("SGD", dict(lr=0.05, momentum=0.9)),
                                     ("RMSprop", dict(lr=0.01)), ("Adagrad", dict(lr=0.05)),
                                     ("AdamW", dict(lr=0.01, amsgrad=True))])
@pytest.mark.parametrize("unscale_and_clip", [False, True])
def test_grad_scaler_matches_torch(name: str, kw: dict[str, Any], unscale_and_clip: bool) -> None:
    assert ours(name)._step_supports_amp_scaling
    p1, o1, s1 = _scaler_run(ours(name), kw, unscale_and_clip)
    p2, o2, s2 = _scaler_run(theirs(name), dict(kw, foreach=False), unscale_and_clip)
    assert s1 == s2  # same growth / backoff: the same steps were skipped
    assert_same_state(o1, p1, o2, p2, rtol=2e-6, atol=2e-7)
    for p in p1:
        if "step" in o1.state[p]:
            assert float(o1.state[p]["step"]) == 8 - 2  # the two inf steps did not count


def test_found_inf_skips_everything_functional() -> None:
    p = [torch.randn(10), torch.randn(3, 3)]
    g = [torch.randn_like(t) for t in p]
    m = [torch.randn_like(t) for t in p]
    v = [torch.rand_like(t) for t in p]
    steps = [torch.tensor(3.0), torch.tensor(3.0)]
    before = [t.clone() for t in p + m + v]
    fusedtrain.optim.functional.adam(p, g, m, v, [], steps, lr=0.1, found_inf=torch.tensor(1.0),
                                     grad_scale=torch.tensor(1024.0))
    assert all(torch.equal(a, b) for a, b in zip(p + m + v, before))
    assert [float(s) for s in steps] == [3.0, 3.0]
    # found_inf = 0 with a scale: the same update as the unscaled gradients
    q = [t.clone() for t in p]
    m2, v2 = [t.clone() for t in m], [t.clone() for t in v]
    fusedtrain.optim.functional.adam(p, [x * 1024 for x in g], m, v, [], steps, lr=0.1,
                                     found_inf=torch.tensor(0.0), grad_scale=torch.tensor(1024.0))
    fusedtrain.optim.functional.adam(q, g, m2, v2, [], [torch.tensor(3.0), torch.tensor(3.0)], lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(p + m + v, q + m2 + v2))


# ------------------------------------------------------------------------------- tensor lr, capturable
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kw", [("Adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
                                     ("SGD", dict(lr=0.05, momentum=0.9)), ("RMSprop", dict(lr=0.01)),
                                     ("Adagrad", dict(lr=0.05, lr_decay=0.01))])
def test_tensor_lr_and_capturable_equal_float_lr(device: str, name: str, kw: dict[str, Any]) -> None:
    kw = dict(kw, lr=2.0 ** -6)  # exactly representable: the float32 tensor holds the same lr
    params = make_params(device, torch.float32)
    a = clone_params(params)
    opt = ours(name)(params, **kw)
    tkw = dict(kw, lr=torch.tensor(kw["lr"], device=device))
    if name in ("Adam", "RMSprop"):
        tkw["capturable"] = True  # step counters on the parameters' device (the CPU here)
    opt_t = ours(name)(a, **tkw)
    for _ in range(6):
        grads = make_grads(params)
        for ps, o in ((params, opt), (a, opt_t)):
            set_grads(ps, grads)
            o.step()
    assert_same_state(opt_t, a, opt, params, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_capturable_steps_live_on_the_device(device: str) -> None:
    params = make_params(device, torch.float32)
    opt = fusedtrain.optim.Adam(params, lr=0.01, capturable=True)
    ref = clone_params(params)
    ropt = torch.optim.Adam(ref, lr=0.01, foreach=False)
    for _ in range(5):
        grads = make_grads(params)
        set_grads(params, grads)
        set_grads(ref, grads)
        opt.step()
        ropt.step()
    for p in params:
        if p.numel():
            step = opt.state[p]["step"]
            assert step.device == p.device and step.dtype == torch.float32 and float(step) == 5
    assert_same_state(opt, params, ropt, ref, rtol=2e-6, atol=2e-7)
    # state_dict round trip keeps the home of the counters
    opt2 = fusedtrain.optim.Adam(clone_params(params), lr=0.01, capturable=True)
    opt2.load_state_dict(opt.state_dict())
    assert all(s["step"].device == torch.device(device) for s in opt2.state.values())


# -------------------------------------------------------------------------------------------- compile
def test_training_step_under_torch_compile_matches_eager() -> None:
    def run(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        opt = fusedtrain.optim.AdamW(model.parameters(), lr=0.01, max_grad_norm=1.0)
        x, y = torch.randn(32, 8), torch.randn(32, 2)

        def train_step() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        for _ in range(4):
            fn()
        return [p.detach().clone() for p in model.parameters()]

    torch._dynamo.reset()
    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------- CUDA-only checks
@pytest.mark.cuda
def test_cuda_found_inf_on_device_needs_no_sync() -> None:
    if not torch.cuda.is_available() or not fusedtrain.has_cuda_kernels():
        pytest.skip("needs a CUDA device and fusedtrain's CUDA kernels")
    params = make_params("cuda", torch.float32)
    opt = fusedtrain.optim.Adam(params, lr=0.01, capturable=True)
    set_grads(params, make_grads(params))
    opt.step()
    before = [p.detach().clone() for p in params]
    set_grads(params, make_grads(params))
    opt.grad_scale = torch.tensor(8.0, device="cuda")
    opt.found_inf = torch.tensor(1.0, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        del opt.grad_scale, opt.found_inf
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(float(s["step"]) == 1 for s in opt.state.values())


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_cuda_graph_capture_replays_like_eager(name: str) -> None:
    if not torch.cuda.is_available() or not fusedtrain.has_cuda_kernels():
        pytest.skip("needs a CUDA device and fusedtrain's CUDA kernels")
    kw: dict[str, Any] = dict(lr=torch.tensor(0.01, device="cuda"))
    if name == "SGD":
        kw["momentum"] = 0.9
    else:
        kw["capturable"] = True
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32).cuda()
    eager = torch.nn.Linear(64, 32).cuda()
    eager.load_state_dict(model.state_dict())
    opt = ours(name)(model.parameters(), **kw, max_grad_norm=1.0)
    eopt = ours(name)(eager.parameters(), **kw, max_grad_norm=1.0)
    xs = [torch.randn(16, 64, device="cuda") for _ in range(6)]
    static_x = xs[0].clone()

    def step(m: torch.nn.Module, o: torch.optim.Optimizer, x: torch.Tensor) -> None:
        o.zero_grad(set_to_none=False)
        m(x).square().mean().backward()
        o.step()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: creates the state outside the graph
            static_x.copy_(xs[0])
            step(model, opt, static_x)
            step(eager, eopt, xs[0])
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, opt, static_x)
    for x in xs[1:]:
        static_x.copy_(x)
        graph.replay()
        step(eager, eopt, x)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------- l1=
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cfg", CONFIGS[1::3], ids=config_id)
def test_l1_equals_sign_term_added_to_the_gradient(device: str, dtype: torch.dtype,
                                                   cfg: tuple[str, dict[str, Any]]) -> None:
    """``l1=`` folds l1*sign(p) into the gradient (after maximize's sign flip, like the weight decay):
    the reference is torch.optim with that term added to .grad by hand (with the sign of maximize)."""
    name, kw = cfg
    l1 = 0.03
    params = make_params(device, dtype)
    for p in params[:2]:
        with torch.no_grad():
            p.zero_()  # sign(0) = 0: exactly-zero parameters get no L1 push
    ref = clone_params(params)
    opt = ours(name)(params, **kw, l1=l1)
    ropt = theirs(name)(ref, **torch_kwargs(name, kw))
    assert opt.param_groups[0]["l1"] == l1 and opt.defaults["l1"] == l1
    sign = -1.0 if kw.get("maximize") else 1.0
    for _ in range(6):
        grads = make_grads(params)
        set_grads(params, grads)
        set_grads(ref, grads)
        for r in ref:
            r.grad += sign * l1 * torch.sign(r.detach())
        opt.step()
        ropt.step()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    assert_same_state(opt, params, ropt, ref, **tol)


def test_l1_validation_and_state_dict() -> None:
    w = [torch.randn(3, requires_grad=True)]
    with pytest.raises(ValueError, match="l1"):
        fusedtrain.optim.SGD(w, lr=0.1, l1=-1.0)
    opt = fusedtrain.optim.Adam([{"params": w, "l1": 0.5}], lr=0.1)
    assert opt.param_groups[0]["l1"] == 0.5 and opt.defaults["l1"] == 0.0
    opt.add_param_group({"params": [torch.randn(2, requires_grad=True)]})
    assert opt.param_groups[1]["l1"] == 0.0
    one_group = fusedtrain.optim.Adam([{"params": w, "l1": 0.5}], lr=0.1)
    torch.optim.Adam(w, lr=0.1).load_state_dict(one_group.state_dict())  # the extra group key is harmless
