"""Ensembles: the cyclic schedule, snapshots, prediction ensembles, EMA / SWA and the fused EMA path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fusedtrain
from fusedtrain.ensemble import EMA, SWA, CyclicCosineLR, Ensemble, SnapshotEnsemble, update_bn
from fusedtrain.optim import functional as F
from conftest import DEVICES


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)
    x = x.to(next(model.parameters()).dtype)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("total,cycles", [(10, 3), (12, 4), (7, 7), (5, 1)])
def test_cyclic_cosine_schedule_matches_eq2(total: int, cycles: int) -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.4)
    sched = CyclicCosineLR(opt, total, cycles)
    period = math.ceil(total / cycles)
    for t in range(1, total + 1):
        expected = 0.4 / 2 * (math.cos(math.pi * ((t - 1) % period) / period) + 1)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert sched.is_cycle_end(t) == (t % period == 0 or t == total)
        opt.step()
        sched.step()


def test_cyclic_cosine_rejects_bad_arguments() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        CyclicCosineLR(opt, 0, 1)
    with pytest.raises(ValueError, match="cycles"):
        CyclicCosineLR(opt, 5, 6)


@pytest.mark.parametrize("store", ["cpu", "dir"])
def test_snapshots_at_cycle_ends_and_predict(store: str, tmp_path) -> None:
    model = _net()
    opt = fusedtrain.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ens = SnapshotEnsemble(model, opt, total_steps=10, cycles=3, keep_last=2,
                           store="cpu" if store == "cpu" else tmp_path / "snaps")
    expected = {}
    for it in range(1, 11):
        _train_step(model, opt, it)
        if ens.step():
            expected[it] = copy.deepcopy(model.state_dict())
    assert sorted(expected) == [4, 8, 10]
    assert ens.snapshot_steps == [8, 10]
    members = ens.models()
    for m, it in zip(members, [8, 10]):
        for k, v in m.state_dict().items():
            assert torch.equal(v, expected[it][k])
    model.train()
    x = torch.randn(9, 6)
    probs = ens.predict(x, batch_size=4)
    manual = sum(torch.softmax(m(x), dim=-1) for m in members) / 2
    torch.testing.assert_close(probs, manual)
    assert model.training
    if store == "dir":
        assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == ["snapshot_1.pt", "snapshot_2.pt"]
    other = SnapshotEnsemble(_net(1), torch.optim.SGD(_net(1).parameters(), lr=0.1), 10, 3, keep_last=2,
                             store="cpu" if store == "cpu" else tmp_path / "snaps")
    other.load_state_dict(ens.state_dict())
    torch.testing.assert_close(other.predict(x), probs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_ema_kernel_equals_foreach_lerp(dtype: torch.dtype, device: str) -> None:
    avgs = [torch.randn(s, dtype=dtype, device=device) for s in (1, 7, 4097, 100_003)]
    params = [torch.randn_like(a) for a in avgs]
    ref = [a.clone() for a in avgs]
    torch._foreach_lerp_(ref, params, 0.01)
    F.ema(avgs, params, weight=0.01)
    for a, r in zip(avgs, ref):
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(a, r, rtol=ulp, atol=ulp)


def test_ema_update_formula_warmup_and_buffers() -> None:
    model = _net().double()
    ema = EMA(model, decay=0.9, warmup=10)
    assert [ema.decay_at(n) for n in (0, 1, 80)] == [pytest.approx(0.1), pytest.approx(2 / 11), 0.9]
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for it in range(5):
        _train_step(model, opt, it)  # also moves the BatchNorm statistics
        w = 1 - ema.decay_at(it)
        ema.update()
        with torch.no_grad():
            for r, p in zip(ref.parameters(), model.parameters()):
                r.add_(w * (p - r))
            for (name, rb), b in zip(ref.named_buffers(), model.buffers()):
                if rb.is_floating_point():
                    rb.add_(w * (b - rb))
                else:
                    rb.copy_(b)
    for (name, x), y in zip(ema.module.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=name)
    copy_ema = EMA(model, decay=0.5, buffers="copy")
    _train_step(model, opt, 99)
    copy_ema.update()
    for a, b in zip(copy_ema.module.buffers(), model.buffers()):
        assert torch.equal(a, b)


def test_average_parameters_swaps_and_restores() -> None:
    model = _net()
    ema = EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _train_step(model, opt, 0)
    ema.update()
    own = [p.detach().clone() for p in model.parameters()]
    averaged = [a.detach().clone() for a in ema.module.parameters()]
    assert not all(torch.equal(o, a) for o, a in zip(own, averaged))
    with ema.average_parameters() as m:
        assert m is model
        for p, a in zip(model.parameters(), averaged):
            assert torch.equal(p, a)
    for p, o in zip(model.parameters(), own):
        assert torch.equal(p, o)
    for a, o in zip(ema.module.parameters(), averaged):
        assert torch.equal(a, o)


FUSED_CASES = [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
               ("Adagrad", dict(lr=0.1)), ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5)),
               ("Adam", dict(lr=0.01, amsgrad=True)), ("AdamW", dict(lr=0.01))]
# torch.optim's other element-wise optimizers (issue 15)
FUSED_CASES += [("RAdam", dict(lr=0.01)), ("Adamax", dict(lr=0.01)), ("Adadelta", dict(lr=0.5)),
                ("ASGD", dict(lr=0.01, t0=2)), ("Rprop", dict(lr=0.01))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,kw", FUSED_CASES, ids=[c[0] + str(i) for i, c in enumerate(FUSED_CASES)])
def test_fused_step_and_ema_equals_step_then_ema(name: str, kw: dict, dtype: torch.dtype, device: str) -> None:
    a_model = _net().to(device=device, dtype=dtype)
    a_model[3].bias.requires_grad_(False)  # a frozen parameter: averaged outside the fused pass
    b_model = copy.deepcopy(a_model)
    a_ema, b_ema = EMA(a_model, decay=0.9, warmup=5), EMA(b_model, decay=0.9, warmup=5)
    a_opt = getattr(fusedtrain.optim, name)([p for p in a_model.parameters() if p.requires_grad], ema=a_ema, **kw)
    b_opt = getattr(fusedtrain.optim, name)([p for p in b_model.parameters() if p.requires_grad], **kw)
    for it in range(6):
        for model, opt in ((a_model, a_opt), (b_model, b_opt)):
            g = torch.Generator().manual_seed(it)
            x = torch.randn(32, 6, generator=g).to(device=device, dtype=dtype)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        b_ema.update()
        with torch.no_grad():
            a_model[3].bias.add_(0.01)  # the frozen parameter still moves (e.g. set by hand)
            b_model[3].bias.add_(0.01)
    assert a_ema.num_updates == b_ema.num_updates == 6
    for (name_, x), y in zip(a_ema.module.state_dict().items(), b_ema.module.state_dict().values()):
        assert torch.equal(x, y), name_
    for x, y in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(x, y)


def test_swa_is_the_mean_of_the_snapshots() -> None:
    model = _net().double()
    swa = SWA(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for it in range(5):
        _train_step(model, opt, it)
        swa.update()
        seen.append([p.detach().clone() for p in model.parameters()])
    for i, a in enumerate(swa.module.parameters()):
        torch.testing.assert_close(a, torch.stack([s[i] for s in seen]).mean(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_call_fn", [False, True])
def test_update_bn_matches_torch(with_call_fn: bool) -> None:
    model = _net().double()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    data = [(torch.randn(16, 6, dtype=torch.float64), torch.zeros(16)) for _ in range(4)]
    if with_call_fn:
        update_bn(data, ours, call_fn=lambda m, batch: m(batch[0]))
    else:
        update_bn(data, ours)
    torch.optim.swa_utils.update_bn(data, theirs)
    for (name, x), y in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=name)
    assert ours[1].momentum == theirs[1].momentum == 0.1


@pytest.mark.parametrize("combine", ["mean_softmax", "mean_logits", "vote"])
def test_ensemble_vectorized_equals_loop(combine: str) -> None:
    models = [_net(s).eval() for s in range(3)]
    ens = Ensemble(models, combine=combine)
    assert ens.vectorized
    x = torch.randn(10, 6)
    logits = torch.stack([m(x) for m in models])
    torch.testing.assert_close(ens.member_logits(x), logits, rtol=1e-5, atol=1e-5)
    expected = {"mean_logits": logits.mean(0), "mean_softmax": torch.softmax(logits, -1).mean(0),
                "vote": nn.functional.one_hot(logits.argmax(-1), 4).float().mean(0)}[combine]
    torch.testing.assert_close(ens(x), expected, rtol=1e-5, atol=1e-5)
    mixed = Ensemble([models[0], nn.Sequential(nn.Linear(6, 4))], combine=combine)
    assert not mixed.vectorized and mixed(x).shape == (10, 4)


def test_bad_arguments() -> None:
    model = _net()
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)
    with pytest.raises(ValueError, match="warmup"):
        EMA(model, warmup=0)
    with pytest.raises(ValueError, match="buffers"):
        EMA(model, buffers="mean")
    with pytest.raises(ValueError, match="combine"):
        Ensemble([model], combine="max")
    with pytest.raises(TypeError, match="fusedtrain.ensemble.EMA"):
        fusedtrain.optim.Adam(model.parameters(), ema=object())
    with pytest.raises(RuntimeError, match="no snapshot yet"):
        SnapshotEnsemble(model, torch.optim.SGD(model.parameters(), lr=0.1), 10, 2).predict(torch.randn(2, 6))
