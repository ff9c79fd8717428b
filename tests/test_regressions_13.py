"""Regression tests for the defects of issue 13 ("Correct on every path a user takes"), one test (or one
parametrized family) per defect, each asserting what MUST happen. Defects 5 (CUDA-graph capture) and 7
(CUDA architectures) need a GPU or a build and are tested elsewhere."""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import fusedtrain
from _helpers import (OPTIMIZERS, assert_same_state, assert_same_values, clone_params, make_grads, make_params,
                      set_grads, snapshot)


# ================================================================================================ defect 1
# fp16/bf16 parameters + GradScaler + max_grad_norm: the joint norm of the still-scaled gradients must not be
# narrowed to the gradients' dtype inside the step.
_STEPS_1 = 12


class _Net(nn.Module):
    """Two linear layers whose parameters are stored in a low dtype but used in float32 (as autocast would):
    the gradients are float32 gradients rounded once to the parameters' dtype, so the runs below differ
    by the optimizer's arithmetic, not by a half-precision forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = (lambda t: t if t.dtype == torch.float64 else t.float())
        h = torch.tanh(nn.functional.linear(x, up(self.l1.weight), up(self.l1.bias)))
        return nn.functional.linear(h, up(self.l2.weight), up(self.l2.bias))


def _net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return _Net().double().to(dtype)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    # targets of size ~3: the gradients' norm (~1-10) exceeds max_grad_norm = 1, so clipping is active
    return [(torch.randn(32, 8, generator=gen), 3 * torch.randn(32, 4, generator=gen)) for _ in range(_STEPS_1)]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    return nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))


def _fusedtrain_flow(dtype: torch.dtype, scale: float, master: bool) -> tuple[list[torch.Tensor], list[float]]:
    model = _net(dtype)
    opt = fusedtrain.optim.Adam(model.parameters(), lr=5e-2, max_grad_norm=1.0, master_weights=master)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10_000)
    scales = []
    for x, y in _batches():
        opt.zero_grad()
        scaler.scale(_loss(model, x, y)).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return [p.detach().clone() for p in model.parameters()], scales


def _torch_master_flow(dtype: torch.dtype, scale: float, low_storage: bool) -> tuple[list[torch.Tensor], list[float]]:
    """torch's way: a low-precision model computes the scaled gradients, a float32 master copy gets them,
    GradScaler.unscale_ -> clip_grad_norm_ -> scaler.step on the masters, then the model takes the masters
    rounded to its dtype. ``low_storage``: the masters and the optimizer states are rounded to the low dtype
    after every step, which is what updating low-precision parameters and states without master weights
    means (computed in float32, stored rounded to nearest)."""
    model = _net(dtype)
    masters = [p.detach().float().requires_grad_() for p in model.parameters()]
    opt = torch.optim.Adam(masters, lr=5e-2, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10_000)
    scales = []
    for x, y in _batches():
        model.zero_grad()
        opt.zero_grad()
        scaler.scale(_loss(model, x, y)).backward()
        for m, p in zip(masters, model.parameters()):
            m.grad = p.grad.float()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(masters, 1.0, foreach=False)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        with torch.no_grad():
            for m, p in zip(masters, model.parameters()):
                p.copy_(m)
                if low_storage:
                    m.copy_(p)
                    for key, value in opt.state[m].items():
                        if key != "step":
                            value.copy_(value.to(dtype))
    return [p.detach().clone() for p in model.parameters()], scales


def _float64_flow(dtype: torch.dtype, skipped: list[bool]) -> list[torch.Tensor]:
    """The exact trajectory from the same (low-precision) start: float64 model, no scaling (a power-of-two
    scale is exact in float64), clip_grad_norm_ and Adam, skipping the steps GradScaler skipped."""
    model = _net(dtype).double()
    opt = torch.optim.Adam(model.parameters(), lr=5e-2, foreach=False)
    for (x, y), skip in zip(_batches(), skipped):
        if skip:
            continue
        opt.zero_grad()
        _loss(model, x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b)))


@pytest.mark.parametrize("scale_exp", [8, 16, 24])
@pytest.mark.parametrize("master", [True, False], ids=["master", "no_master"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_defect_1_grad_scaler_and_clipping_keep_learning(dtype: torch.dtype, master: bool, scale_exp: int) -> None:
    """GradScaler (2^8 .. 2^24) + max_grad_norm=1 on float16/bfloat16 parameters equals torch's
    unscale_ -> clip_grad_norm_ -> step with a float32 master copy (without master weights: that copy and
    its states rounded to the parameters' dtype after each step).

    Tolerance, from a float64 run of the same steps (same start, same skipped steps): fusedtrain's distance
    to it is at most twice that of torch's flow plus one rounding (eps/2 relative) of every parameter per
    step, in the worst case all adding up (steps * eps/2 * |params|). The test checks that this bound is far
    below the distance the parameters travel, so a run that stops learning (the defect: a clip coefficient
    of 0 from a norm that overflowed float16) cannot pass; and GradScaler must skip the same steps in both."""
    scale = 2.0**scale_exp
    ours, our_scales = _fusedtrain_flow(dtype, scale, master)
    theirs, their_scales = _torch_master_flow(dtype, scale, low_storage=not master)
    assert our_scales == their_scales  # the same steps found inf and were skipped
    skipped = [s < (scale if i == 0 else their_scales[i - 1]) for i, s in enumerate(their_scales)]
    assert not all(skipped)
    exact = _float64_flow(dtype, skipped)
    start = [p.detach() for p in _net(dtype).parameters()]
    n_real = sum(not s for s in skipped)
    floor = n_real * torch.finfo(dtype).eps / 2 * math.sqrt(sum(float(e.pow(2).sum()) for e in exact))
    bound = 2 * _distance(theirs, exact) + floor
    travelled = _distance(start, exact)
    assert travelled > 3 * bound, (travelled, bound)  # the test can tell a stalled run from a good one
    assert _distance(ours, exact) <= bound, (_distance(ours, exact), bound, travelled)


def test_defect_1_fp16_norms_torch_api_vs_the_step() -> None:
    """float16 gradients whose norm exceeds 65504: get_total_norm / clip_grad_norm_ return what torch returns
    (their API gives the norm in the gradients' dtype: inf), while the step's own norm (last_grad_norm)
    stays in float32 or wider, is finite and correct, and the step equals torch's float32-master flow."""
    n = 2**20
    gen = torch.Generator().manual_seed(0)
    c = (2.0**-10 * (1 + 0.25 * torch.rand(n, generator=gen))).half().float()  # exact in float16
    p = torch.zeros(n, dtype=torch.float16, requires_grad=True)
    scale = 2.0**16
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10_000)
    opt = fusedtrain.optim.Adam([p], lr=1e-3, max_grad_norm=1.0, master_weights=True)
    scaler.scale((p.float() * c).sum()).backward()  # p.grad = c * 2^16, ~64..80 per element: ~1e5 jointly
    assert p.grad is not None and bool(torch.isfinite(p.grad).all())
    # torch's API: the norm in float16, i.e. inf
    want = torch.nn.utils.get_total_norm([p.grad], foreach=False)
    assert math.isinf(float(want)) and want.dtype == torch.float16
    got = fusedtrain.get_total_norm([p.grad])
    assert got.dtype == want.dtype and float(got) == float(want)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale  # the step was not skipped
    true_norm = float(torch.linalg.vector_norm(c.double()))  # unscaled: ~1.1
    norm = opt.last_grad_norm
    assert norm is not None and norm.dtype in (torch.float32, torch.float64)
    assert math.isfinite(float(norm)) and abs(float(norm) - true_norm) <= 1e-6 * true_norm
    # the update: torch's float32-master flow
    master = torch.zeros(n, requires_grad=True)
    ref = torch.optim.Adam([master], lr=1e-3, foreach=False)
    master.grad = (c * scale).half().float() / scale
    torch.nn.utils.clip_grad_norm_([master], 1.0, foreach=False)
    ref.step()
    torch.testing.assert_close(opt.state[p]["master_param"], master.detach(), rtol=2e-6, atol=1e-9)
    assert torch.equal(p.detach(), master.detach().half())


# ================================================================================================ defect 2
class _MixedNet(nn.Module):
    """A float32 layer and a bfloat16 layer (master weights / stochastic rounding apply to the latter,
    state_dtype to the former)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)).bfloat16()).float()


# Every fusedtrain option is in one of these (state_dtype is not combined with ema: see
# test_extra_ema_with_bfloat16_states, a separate defect).
_EXTRAS = {
    "master_weights_ema": dict(master_weights=True, ema=True),
    "stochastic_rounding_ema": dict(stochastic_rounding=True, ema=True),
    "master_weights_state_dtype": dict(master_weights=True, state_dtype=torch.bfloat16),
}


_STATEFUL = {"SGD": dict(momentum=0.9)}  # so that SGD has a state to carry


def _roundtrip(obj: Any, how: str) -> Any:
    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _round(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)  # the data, and the stochastic-rounding seed the step draws
    x = torch.randn(5, 6)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch_save"])
@pytest.mark.parametrize("extras", list(_EXTRAS))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_defect_2_copies_keep_fusedtrain_options(name: str, extras: str, how: str) -> None:
    """A copy of (model, optimizer) made by deepcopy, pickle or torch.save/load keeps max_grad_norm, ema,
    master_weights, stochastic_rounding, state_dtype and l1, and then steps exactly like the original; its
    EMA follows the copied model (the copy is stepped first: an EMA still tied to the original model would
    average the original's not-yet-updated weights), and the original's EMA is left alone."""
    torch.manual_seed(0)
    model = _MixedNet()
    kw = dict(_EXTRAS[extras])
    ema = fusedtrain.ensemble.EMA(model, decay=0.8) if kw.pop("ema", False) else None
    opt = getattr(fusedtrain.optim, name)(model.parameters(), lr=1e-2, max_grad_norm=0.05, l1=1e-3, ema=ema, **kw,
                                          **_STATEFUL.get(name, {}))
    for i in range(2):
        _round(model, opt, i)
    model2, opt2 = _roundtrip((model, opt), how)
    for attr in ("max_grad_norm", "master_weights", "stochastic_rounding", "state_dtype"):
        assert getattr(opt2, attr) == getattr(opt, attr), attr
    assert opt2.defaults["l1"] == opt.defaults["l1"] and [g["l1"] for g in opt2.param_groups] == [1e-3]
    if ema is not None:
        assert opt2.ema is not None and opt2.ema is not ema and opt2.ema.num_updates == ema.num_updates == 2
        assert opt2.ema.decay == ema.decay
        ema_before = copy.deepcopy(ema.module.state_dict())
    else:
        assert opt2.ema is None
    for i in range(2, 5):
        _round(model2, opt2, i)
    if ema is not None:
        assert_same_values(ema_before, ema.module.state_dict(), "the original's EMA")
    for i in range(2, 5):
        _round(model, opt, i)
    assert_same_values([p.detach() for p in model.parameters()], [p.detach() for p in model2.parameters()], "params")
    assert_same_values(snapshot(opt, list(model.parameters())), snapshot(opt2, list(model2.parameters())), "state")
    if ema is not None:
        assert_same_values(ema.module.state_dict(), opt2.ema.module.state_dict(), "EMA")
        assert opt2.ema.num_updates == ema.num_updates == 5
    assert opt2.last_grad_norm is not None and float(opt2.last_grad_norm) == float(opt.last_grad_norm)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch_save"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_defect_2_optimizer_alone_copies_step_like_the_original(name: str, how: str) -> None:
    """The optimizer alone (its parameters are copied with it): the copy, fed the same gradients, takes
    the original's steps (clipped, with L1, master weights and bfloat16 states)."""
    torch.manual_seed(0)
    model = _MixedNet()
    opt = getattr(fusedtrain.optim, name)(model.parameters(), lr=1e-2, max_grad_norm=0.05, l1=1e-3,
                                          **_EXTRAS["master_weights_state_dtype"], **_STATEFUL.get(name, {}))
    _round(model, opt, 0)
    opt2 = _roundtrip(opt, how)
    params = list(model.parameters())
    params2 = [p for g in opt2.param_groups for p in g["params"]]
    assert opt2.max_grad_norm == 0.05 and opt2.master_weights and opt2.state_dtype == torch.bfloat16
    for i in range(1, 4):
        torch.manual_seed(i)
        x = torch.randn(5, 6)
        opt.zero_grad()
        model(x).square().mean().backward()
        for p, q in zip(params, params2):
            q.grad = p.grad.clone()
        opt2.step()
        opt.step()
    assert_same_values(snapshot(opt, params), snapshot(opt2, params2))


# ================================================================================================ defect 3
@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_defect_3_last_grad_norm_under_torch_compile(backend: str) -> None:
    """A compiled training step with max_grad_norm sets last_grad_norm at every step, equal to eager's."""
    def run(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        opt = fusedtrain.optim.AdamW(model.parameters(), lr=0.01, max_grad_norm=0.5)
        gen = torch.Generator().manual_seed(1)
        data = [(torch.randn(32, 8, generator=gen), torch.randn(32, 2, generator=gen)) for _ in range(4)]

        def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(train_step, backend=backend) if compiled else train_step
        norms = []
        for x, y in data:
            fn(x, y)
            assert opt.last_grad_norm is not None
            norms.append(float(opt.last_grad_norm))
        return norms

    torch._dynamo.reset()
    try:
        compiled = run(True)
    finally:
        torch._dynamo.reset()
    eager = run(False)
    assert len(set(eager)) == len(eager)  # a stale value would repeat
    for c, e in zip(compiled, eager):
        assert abs(c - e) <= 1e-6 * e, (compiled, eager)


# ================================================================================================ defect 4
class _BNNet(nn.Module):
    def __init__(self, with_bf16: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.frozen = nn.Parameter(torch.randn(8), requires_grad=False)
        self.head = nn.Linear(8, 2).to(torch.bfloat16) if with_bf16 else nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.lin(x)) + self.frozen
        return self.head(h.to(self.head.weight.dtype)).float()


@pytest.mark.parametrize("with_bf16", [False, True], ids=["fused_ema", "fused_and_master_weights"])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_defect_4_skipped_step_changes_nothing_with_ema(name: str, with_bf16: bool) -> None:
    """A step GradScaler skips (an inf gradient) changes no parameter, no average (those the kernel fuses,
    the frozen parameter's, the BatchNorm buffers' averages), no buffer, not ema.num_updates, no state."""
    torch.manual_seed(0)
    model = _BNNet(with_bf16)
    ema = fusedtrain.ensemble.EMA(model, decay=0.9)
    kw = dict(momentum=0.9) if name == "SGD" else {}
    opt = getattr(fusedtrain.optim, name)(model.parameters(), lr=1e-2, ema=ema, master_weights=with_bf16, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    params = list(model.parameters())

    def step(inject_inf: bool) -> None:
        opt.zero_grad()
        scaler.scale(model(torch.randn(16, 6)).square().mean()).backward()
        if inject_inf:
            model.lin.weight.grad[0, 0] = float("inf")
        before = (snapshot(opt, params), [t.detach().clone() for t in model.buffers()],
                  copy.deepcopy(ema.module.state_dict()), ema.num_updates)
        scaler.step(opt)
        scaler.update()
        if inject_inf:
            after = (snapshot(opt, params), [t.detach().clone() for t in model.buffers()],
                     copy.deepcopy(ema.module.state_dict()), ema.num_updates)
            assert_same_values(before, after, "skipped step")

    for i in range(5):
        step(inject_inf=i in (2, 3))
    assert ema.num_updates == 3 and scaler.get_scale() == 2.0**6


# ================================================================================================ defect 6
_SPARSE_CONFIGS = [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1)),
                   ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
                   ("Adagrad", dict(lr=0.1)),
                   ("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, maximize=True))]


@pytest.mark.parametrize("name,kw", _SPARSE_CONFIGS, ids=[f"{n}-{'-'.join(k)}" for n, k in _SPARSE_CONFIGS])
def test_defect_6_sparse_embedding_matches_torch(name: str, kw: dict[str, Any]) -> None:
    """nn.Embedding(sparse=True) (and a dense layer in the same optimizer): fusedtrain's SGD and Adagrad
    step like torch.optim's, repeated indices included."""
    def run(cls: type) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        torch.manual_seed(0)
        emb, lin = nn.Embedding(50, 4, sparse=True).double(), nn.Linear(4, 1).double()
        params = list(emb.parameters()) + list(lin.parameters())
        opt = cls(params, **kw, **({"foreach": False} if cls.__module__.startswith("torch") else {}))
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            idx = torch.randint(0, 50, (12,), generator=gen)
            opt.zero_grad()
            lin(emb(idx)).square().sum().backward()
            assert emb.weight.grad is not None and emb.weight.grad.is_sparse
            opt.step()
        return params, opt

    pa, a = run(getattr(fusedtrain.optim, name))
    pb, b = run(getattr(torch.optim, name))
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
        assert set(a.state[x]) == set(b.state[y])
        for key, value in b.state[y].items():
            mine = a.state[x][key]
            if key == "step":
                assert float(mine) == float(value)
            else:  # (torch keeps SGD's momentum buffer sparse for sparse gradients: compare the values)
                torch.testing.assert_close(_dense(mine), _dense(value), rtol=1e-12, atol=1e-12)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, weight_decay=0.1)),
                                     ("Adagrad", dict(lr=0.1, weight_decay=0.1))])
