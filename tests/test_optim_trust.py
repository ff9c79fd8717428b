"""LAMB and LARS (fusedtrain.optim.Lamb / Lars) against timm.optim.Lamb / Lars (foreach=False), and their
options, state, refusals and determinism."""

from __future__ import annotations

import copy
import itertools
import pickle
from typing import Any

import pytest
import torch

import fusedtrain
from _helpers import assert_close_ulps, assert_same_values, clone_params, make_grads, make_params, set_grads, snapshot
from conftest import DEVICES

timm_optim = pytest.importorskip("timm.optim")

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6)}
STATE_KEYS = {"Lamb": ("exp_avg", "exp_avg_sq"), "Lars": ("momentum_buffer",)}


def _lamb_configs() -> list[dict[str, Any]]:
    """Every combination of the flags that change the arithmetic, on two weight decays (0: no adaptation
    unless always_adapt), and the remaining options one at a time."""
    out = []
    for wd, decoupled, always, clip, caution in itertools.product((0.0, 0.05), (False, True), (False, True),
                                                                  (False, True), (False, True)):
        if wd == 0.0 and decoupled:
            continue
        out.append(dict(lr=0.01, weight_decay=wd, decoupled_decay=decoupled, always_adapt=always, trust_clip=clip,
                        caution=caution))
    out += [
        dict(lr=0.01, max_grad_norm=None),
        dict(lr=0.01, max_grad_norm=1e6),
        dict(lr=0.01, grad_averaging=False, betas=(0.8, 0.99)),
        dict(lr=0.01, bias_correction=False, eps=1e-3),
        dict(lr=0.01, weight_decay=0.1, decoupled_decay=True, corrected_weight_decay=True),
        dict(lr=0.02, betas=(0.0, 0.9)),  # beta1 = 0 with grad_averaging=False: timm's lerp branch
        dict(lr=0.02, betas=(0.0, 0.9), grad_averaging=False),
    ]
    return out


def _lars_configs() -> list[dict[str, Any]]:
    out = []
    for wd, momentum, nesterov, clip, always in itertools.product((0.0, 1e-3), (0.0, 0.9), (False, True),
                                                                  (False, True), (False, True)):
        if nesterov and momentum == 0.0:
            continue
        out.append(dict(lr=0.5, weight_decay=wd, momentum=momentum, nesterov=nesterov, trust_clip=clip,
                        always_adapt=always))
    out += [dict(lr=0.5, momentum=0.9, dampening=0.3, weight_decay=1e-2, trust_coeff=0.02, eps=1e-3),
            dict(lr=0.05, momentum=0.9, weight_decay=1e-4, trust_clip=True)]
    return out


CONFIGS = [("Lamb", kw) for kw in _lamb_configs()] + [("Lars", kw) for kw in _lars_configs()]


def _id(cfg: tuple[str, dict[str, Any]]) -> str:
    name, kw = cfg
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items() if k != "lr")


def _ours(name: str, params: Any, **kw: Any) -> torch.optim.Optimizer:
    return getattr(fusedtrain.optim, name)(params, **kw)


def _timm(name: str, params: Any, **kw: Any) -> torch.optim.Optimizer:
    return getattr(timm_optim, name)(params, foreach=False, **kw)


def _run(runs: list[tuple[torch.optim.Optimizer, list[torch.Tensor]]], n_steps: int) -> None:
    for _ in range(n_steps):
        grads = make_grads(runs[0][1])
        for opt, params in runs:
            set_grads(params, grads)
            opt.step()


def _assert_same(name: str, a: torch.optim.Optimizer, pa: list[torch.Tensor], b: torch.optim.Optimizer,
                 pb: list[torch.Tensor], **tol: float) -> None:
    for x, y in zip(pa, pb):
        assert_close_ulps(x, y, **tol)
        for key in STATE_KEYS[name]:
            if key in b.state[y]:
                assert_close_ulps(a.state[x][key], b.state[y][key], **tol)
            else:
                assert key not in a.state[x]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_matches_timm(cfg: tuple[str, dict[str, Any]], dtype: torch.dtype, device: str) -> None:
    name, kw = cfg
    pa = make_params(device, dtype)
    pb = clone_params(pa)
    a, b = _ours(name, pa, **kw), _timm(name, pb, **kw)
    _run([(a, pa), (b, pb)], 8)
    _assert_same(name, a, pa, b, pb, **TOL[dtype])


