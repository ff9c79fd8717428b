"""The cached step plan (csrc/plan.cpp, Note [step plan]): every change that invalidates it makes the next
step correct, and the steps that do not change anything reuse it. Each case runs a fusedtrain optimizer and
torch.optim (foreach=False) side by side through the same change and compares parameters and state."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import fusedtrain
from _helpers import assert_same_state

CASES = [("Adam", dict(lr=0.01, amsgrad=True)), ("SGD", dict(lr=0.05, momentum=0.9)),
         ("RMSprop", dict(lr=0.01, centered=True)), ("Adagrad", dict(lr=0.05)), ("AdamW", dict(lr=0.01))]
TOL = dict(rtol=1e-12, atol=1e-12)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


class Pair:
    """A fusedtrain optimizer and torch's on two copies of one model, stepped with the same gradients."""

    def __init__(self, name: str, kw: dict[str, Any]) -> None:
        self.name, self.kw = name, kw
        self.a, self.b = _model(), _model()
        self.oa = getattr(fusedtrain.optim, name)(self.a.parameters(), **kw)
        self.ob = getattr(torch.optim, name)(self.b.parameters(), **kw, foreach=False)
        self.gen = torch.Generator().manual_seed(1)

    def grads(self, set_to_none: bool = True, skip: Callable[[int], bool] = lambda i: False) -> None:
        for i, (p, q) in enumerate(zip(self.a.parameters(), self.b.parameters())):
            if skip(i):
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, dtype=p.dtype, generator=self.gen)
            if set_to_none or p.grad is None:
                p.grad, q.grad = g.clone(), g.clone()
            else:  # the same gradient tensors stay (zero_grad(set_to_none=False)): written in place
                p.grad.copy_(g)
                q.grad.copy_(g)

    def step(self, n: int = 1, **grad_kw: Any) -> None:
        for _ in range(n):
            self.grads(**grad_kw)
            self.oa.step()
            self.ob.step()

    def check(self) -> None:
        assert_same_state(self.oa, list(self.a.parameters()), self.ob, list(self.b.parameters()), **TOL)

    def plan(self) -> Any:
        return self.oa.__dict__.get("_ft_plan")


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_steady_steps_reuse_the_plan(name: str, kw: dict[str, Any]) -> None:
    """New gradient tensors every step (zero_grad(set_to_none=True)) or the same ones: no rebuild."""
    t = Pair(name, kw)
    t.step(2)
    plan = t.plan()
    assert plan is not None
    t.step(3)
    t.step(3, set_to_none=False)
    assert t.plan() is plan
    t.check()


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_invalidations(name: str, kw: dict[str, Any]) -> None:
    t = Pair(name, kw)
    t.step(2)
    # grads vanishing and appearing: the first layer's weight has no gradient for two steps
    t.step(2, skip=lambda i: i == 0)
    t.step(1)
    t.check()
    # add_param_group
    extra_a = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    extra_b = torch.nn.Parameter(extra_a.detach().clone())
    t.oa.add_param_group({"params": [extra_a], "lr": 0.02})
    t.ob.add_param_group({"params": [extra_b], "lr": 0.02})
    t.a.register_parameter("extra", extra_a)
    t.b.register_parameter("extra", extra_b)
    t.step(2)
    t.check()
    # a parameter's .data replaced (same object, new memory), and torch.utils.swap_tensors
    pa, pb = t.a[0].weight, t.b[0].weight
    with torch.no_grad():
        new = torch.randn(pa.shape, dtype=pa.dtype)
        pa.data = new.clone()
        pb.data = new.clone()
    t.step(2)
    t.check()
    if hasattr(torch.utils, "swap_tensors"):
        for p in (t.a[2].bias, t.b[2].bias):
            torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().clone() + 1))
        t.step(2)
        t.check()
    # load_state_dict: the fusedtrain optimizer continues from torch's state
    t.oa.load_state_dict(copy.deepcopy(t.ob.state_dict()))  # (torch loads tensors without copying)
    t.step(2)
    t.check()
    # a state tensor's .data replaced (a common "move the optimizer state" recipe), and a dict entry replaced
    for opt in (t.oa, t.ob):
        for state in opt.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    value.data = value.data.clone()
    t.step(2)
    t.check()
    for opt in (t.oa, t.ob):
        for state in opt.state.values():
            for key in list(state):
                if key != "step":
                    state[key] = state[key].clone()
    t.step(2)
    t.check()
    # the step counters (Note [cached step counters]): written in place, their .data replaced (a counter
    # moved back by 3), a counter replaced in the dict; and entries set to themselves (Note [dict version
    # tags]: a new tag, the same items)
    for opt in (t.oa, t.ob):
        for state in opt.state.values():
            if "step" in state:
                state["step"].add_(1)
    t.step(1)
    t.check()
    for opt in (t.oa, t.ob):
        for state in opt.state.values():
            if "step" in state:
                state["step"].data = state["step"].data - 3
    t.step(2)
    t.check()
    for opt in (t.oa, t.ob):
        for state in opt.state.values():
            if "step" in state:
                state["step"] = state["step"].clone() + 2
    t.step(2)
    t.check()
    plan = t.plan()
    for opt in (t.oa, t.ob):
        for state in opt.state.values():
            for key in list(state):
                state[key] = state[key]
    t.step(2)
    assert t.plan() is plan  # same items: validated by a walk, no rebuild
    t.check()
    # hyperparameters changed in the groups (a scheduler) reach the kernels without a rebuild
    plan = t.plan()
    for opt in (t.oa, t.ob):
        for group in opt.param_groups:
            group["lr"] *= 0.5
    t.step(2)
    assert t.plan() is plan
    t.check()