def test_defect_6_sparse_options_torch_refuses(name: str, kw: dict[str, Any]) -> None:
    """weight_decay with sparse gradients: torch refuses (RuntimeError); so does fusedtrain, changing nothing."""
    emb, ref = nn.Embedding(10, 3, sparse=True), nn.Embedding(10, 3, sparse=True)
    for m in (emb, ref):
        m(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError) as theirs:
        getattr(torch.optim, name)(ref.parameters(), **kw, foreach=False).step()
    opt = getattr(fusedtrain.optim, name)(emb.parameters(), **kw)
    before = snapshot(opt, [emb.weight])
    with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
        opt.step()
    assert_same_values(before, snapshot(opt, [emb.weight]))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_defect_6_tensor_hyperparameters_with_foreach(name: str) -> None:
    """lr (and Adam's betas) as tensors with foreach=True and capturable=False: fusedtrain validates like
    torch (torch.optim.Adam/AdamW raise ValueError with this message; SGD, Adagrad, RMSprop accept it)."""
    cases: list[dict[str, Any]] = [dict(lr=torch.tensor(0.01), foreach=True)]
    if name in ("Adam", "AdamW"):
        cases.append(dict(lr=0.01, betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True))
    for kw in cases:
        p = [nn.Parameter(torch.randn(3))]
        try:
            getattr(torch.optim, name)(p, **copy.deepcopy(kw))
        except ValueError as e:
            with pytest.raises(ValueError, match=re.escape(str(e))):
                getattr(fusedtrain.optim, name)(p, **copy.deepcopy(kw))
        else:
            opt = getattr(fusedtrain.optim, name)(p, **copy.deepcopy(kw))
            p[0].grad = torch.randn(3)
            opt.step()
    if name in ("Adam", "AdamW"):  # and the message is torch's exactly
        with pytest.raises(ValueError, match=r"^lr as a Tensor is not supported for capturable=False and "
                                             r"foreach=True$"):
            getattr(fusedtrain.optim, name)([nn.Parameter(torch.randn(3))], lr=torch.tensor(0.01), foreach=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_defect_6_meta_parameters_step_like_torch(name: str) -> None:
    """Parameters on the meta device (model building): step() works as in torch, creating the state torch
    creates (keys, shapes, dtypes, devices, step counts)."""
    kw: dict[str, Any] = dict(lr=0.01)
    if name == "SGD":
        kw["momentum"] = 0.9
    if name == "RMSprop":
        kw.update(centered=True, momentum=0.5)
    if name in ("Adam", "AdamW"):
        kw["amsgrad"] = True
    if name == "ASGD":
        # torch.optim.ASGD reads its eta with .item(), which meta tensors refuse; fusedtrain steps meta
        # parameters with torch's implementation, so it raises torch's error
        with torch.device("meta"):
            layer = nn.Linear(5, 7)
        layer(torch.empty(4, 5, device="meta")).sum().backward()
        for cls in (torch.optim.ASGD, fusedtrain.optim.ASGD):
            with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
                cls(layer.parameters(), **kw, foreach=False).step()
        return
    runs = []
    for cls, extra in ((getattr(fusedtrain.optim, name), {}), (getattr(torch.optim, name), {"foreach": False})):
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 2))
        opt = cls(model.parameters(), **kw, **extra)
        for _ in range(3):
            model(torch.empty(4, 5, device="meta")).sum().backward()
            opt.step()
            opt.zero_grad()
        runs.append((list(model.parameters()), opt))
    (pa, a), (pb, b) = runs
    for x, y in zip(pa, pb):
        assert x.device.type == "meta"
        assert set(a.state[x]) == set(b.state[y])
        for key, value in b.state[y].items():
            mine = a.state[x][key]
            assert (mine.device, mine.dtype, mine.shape) == (value.device, value.dtype, value.shape), key
            if key == "step":
                assert float(mine) == float(value) == 3.0