def _error(params: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return sum(float((p.detach().double() - r.detach()).pow(2).sum()) for p, r in zip(params, ref)) ** 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_half_precision_error_within_timm(cfg: tuple[str, dict[str, Any]], dtype: torch.dtype, device: str) -> None:
    """fp16/bf16 in float32 registers: error vs a float64 run at most 2x timm's own in that dtype."""
    name, kw = cfg
    pa = make_params(device, dtype)
    pb = clone_params(pa)
    pref = clone_params(pa, torch.float64)
    a, b, ref = _ours(name, pa, **kw), _timm(name, pb, **kw), _timm(name, pref, **kw)
    _run([(a, pa), (b, pb), (ref, pref)], 6)
    scale = sum(float(r.detach().pow(2).sum()) for r in pref) ** 0.5
    floor = torch.finfo(dtype).eps * scale
    ours_err, timm_err = _error(pa, pref), _error(pb, pref)
    if timm_err != timm_err:  # timm rounds every intermediate to the half dtype and may overflow to NaN
        assert ours_err <= 0.05 * scale, (ours_err, scale)
    else:
        assert ours_err <= 2 * timm_err + floor, (ours_err, timm_err, floor)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_tensor_lr_and_param_groups(name: str, device: str) -> None:
    pa = make_params(device, torch.float64)
    pb = clone_params(pa)
    kw = dict(weight_decay=0.01, always_adapt=True) if name == "Lamb" else dict(weight_decay=1e-3, momentum=0.9)
    lr = 0.01 if name == "Lamb" else 0.5
    groups_a = [dict(params=pa[:4], lr=torch.tensor(lr)), dict(params=pa[4:], lr=lr / 2, weight_decay=0.0)]
    groups_b = [dict(params=pb[:4], lr=torch.tensor(lr)), dict(params=pb[4:], lr=lr / 2, weight_decay=0.0)]
    a, b = _ours(name, groups_a, **kw), _timm(name, groups_b, **kw)
    _run([(a, pa), (b, pb)], 5)
    _assert_same(name, a, pa, b, pb, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_deterministic_across_thread_counts(name: str) -> None:
    """The per-tensor norms use a fixed split (Note [deterministic per-tensor sums on the CPU])."""
    shapes = [(300000,), (70001,), (5, 7), (1,)]
    kw = dict(weight_decay=0.01) if name == "Lamb" else dict(weight_decay=1e-3, momentum=0.9)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.manual_seed(0)
            ps = [torch.randn(s, requires_grad=True) for s in shapes]
            opt = _ours(name, ps, **kw)
            torch.set_num_threads(n)
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn_like(p)
                opt.step()
            results.append([p.detach().clone() for p in ps])
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert_same_values(results[0], r)


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_state_dict_roundtrip_and_copies(name: str) -> None:
    kw = dict(weight_decay=0.01) if name == "Lamb" else dict(weight_decay=1e-3, momentum=0.9)
    pa = make_params("cpu", torch.float32)
    a = _ours(name, pa, l1=1e-3, **kw)
    _run([(a, pa)], 2)
    pb = clone_params(pa)
    b = _ours(name, pb, **kw)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # (torch's loader aliases same-dtype state tensors)
    c = copy.deepcopy(a)
    pc = [g for group in c.param_groups for g in group["params"]]
    d = pickle.loads(pickle.dumps(a))
    pd = [g for group in d.param_groups for g in group["params"]]
    assert c.param_groups[0]["l1"] == 1e-3 and d.param_groups[0]["l1"] == 1e-3
    _run([(a, pa), (b, pb), (c, pc), (d, pd)], 3)
    _assert_same(name, a, pa, b, pb, rtol=0, atol=0)
    _assert_same(name, a, pa, c, pc, rtol=0, atol=0)
    _assert_same(name, a, pa, d, pd, rtol=0, atol=0)
    if name == "Lamb":
        assert a.defaults["max_grad_norm"] == 1.0 and c.defaults["max_grad_norm"] == 1.0


def test_lamb_loads_timm_checkpoint() -> None:
    pa = make_params("cpu", torch.float64)
    pb = clone_params(pa)
    ref = _timm("Lamb", pb, lr=0.01)
    _run([(ref, pb)], 3)
    ours = _ours("Lamb", pa, lr=0.01)
    with torch.no_grad():
        for x, y in zip(pa, pb):
            x.copy_(y)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert "step" not in ours.param_groups[0]
    _run([(ours, pa), (ref, pb)], 3)
    _assert_same("Lamb", ours, pa, ref, pb, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_refused_step_changes_nothing(name: str) -> None:
    kw = dict(weight_decay=0.01) if name == "Lamb" else dict(weight_decay=1e-3, momentum=0.9)
    ps = make_params("cpu", torch.float32)
    opt = _ours(name, ps, **kw)
    _run([(opt, ps)], 1)
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[2].grad = torch.randn_like(ps[2]).to_sparse()  # refused: sparse
    before = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[2\]"):
        opt.step()
    assert_same_values(before, snapshot(opt, ps))


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_meta_parameters_refused(name: str) -> None:
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    p.grad = torch.empty(3, device="meta")
    opt = _ours(name, [p])
    with pytest.raises(RuntimeError, match="meta device"):
        opt.step()


def test_lamb_validation() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fusedtrain.optim.Lamb(p, lr=-1.0)
    with pytest.raises(ValueError, match="Invalid epsilon"):
        fusedtrain.optim.Lamb(p, eps=-1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        fusedtrain.optim.Lamb(p, max_grad_norm=0.0)
    with pytest.raises(TypeError):
        fusedtrain.optim.Lamb(p, capturable=True)  # not an option of timm's Lamb


def test_lars_validation() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        fusedtrain.optim.Lars(p, nesterov=True)
    with pytest.raises(ValueError, match="Invalid momentum"):
        fusedtrain.optim.Lars(p, momentum=-1)


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_grad_scale_and_found_inf(name: str) -> None:
    """GradScaler's protocol (grad_scale / found_inf on the optimizer): unscaled in the kernels; a step
    with found_inf changes nothing."""
    kw = dict(weight_decay=0.01) if name == "Lamb" else dict(weight_decay=1e-3, momentum=0.9)
    pa = make_params("cpu", torch.float64)
    pb = clone_params(pa)
    a, b = _ours(name, pa, **kw), _timm(name, pb, **kw)
    for _ in range(3):
        grads = make_grads(pa)
        set_grads(pb, grads)
        set_grads(pa, [g * 1024.0 for g in grads])
        a.grad_scale, a.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        a.step()
        b.step()
    _assert_same(name, a, pa, b, pb, **TOL[torch.float64])
    before = snapshot(a, pa)
    a.found_inf = torch.tensor(1.0)
    a.step()
    assert_same_values(before, snapshot(a, pa))


def test_l1_is_folded_into_the_gradient() -> None:
    """Lamb(l1=c) equals timm's Lamb on g + c*sign(p) (without the global clipping, which comes first)."""
    pa = make_params("cpu", torch.float64)
    pb = clone_params(pa)
    a = _ours("Lamb", pa, lr=0.01, max_grad_norm=None, l1=0.1)
    b = _timm("Lamb", pb, lr=0.01, max_grad_norm=None)
    for _ in range(4):
        grads = make_grads(pa)
        set_grads(pa, grads)
        set_grads(pb, [g + 0.1 * torch.sign(p.detach()) for g, p in zip(grads, pb)])
        a.step()
        b.step()
    _assert_same("Lamb", a, pa, b, pb, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_ema_fused_equals_separate(name: str) -> None:
    kw = dict(weight_decay=0.01) if name == "Lamb" else dict(weight_decay=1e-3, momentum=0.9)
    ma, mb = torch.nn.Linear(7, 5), torch.nn.Linear(7, 5)
    mb.load_state_dict(ma.state_dict())
    ea = fusedtrain.ensemble.EMA(ma, decay=0.9)
    eb = fusedtrain.ensemble.EMA(mb, decay=0.9)
    a = _ours(name, ma.parameters(), ema=ea, **kw)
    b = _ours(name, mb.parameters(), **kw)
    pa, pb = list(ma.parameters()), list(mb.parameters())
    for _ in range(3):
        grads = make_grads(pa)
        set_grads(pa, grads)
        set_grads(pb, grads)
        a.step()
        b.step()
        eb.update()
    assert_same_values([p.detach() for p in pa], [p.detach() for p in pb])
    assert_same_values(list(ea.averages_for(pa)), list(eb.averages_for(pb)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_master_weights(name: str, dtype: torch.dtype) -> None:
    """float32 masters updated as a float32 run on the low-precision gradients; the parameters are the
    rounded masters."""
    kw = dict(weight_decay=0.01) if name == "Lamb" else dict(weight_decay=1e-3, momentum=0.9)
    pa = make_params("cpu", dtype)
    pf = clone_params(pa, torch.float32)
    a = _ours(name, pa, master_weights=True, **kw)
    f = _ours(name, pf, **kw)
    for _ in range(3):
        grads = [g.to(dtype) for g in make_grads(pf)]
        set_grads(pa, grads)
        set_grads(pf, [g.float() for g in grads])
        a.step()
        f.step()
    for x, y in zip(pa, pf):
        assert_close_ulps(a.state[x]["master_param"], y, rtol=2e-6, atol=2e-6)
        assert_same_values(x.detach(), a.state[x]["master_param"].to(dtype))


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_bfloat16_states(name: str) -> None:
    kw = dict(weight_decay=0.01) if name == "Lamb" else dict(weight_decay=1e-3, momentum=0.9)
    pa = make_params("cpu", torch.float32)
    pb = clone_params(pa)
    a = _ours(name, pa, state_dtype=torch.bfloat16, **kw)
    b = _ours(name, pb, **kw)
    _run([(a, pa), (b, pb)], 4)
    for x, y in zip(pa, pb):
        for key in STATE_KEYS[name]:
            assert a.state[x][key].dtype == torch.bfloat16
        torch.testing.assert_close(x, y, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS[::3], ids=_id)
@pytest.mark.cuda
def test_cuda_matches_cpu(cfg: tuple[str, dict[str, Any]], dtype: torch.dtype) -> None:
    """The CUDA passes compute what the CPU passes compute (the same functors; the per-tensor sums differ
    only in their order of addition)."""
    if not torch.cuda.is_available() or not fusedtrain.has_cuda_kernels():
        pytest.skip("needs a CUDA device and fusedtrain's CUDA kernels")
    name, kw = cfg
    pa = make_params("cpu", dtype)
    pb = [p.detach().cuda().requires_grad_() for p in pa]
    a, b = _ours(name, pa, **kw), _ours(name, pb, **kw)
    for _ in range(5):
        grads = make_grads(pa)
        set_grads(pa, grads)
        set_grads(pb, [g.cuda() for g in grads])
        a.step()
        b.step()
    tol = TOL.get(dtype, dict(rtol=1e-2, atol=1e-2))  # float64 caution too (Note [wide device scalars])
    for x, y in zip(pa, pb):
        assert_close_ulps(y.cpu(), x, **tol)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_cuda_deterministic(name: str) -> None:
    if not torch.cuda.is_available() or not fusedtrain.has_cuda_kernels():
        pytest.skip("needs a CUDA device and fusedtrain's CUDA kernels")
    kw = dict(weight_decay=0.01) if name == "Lamb" else dict(weight_decay=1e-3, momentum=0.9)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        ps = [torch.randn(s, device="cuda", requires_grad=True) for s in [(3_000_001,), (4097,), (1,)]]
        opt = _ours(name, ps, **kw)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        results.append([p.detach().cpu() for p in ps])
    assert_same_values(results[0], results[1])