def test_module_to_and_dtype_change() -> None:
    """Module.to() (a new dtype: new parameter memory) and a gradient that changes dtype with it."""
    t = Pair("Adam", dict(lr=0.01))
    t.step(2)
    for m in (t.a, t.b):
        m.float()
    for opt in (t.oa, t.ob):  # torch's state follows the parameters' dtype only through load_state_dict
        opt.load_state_dict(opt.state_dict())
    t.step(3)
    assert_same_state(t.oa, list(t.a.parameters()), t.ob, list(t.b.parameters()), rtol=1e-6, atol=1e-6)


def test_gradient_of_the_wrong_dtype_after_the_plan_is_refused_before_any_update() -> None:
    """The per-parameter checks of a cached plan are redone in C++ every step, for every group, before the
    first write; the error names the parameter."""
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(4))
    opt = fusedtrain.optim.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.randn(3), torch.randn(4)
    opt.step()
    before = copy.deepcopy((a.detach(), b.detach(), opt.state_dict()["state"]))
    if hasattr(b, "grad_dtype"):
        b.grad_dtype = None
    b.grad = torch.randn(4, dtype=torch.float64)
    a.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\]: its gradient \(Double"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    for idx, entry in before[2].items():
        for key, value in entry.items():
            assert torch.equal(opt.state_dict()["state"][idx][key], value)


def test_parameter_listed_twice_is_updated_twice_like_torch() -> None:
    """torch warns about a duplicate and applies both updates in order; so do we, one pass after the
    other (never two threads on the same memory), on a tensor large enough to be split between threads."""
    torch.manual_seed(3)
    big = torch.randn(1 << 20, dtype=torch.float64)
    small = torch.randn(7, 5, dtype=torch.float64)[:, ::2]  # strided: goes through a temporary
    results = []
    for cls in (fusedtrain.optim.Adam, torch.optim.Adam):
        ps = [torch.nn.Parameter(big.clone()), torch.nn.Parameter(small.clone())]
        with pytest.warns(UserWarning, match="duplicate"):
            opt = cls([ps[0], ps[1], ps[0], ps[1]], lr=0.01, **({} if cls is fusedtrain.optim.Adam
                                                              else {"foreach": False}))
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)
            opt.step()
        results.append((ps, opt))
    (pa, oa), (pb, ob) = results
    assert_same_state(oa, pa, ob, pb, **TOL)
    assert float(oa.state[pa[0]]["step"]) == 6.0