# ================================================================================================ defect 8
def _dup_runs(name: str, kw: dict[str, Any], make: Callable[[], torch.Tensor]) -> list[list[torch.Tensor]]:
    outs = []
    ours = [(getattr(fusedtrain.optim, name), {})] * 3  # three runs: a race shows as differing bits
    for cls, extra in ours + [(getattr(torch.optim, name), {"foreach": False})]:
        torch.manual_seed(0)
        p = make()
        q = nn.Parameter(torch.randn(7))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the duplicate; the test is about the result
            opt = cls([{"params": [p, q, p]}], **kw, **extra)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = torch.randn(q.shape, generator=gen)
            opt.step()
        state = [opt.state[p][k] for k in sorted(opt.state[p])]
        outs.append([p.detach().clone(), q.detach().clone(), *state])
    return outs


_DUP_KW = {"SGD": dict(lr=0.1, momentum=0.9), "Adagrad": dict(lr=0.1), "RMSprop": dict(lr=0.01, centered=True),
           "Adam": dict(lr=0.01), "AdamW": dict(lr=0.01, amsgrad=True), "NAdam": dict(lr=0.01)}
# torch.optim's other element-wise optimizers (issue 15)
_DUP_KW.update({"RAdam": dict(lr=0.01), "Adamax": dict(lr=0.01), "Adadelta": dict(lr=0.5),
                "ASGD": dict(lr=0.01, t0=1), "Rprop": dict(lr=0.01)})


