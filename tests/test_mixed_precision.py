"""Mixed precision in the optimizer kernels: float32 master weights for float16/bfloat16 parameters,
bfloat16 optimizer states, stochastic rounding of bfloat16 parameters (Note [mixed-precision layouts])."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import fusedtrain
from _helpers import assert_close_ulps, make_grads, make_params
from conftest import DEVICES
from fusedtrain.optim import functional as F

LOW = [torch.bfloat16, torch.float16]
CASES: list[tuple[str, dict[str, Any]]] = [
    ("Adam", dict(lr=1e-2, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2, amsgrad=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("RMSprop", dict(lr=1e-2, centered=True, momentum=0.5)),
    ("Adagrad", dict(lr=0.05)),
]
# torch.optim's other element-wise optimizers (issue 15)
CASES += [("RAdam", dict(lr=1e-2, weight_decay=0.1)), ("Adamax", dict(lr=1e-2)), ("Adadelta", dict(lr=0.5)),
          ("ASGD", dict(lr=1e-2, t0=2)), ("Rprop", dict(lr=1e-2))]


def _low_params(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    return [p.detach().to(dtype).requires_grad_() for p in make_params(device, torch.float32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_master_weights_follow_the_float32_trajectory(device: str, dtype: torch.dtype, name: str,
                                                      kw: dict[str, Any]) -> None:
    """The masters take exactly the float32 trajectory of torch.optim fed with the same (low-precision)
    gradients; each parameter is its master rounded to nearest, written in the same pass."""
    params = _low_params(device, dtype)
    ref = [p.detach().float().requires_grad_() for p in params]
    opt = getattr(fusedtrain.optim, name)(params, **kw, master_weights=True)
    ropt = getattr(torch.optim, name)(ref, **kw, foreach=False)
    for _ in range(6):
        grads = make_grads(params)
        for p, q, g in zip(params, ref, grads):
            p.grad = g.to(dtype)
            q.grad = p.grad.float()
        opt.step()
        ropt.step()
    for p, q in zip(params, ref):
        if p.numel() == 0:
            continue
        state = opt.state[p]
        master = state["master_param"]
        assert master.dtype == torch.float32 and p.dtype == dtype
        assert_close_ulps(master, q, rtol=2e-6, atol=2e-7)
        assert torch.equal(p.detach(), master.to(dtype))
        for key, value in state.items():
            if key not in ("step", "master_param"):
                assert value.dtype == torch.float32, key
                assert_close_ulps(value, ropt.state[q][key], rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_states_for_float32_params(device: str) -> None:
    """state_dtype=bfloat16: the kernel computes in float32 and rounds the states to bfloat16 each step;
    the reference does exactly that with torch ops (torch.optim.Adam's single-tensor order)."""
    params = make_params(device, torch.float32)
    ref = [p.detach().clone() for p in params]
    opt = fusedtrain.optim.Adam(params, lr=1e-2, state_dtype=torch.bfloat16)
    m = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ref]
    v = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ref]
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-2
    for t in range(1, 6):
        grads = make_grads(params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, (p, g) in enumerate(zip(ref, grads)):
            m32 = m[i].float().lerp(g, 1 - b1)
            v32 = v[i].float() * b2 + (1 - b2) * g * g
            denom = v32.sqrt() / (1 - b2 ** t) ** 0.5 + eps
            p.add_(m32 / denom, alpha=-lr / (1 - b1 ** t))
            m[i], v[i] = m32.bfloat16(), v32.bfloat16()
    for p, q, mi, vi in zip(params, ref, m, v):
        if p.numel() == 0:
            continue
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["exp_avg"], mi, rtol=0.01, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_is_unbiased(device: str) -> None:
    """An update of a quarter of a bfloat16 ulp: round-to-nearest loses it entirely; stochastic rounding
    keeps it on average, every value landing on one of the two neighbours."""
    n = 200_000
    x = torch.full((n,), 1.0, dtype=torch.bfloat16, device=device)
    g = torch.ones(n, dtype=torch.bfloat16, device=device)
    step = 2.0 ** -7 / 4  # bfloat16 ulp just below 1.0 is 2^-8; above 1.0 it is 2^-7
    y = x.clone()
    F.sgd([y], [g], [], lr=step)  # to nearest: 1 - 2^-9 rounds back to 1
    assert torch.equal(y, x)
    F.sgd([x], [g], [], lr=step, stochastic_rounding=True, sr_seed=1)
    lower, upper = 1.0 - 2.0 ** -8, 1.0
    values = x.float()
    assert bool(((values == lower) | (values == upper)).all())
    frac_down = float((values == lower).float().mean())
    expected = step / 2.0 ** -8  # distance to the upper neighbour over the gap
    assert abs(frac_down - expected) < 5 * (expected * (1 - expected) / n) ** 0.5 + 1e-3
    assert abs(float(values.mean()) - (1.0 - step)) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_seed_and_class(device: str) -> None:
    base = torch.randn(10_000, device=device).bfloat16()
    g = torch.randn(10_000, device=device).bfloat16()
    outs = []
    for seed in (3, 3, 4):
        x = base.clone()
        F.sgd([x], [g], [], lr=1e-3, stochastic_rounding=True, sr_seed=seed)
        outs.append(x)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    # the class draws a fresh seed from torch's generator each step (torch.manual_seed makes it repeatable)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        w = base.clone().requires_grad_()
        opt = fusedtrain.optim.SGD([w], lr=1e-3, stochastic_rounding=True)
        for _ in range(3):
            w.grad = g.clone()
            opt.step()
        runs.append(w.detach())
    assert torch.equal(runs[0], runs[1])
    exact = base.float() - 3e-3 * g.float()
    assert float((runs[0].float() - exact).mean().abs()) < float((base.float() - exact).abs().mean()) / 20


def test_master_weights_on_a_mixed_group_with_ema() -> None:
    """A group mixing float32 and bfloat16 parameters: each part runs in its own layout. The EMA is fused
    into the float32 part and updated separately for the master-weight part; either way the result equals
    ema.update() after a plain step."""

    def run(fused: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        model[1].to(torch.bfloat16)
        ema = fusedtrain.ensemble.EMA(model, decay=0.9)
        opt = fusedtrain.optim.Adam(model.parameters(), lr=1e-2, master_weights=True, ema=ema if fused else None)
        x = torch.randn(4, 8)
        for _ in range(3):
            opt.zero_grad()
            model[1](model[0](x).bfloat16()).float().sum().backward()
            opt.step()
            if not fused:
                ema.update()
        assert opt.state[model[1].weight]["master_param"].dtype == torch.float32
        assert "master_param" not in opt.state[model[0].weight]
        return [p.detach() for p in model.parameters()], [a.detach() for a in ema.module.parameters()]

    (p1, a1), (p2, a2) = run(True), run(False)
    assert all(torch.equal(x, y) for x, y in zip(p1 + a1, p2 + a2))


def test_mixed_precision_errors() -> None:
    p, g = [torch.randn(4)], [torch.randn(4)]
    with pytest.raises(RuntimeError, match="stochastic_rounding applies to bfloat16"):
        F.sgd(p, g, [], lr=0.1, stochastic_rounding=True)
    with pytest.raises(RuntimeError, match="params must be the float32 masters"):
        F.sgd([torch.randn(4).half()], [torch.randn(4).half()], [], lr=0.1, param_copies=[torch.randn(4).half()])
    with pytest.raises(RuntimeError, match="states of dtype"):
        F.adam(p, g, [torch.zeros(4, dtype=torch.float16)], [torch.zeros(4, dtype=torch.float16)], [],
               [torch.tensor(0.0)], lr=0.1)
    with pytest.raises(ValueError, match="state_dtype"):
        fusedtrain.optim.Adam([torch.randn(2, requires_grad=True)], state_dtype=torch.int8)
    before = p[0].clone()
    with pytest.raises(ValueError, match="param_copies has 2 tensors"):
        F.sgd(p, g, [], lr=0.1, param_copies=[torch.randn(4).bfloat16(), torch.randn(4).bfloat16()])
    assert torch.equal(p[0], before)


@pytest.mark.parametrize("device", DEVICES)
def test_master_weights_state_dict_round_trip(device: str) -> None:
    params = _low_params(device, torch.bfloat16)
    opt = fusedtrain.optim.Adam(params, lr=1e-2, master_weights=True)
    for p, g in zip(params, make_grads(params)):
        p.grad = g.bfloat16()
    opt.step()
    opt2 = fusedtrain.optim.Adam(params, lr=1e-2, master_weights=True)
    opt2.load_state_dict(opt.state_dict())
    for p in params:
        for key, value in opt.state[p].items():
            assert opt2.state[p][key].dtype == value.dtype and torch.equal(opt2.state[p][key].cpu(), value.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["stochastic", "master", "bf16_states"])
def test_cuda_layouts_equal_cpu(case: str) -> None:
    """The same layouts give the same bits on CUDA as on the CPU (one rule, one hash)."""
    if not torch.cuda.is_available() or not fusedtrain.has_cuda_kernels():
        pytest.skip("needs a CUDA device and fusedtrain's CUDA kernels")
    torch.manual_seed(0)
    sizes = [1, 7, 4097, 70_000]
    outs = {}
    for device in ("cpu", "cuda"):
        g = [torch.randn(n).to(device) for n in sizes]
        if case == "stochastic":
            p = [torch.randn(n).bfloat16().to(device) for n in sizes]
            torch.manual_seed(1)
            p = [x.clone() for x in p]
            F.adam(p, [x.bfloat16() for x in g], [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p],
                   [], [torch.tensor(0.0) for _ in p], lr=1e-3, stochastic_rounding=True, sr_seed=99)
            outs[device] = p
        elif case == "master":
            copies = [torch.randn(n).half().to(device) for n in sizes]
            masters = [c.float() for c in copies]
            F.adam(masters, [x.half() for x in g], [torch.zeros_like(m) for m in masters],
                   [torch.zeros_like(m) for m in masters], [], [torch.tensor(0.0) for _ in masters], lr=1e-3,
                   param_copies=copies)
            outs[device] = masters + copies
        else:
            p = [torch.randn(n).to(device) for n in sizes]
            F.adam(p, g, [torch.zeros_like(x, dtype=torch.bfloat16) for x in p],
                   [torch.zeros_like(x, dtype=torch.bfloat16) for x in p], [], [torch.tensor(0.0) for _ in p],
                   lr=1e-3)
            outs[device] = p
        torch.manual_seed(0)
    for a, b in zip(outs["cpu"], outs["cuda"]):
        assert torch.equal(a, b.cpu())
