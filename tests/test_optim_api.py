"""torch.optim conventions: state_dict interchange, resume, schedulers, hooks, closures, errors."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch

import fusedtrain
from _helpers import (CONFIGS, OPTIMIZERS, assert_same_state, clone_params, config_id, make_grads, make_params,
                      ours, set_grads, step_together, theirs, torch_kwargs)
from conftest import DEVICES


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads_seq: list[list[torch.Tensor]]) -> None:
    for grads in grads_seq:
        set_grads(params, grads)
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_state_dict_round_trips_with_torch(cfg, device: str) -> None:
    """ours -> torch and torch -> ours: the loaded optimizer continues the trajectory of the original, and
    exactly as torch's own optimizer loaded with the same state dict does (torch's load_state_dict casts
    floating state to the parameters' dtype: NAdam's float32 mu_product becomes float64 here, on both sides)."""
    name, kw = cfg
    pa = make_params(device, torch.float64)
    grads_seq = [make_grads(pa) for _ in range(8)]
    for first, second in ((ours, theirs), (theirs, ours)):
        p1 = clone_params(pa)
        kw1 = kw if first is ours else torch_kwargs(name, kw)
        kw2 = kw if second is ours else torch_kwargs(name, kw)
        o1 = first(name)(p1, **kw1)
        _run(o1, p1, grads_seq[:4])
        p2, p3 = clone_params(p1), clone_params(p1)
        o2 = second(name)(p2, **kw2)
        o3 = theirs(name)(p3, **torch_kwargs(name, kw))
        state = o1.state_dict()
        o2.load_state_dict(copy.deepcopy(state))
        o3.load_state_dict(copy.deepcopy(state))
        for o, p in ((o1, p1), (o2, p2), (o3, p3)):
            _run(o, p, grads_seq[4:])
        assert_same_state(o2, p2, o3, p3, rtol=1e-12, atol=1e-12)
        assert_same_state(o2, p2, o1, p1, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_is_bit_exact(name: str) -> None:
    """Save (through torch.save) after 5 steps, load into a new optimizer: bit-for-bit the same path."""
    kw = dict(next(k for n, k in CONFIGS[::-1] if n == name))
    pa = make_params("cpu", torch.float32)
    grads_seq = [make_grads(pa) for _ in range(10)]
    a = ours(name)(pa, **kw)
    _run(a, pa, grads_seq[:5])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    pb = clone_params(pa)
    b = ours(name)(pb, **kw)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    _run(a, pa, grads_seq[5:])
    _run(b, pb, grads_seq[5:])
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_lr_scheduler_and_param_groups(name: str) -> None:
    """Two param groups with their own lr, driven by a torch scheduler, match torch.optim."""
    pa = make_params("cpu", torch.float64)
    pb = clone_params(pa)

    def groups(ps):
        return [{"params": ps[:4]}, {"params": ps[4:], "lr": 0.003}]

    a, b = ours(name)(groups(pa), lr=0.01), theirs(name)(groups(pb), lr=0.01, foreach=False)
    sa = torch.optim.lr_scheduler.StepLR(a, step_size=2, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(b, step_size=2, gamma=0.5)
    step_together([(a, pa), (b, pb)], 7, after_step=lambda: (sa.step(), sb.step()))
    assert [g["lr"] for g in a.param_groups] == [g["lr"] for g in b.param_groups]
    assert_same_state(a, pa, b, pb, rtol=1e-12, atol=1e-12)


def test_add_param_group_grad_none_and_frozen() -> None:
    lin = torch.nn.Linear(4, 3)
    frozen = torch.nn.Parameter(torch.randn(5), requires_grad=False)
    no_grad = torch.nn.Parameter(torch.randn(6))
    opt = fusedtrain.optim.Adam([*lin.parameters(), frozen, no_grad], lr=0.1)
    extra = torch.nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    before = no_grad.detach().clone(), frozen.detach().clone()
    lin(torch.randn(2, 4)).sum().backward()
    extra.grad = torch.randn(3)
    opt.step()
    assert torch.equal(no_grad, before[0]) and torch.equal(frozen, before[1])
    assert no_grad not in opt.state and frozen not in opt.state
    assert float(opt.state[extra]["step"]) == 1.0
    assert set(opt.state[lin.weight]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_closure_hooks_zero_grad(name: str) -> None:
    model = torch.nn.Linear(3, 1)
    opt = ours(name)(model.parameters(), lr=0.01)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    x = torch.randn(8, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert calls == ["pre", "post"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_is_a_torch_optimizer_of_that_name(name: str) -> None:
    opt = ours(name)([torch.nn.Parameter(torch.randn(2))])
    assert isinstance(opt, theirs(name))
    ref = theirs(name)([torch.nn.Parameter(torch.randn(2))])
    keys = set(ref.defaults) | {"decoupled_weight_decay"} if name in ("Adam", "AdamW") else set(ref.defaults)
    assert set(opt.defaults) == keys | {"l1"}  # fusedtrain's one extra group option
    assert opt.defaults["l1"] == 0.0
    for key, value in ref.defaults.items():
        if key not in ("foreach", "fused"):
            assert opt.defaults[key] == value, key


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] in ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop")],
                         ids=config_id)
def test_complex_params_match_torch(cfg) -> None:
    name, kw = cfg
    pa = [torch.randn(s, dtype=torch.complex128, requires_grad=True) for s in [(5,), (3, 4)]]
    pb = clone_params(pa)
    a, b = ours(name)(pa, **kw), theirs(name)(pb, **torch_kwargs(name, kw))
    step_together([(a, pa), (b, pb)], 6)
    assert_same_state(a, pa, b, pb, rtol=1e-12, atol=1e-12)


def test_tensor_lr_matches_torch() -> None:
    # torch keeps a tensor lr as a float32 tensor and derives step_size in float32; we read it once as a
    # Python float. Agreement is therefore to float32 rounding, checked on float32 parameters.
    pa = make_params("cpu", torch.float32)
    pb = clone_params(pa)
    a = fusedtrain.optim.Adam(pa, lr=torch.tensor(0.01))
    b = torch.optim.Adam(pb, lr=torch.tensor(0.01), foreach=False)
    step_together([(a, pa), (b, pb)], 4)
    assert_same_state(a, pa, b, pb, rtol=2e-6, atol=2e-6)


@pytest.mark.cuda
def test_capturable_runs_torch_implementation_on_cuda() -> None:
    pa = make_params("cuda", torch.float64)
    pb = clone_params(pa)
    # fusedtrain records foreach=None, so torch picks its foreach implementation on CUDA
    a = fusedtrain.optim.Adam(pa, lr=0.01, capturable=True)
    b = torch.optim.Adam(pb, lr=0.01, capturable=True, foreach=True)
    step_together([(a, pa), (b, pb)], 4)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert a.state[pa[0]]["step"].device.type == "cuda"


@pytest.mark.parametrize("name,kwargs,match", [
    ("Adam", dict(lr=-1.0), "Invalid learning rate"),
    ("Adam", dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
    ("Adam", dict(eps=-1.0), "Invalid epsilon value"),
    ("AdamW", dict(weight_decay=-0.1), "Invalid weight_decay value"),
    ("SGD", dict(lr=0.1, nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    ("SGD", dict(lr=0.1, momentum=-0.5), "Invalid momentum value"),
    ("Adagrad", dict(lr_decay=-1.0), "Invalid lr_decay value"),
    ("RMSprop", dict(alpha=-0.1), "Invalid alpha value"),
    ("Adam", dict(foreach=True, fused=True), "cannot be `True` together"),
])
def test_torch_validation_errors(name: str, kwargs: dict, match: str) -> None:
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises((ValueError, RuntimeError), match=match):
        theirs(name)(p, **kwargs)
    with pytest.raises((ValueError, RuntimeError), match=match):
        ours(name)(p, **kwargs)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_refused_step_mutates_nothing(name: str) -> None:
    """After a good step, a gradient the optimizer refuses in the second group (sparse where torch refuses it
    too, else a gradient of the wrong dtype): clear error, and nothing (parameters, state) changed."""
    good = torch.nn.Parameter(torch.randn(4))
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = ours(name)([{"params": [good]}, {"params": emb.parameters()}], lr=0.1)
    good.grad = torch.randn(4)
    emb.weight.grad = torch.randn(10, 3)
    opt.step()
    good.grad = torch.randn(4)
    if name in ("SGD", "Adagrad"):  # torch.optim takes their sparse gradients; so do we (test_regressions_13)
        if hasattr(emb.weight, "grad_dtype"):
            emb.weight.grad_dtype = None  # torch >= 2.10 refuses the assignment below otherwise
        emb.weight.grad = torch.randn(10, 3, dtype=torch.float64)
        match = r"param_groups\[1\]\['params'\]\[0\].*must match the parameter"
    else:
        emb.weight.grad = None
        emb(torch.tensor([1, 2])).sum().backward()
        assert emb.weight.grad.is_sparse
        match = r"param_groups\[1\]\['params'\]\[0\] has a sparse gradient"
    before = [good.detach().clone(), emb.weight.detach().clone()]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert torch.equal(good, before[0]) and torch.equal(emb.weight, before[1])
    state_after = opt.state_dict()["state"]
    assert state_after.keys() == state_before.keys()
    for idx, entries in state_before.items():
        for key, value in entries.items():
            assert torch.equal(state_after[idx][key], value), (idx, key)


def test_bad_grad_and_device_errors() -> None:
    half_complex = torch.nn.Parameter(torch.randn(2, dtype=torch.complex64).to(torch.complex32))
    half_complex.grad = torch.zeros_like(half_complex)
    with pytest.raises(RuntimeError, match="supports float32, float64"):
        fusedtrain.optim.Adam([half_complex]).step()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_meta_parameters_step_as_torch(name: str) -> None:
    """Model-building flows create optimizers on meta parameters: the step is torch's (a no-op on meta
    tensors) and creates the state torch creates."""
    metas = [torch.nn.Parameter(torch.randn(3, device="meta")) for _ in range(2)]
    refs = [torch.nn.Parameter(torch.randn(3, device="meta")) for _ in range(2)]
    for p in metas + refs:
        p.grad = torch.randn(3, device="meta")
    a, b = ours(name)(metas, lr=0.1), theirs(name)(refs, lr=0.1, foreach=False)
    for _ in range(2):
        try:
            b.step()
        except RuntimeError as e:  # torch.optim.ASGD reads its eta with .item(), which meta tensors refuse
            with pytest.raises(RuntimeError, match=re.escape(str(e))):
                a.step()
            return
        a.step()
    for p, q in zip(metas, refs):
        assert set(a.state[p]) == set(b.state[q])
        for key in a.state[p]:
            x, y = a.state[p][key], b.state[q][key]
            assert x.device == y.device and x.shape == y.shape and x.dtype == y.dtype, key


def test_differentiable_runs_torch_implementation() -> None:
    p = torch.randn(3)  # torch's differentiable path needs parameters it may update outside no_grad
    q = p.clone()
    a = fusedtrain.optim.SGD([p], lr=0.1, momentum=0.9, differentiable=True)
    b = torch.optim.SGD([q], lr=0.1, momentum=0.9, differentiable=True)
    for _ in range(3):
        g = torch.randn(3)
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(p, q)


def test_cuda_param_without_cuda_kernels_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check that guards builds without CUDA kernels names the fix (exercised with a fake device check)."""
    import fusedtrain.optim._base as base

    class FakeCudaParam:
        grad = torch.randn(2)
        device = torch.device("cuda", 0)
        dtype = torch.float32
        shape = grad.shape

    monkeypatch.setattr(base, "has_cuda_kernels", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA kernels.*pip install --no-build-isolation -e"):
        base.check_param("Adam", FakeCudaParam())  # type: ignore[arg-type]