def test_the_step_does_o1_python_work_per_group() -> None:
    """The steady-state step calls no per-parameter Python: count Python function calls with a profiler."""
    import cProfile
    import pstats

    def calls(n: int) -> int:
        ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]
        for p in ps:
            p.grad = torch.randn(3)
        opt = fusedtrain.optim.Adam(ps, lr=0.1, max_grad_norm=1.0)
        opt.step()
        prof = cProfile.Profile()
        prof.enable()
        opt.step()
        prof.disable()
        return sum(stat[1] for stat in pstats.Stats(prof).stats.values())  # type: ignore[attr-defined]

    assert calls(10) == calls(1000)


def test_plan_check_reports_moved_gradients() -> None:
    """The check CapturedStep runs before a replay: 1 when every gradient sits where it sat at the last
    update, 2 when one moved (new gradient tensors), 0 when the plan is stale."""
    ps = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn(5)
    opt = fusedtrain.optim.Adam(ps, lr=0.1)
    opt.step()
    plan = opt.__dict__["_ft_plan"].impl
    args = ([g["params"] for g in opt.param_groups], opt.state)
    assert plan.check(*args) == 1
    for p in ps:
        p.grad.copy_(torch.randn(5))  # same memory
    assert plan.check(*args) == 1
    ps[1].grad = torch.randn(5)  # new memory
    assert plan.check(*args) == 2
    ps[2].grad = None
    assert plan.check(*args) == 0


def _captured_run(device: str, captured: bool, n_steps: int = 24) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(device)
    ema = fusedtrain.ensemble.EMA(model, decay=0.9, warmup=5)
    opt = fusedtrain.optim.AdamW(model.parameters(), lr=0.01, max_grad_norm=0.5, ema=ema, capturable=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10, growth_interval=4)
    step = fusedtrain.optim.CapturedStep(opt, scaler, warmup=2) if captured else None
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 16, generator=gen).to(device) for _ in range(n_steps)]
    static_x = xs[0].clone()
    for i, x in enumerate(xs):
        opt.zero_grad(set_to_none=False)
        static_x.copy_(x)
        scaler.scale(model(static_x).square().mean()).backward()
        if i in (7, 15):  # GradScaler skips these steps (and the EMA must not move)
            next(model.parameters()).grad[0, 0] = float("inf")
        if step is not None:
            step()
        else:
            scaler.step(opt)
            scaler.update()
        sched.step()
    return [p.detach().cpu() for p in list(model.parameters()) + list(ema.module.parameters())] + \
        [torch.tensor(float(ema.num_updates)), torch.tensor(scaler.get_scale())]


def test_captured_step_on_the_cpu_is_the_eager_step() -> None:
    for a, b in zip(_captured_run("cpu", True), _captured_run("cpu", False)):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_captured_step_replays_like_the_eager_step() -> None:
    """24 steps with an LR scheduler, GradScaler (two skipped steps), clipping and an EMA with warm-up:
    the replayed graph gives the eager result."""
    if not torch.cuda.is_available() or not fusedtrain.has_cuda_kernels():
        pytest.skip("needs a CUDA device and fusedtrain's CUDA kernels")
    for a, b in zip(_captured_run("cuda", True), _captured_run("cuda", False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_captured_step_recaptures_after_a_change() -> None:
    if not torch.cuda.is_available() or not fusedtrain.has_cuda_kernels():
        pytest.skip("needs a CUDA device and fusedtrain's CUDA kernels")
    model = torch.nn.Linear(8, 8).cuda()
    opt = fusedtrain.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = fusedtrain.optim.CapturedStep(opt, warmup=1)
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        model(torch.randn(4, 8, device="cuda")).sum().backward()
        step()
    graph = step._graph
    assert graph is not None
    opt.param_groups[0]["momentum"] = 0.5  # baked into the graph: the next step must not replay it
    model(torch.randn(4, 8, device="cuda")).sum().backward()
    step()
    assert step._graph is not graph
    with pytest.warns(UserWarning, match="gradients moved"):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(4, 8, device="cuda")).sum().backward()
            step()