@pytest.mark.parametrize("layout", ["large", "strided"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_defect_8_duplicate_parameter_matches_torch(name: str, layout: str) -> None:
    """A parameter listed twice in a group: torch warns and applies two updates (state advanced twice);
    fusedtrain gives torch's result, on a large tensor (2^20 elements, split across threads) and on a strided
    view, and the same bits run to run (no race)."""
    def make() -> torch.Tensor:
        if layout == "large":
            return nn.Parameter(torch.randn(2**20))
        base = torch.randn(64, 96)
        return base[:, ::3].detach().requires_grad_()  # a leaf with strides (96, 3)

    with pytest.warns(UserWarning, match="duplicate parameters"):
        getattr(fusedtrain.optim, name)([{"params": [make()] * 2}], **_DUP_KW[name])
    first, second, third, ref = _dup_runs(name, _DUP_KW[name], make)
    assert_same_values(first, second, "run to run")
    assert_same_values(first, third, "run to run")
    assert len(first) == len(ref)
    for x, y in zip(first, ref):
        if x.dim() == 0:
            assert float(x) == float(y)
        else:
            torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_defect_8_expanded_parameter_is_refused_before_anything_changes(name: str) -> None:
    """An expanded (stride-0) parameter cannot be updated in place: the step is refused, and no other
    parameter (in any group) and no state entry has changed."""
    params = make_params("cpu", torch.float32)
    expanded = torch.randn(1, 6).expand(5, 6).requires_grad_()
    opt = getattr(fusedtrain.optim, name)([{"params": params[:4]}, {"params": params[4:] + [expanded]}], lr=0.01)
    set_grads(params, make_grads(params))
    opt.step()  # the expanded parameter has no gradient yet: state exists for the others
    set_grads(params, make_grads(params))
    expanded.grad = torch.randn(5, 6)
    everything = params + [expanded]
    before = snapshot(opt, everything)
    with pytest.raises(RuntimeError):
        opt.step()
    assert_same_values(before, snapshot(opt, everything))


_GROUP_1_PARAM_0 = (re.compile(r"group\S*\s*\[?\s*1\b", re.IGNORECASE),
                    re.compile(r"param\w*'?\]?\s*\[?\s*0\b", re.IGNORECASE))


@pytest.mark.parametrize("change", ["dtype", "shape"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_defect_8_changed_gradient_is_refused_before_any_group(name: str, change: str) -> None:
    """A gradient whose dtype or shape changed after the first step (the checks are cached): the step is
    refused before any group is updated, and the message names the group and the parameter index (e.g.
    ``param_groups[1]['params'][0]``)."""
    params = make_params("cpu", torch.float32)
    opt = getattr(fusedtrain.optim, name)([{"params": params[:4]}, {"params": params[4:]}], lr=0.01)
    for _ in range(2):
        set_grads(params, make_grads(params))
        opt.step()
    set_grads(params, make_grads(params))
    victim = opt.param_groups[1]["params"][0]
    assert victim.grad is not None
    if change == "dtype":
        victim.grad.data = victim.grad.data.double()
    else:
        victim.grad.data = torch.randn(victim.numel() + 3)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError) as err:
        opt.step()
    message = str(err.value)
    assert all(r.search(message) for r in _GROUP_1_PARAM_0), message
    assert_same_values(before, snapshot(opt, params))


def test_defect_8_zero_norm_of_one_tensor_is_torchs() -> None:
    """get_total_norm([g], 0): torch takes the 0-"norm" of the per-tensor norms, 1.0 for one non-zero
    tensor (not the count of its non-zero elements); with several tensors, the number of non-zero tensors."""
    g = torch.randn(10)
    g[3] = 0
    for ts in ([g], [g, torch.zeros(4)], [g, torch.randn(5)], g):
        want = torch.nn.utils.get_total_norm(ts, 0.0, foreach=False)
        got = fusedtrain.get_total_norm(ts, 0.0)
        assert got.dtype == want.dtype and float(got) == float(want), (float(got), float(want))


def test_defect_8_inf_norm_of_an_empty_tensor_raises_like_torch() -> None:
    """torch refuses the +-inf norm of an empty tensor (no identity for max/min); fusedtrain raises too."""
    for p in (math.inf, -math.inf):
        ts = [torch.randn(3), torch.empty(0)]
        with pytest.raises(RuntimeError):
            torch.nn.utils.get_total_norm(ts, p, foreach=False)
        with pytest.raises(RuntimeError):
            fusedtrain.get_total_norm(ts, p)


# ================================================================================================ defect 9
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_defect_9_every_class_accepts_foreach_and_fused(name: str) -> None:
    """foreach= and fused= are accepted by every class (RMSprop(fused=True) included) and change nothing
    in the result; both True is torch's RuntimeError."""
    pa = make_params("cpu", torch.float64)
    pb = clone_params(pa)
    ref = getattr(torch.optim, name)(pb, lr=0.01, foreach=False)
    runs = []
    for foreach, fused in [(None, None), (False, False), (True, None), (None, True), (False, True), (True, False)]:
        params = clone_params(pa)
        runs.append((getattr(fusedtrain.optim, name)(params, lr=0.01, foreach=foreach, fused=fused), params))
    for _ in range(3):
        grads = make_grads(pa)
        set_grads(pb, grads)
        ref.step()
        for opt, params in runs:
            set_grads(params, grads)
            opt.step()
    for opt, params in runs:
        assert_same_state(opt, params, ref, pb, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        getattr(fusedtrain.optim, name)(clone_params(pa), foreach=True, fused=True)


# ============================================================= found while writing these tests (not in the issue)
@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad", "SGD"])
def test_extra_ema_with_bfloat16_states(name: str) -> None:
    """ema= together with state_dtype=torch.bfloat16 (two documented options): today the step raises
    "ema_params cannot be fused with low-precision states". It must work and equal the same optimizer
    without ema followed by ema.update()."""
    kw: dict[str, Any] = dict(lr=1e-2, state_dtype=torch.bfloat16, **_STATEFUL.get(name, {}))
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        ema = fusedtrain.ensemble.EMA(model, decay=0.9)
        opt = getattr(fusedtrain.optim, name)(model.parameters(), ema=ema if fused else None, **kw)
        for i in range(3):
            _round(model, opt, i)
            if not fused:
                ema.update()
        results.append(([p.detach() for p in model.parameters()], ema.module.state_dict(), ema.num_updates))
    assert_same_values(results[0], results[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_extra_adagrad_master_weights_keep_the_initial_accumulator_exact(dtype: torch.dtype) -> None:
    """Adagrad(master_weights=True, initial_accumulator_value=0.1) on low-precision parameters keeps its
    states in float32, but today the float32 ``sum`` starts from 0.1 rounded to the parameters' dtype
    (torch's constructor fills it in p.dtype first): the master trajectory is then not torch's float32
    one. The float32 state must start at float32(0.1) and the masters follow torch.optim.Adagrad in float32."""
    torch.manual_seed(0)
    p = torch.randn(64).to(dtype).requires_grad_()
    q = p.detach().float().requires_grad_()
    opt = fusedtrain.optim.Adagrad([p], lr=0.1, initial_accumulator_value=0.1, master_weights=True)
    ref = torch.optim.Adagrad([q], lr=0.1, initial_accumulator_value=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(64).to(dtype)
        p.grad, q.grad = g.clone(), g.float()
        opt.step()
        ref.step()
    assert opt.state[p]["sum"].dtype == torch.float32
    torch.testing.assert_close(opt.state[p]["sum"], ref.state[q]["sum"], rtol=2e-6, atol=0)
    torch.testing.assert_close(opt.state[p]["master_param"], q.detach(), rtol=2e-6, atol=1e-7)
