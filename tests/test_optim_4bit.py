"""4-bit blockwise-quantized optimizer states (state_bits=4 on Adam and AdamW; Note [4-bit optimizer states]
in csrc/include/fusedtrain/quant4.h): the code maps, quantization against float64 references, the kernel
against torch.optim stepping the dequantized states, checkpoints, conversions and convergence."""

from __future__ import annotations

import copy
import io
import math
import pickle
from typing import Any

import fusedtrain
import pytest
import torch
from fusedtrain.optim import _quant

from _helpers import DIGITS_ORDERS, digits_loss, run_grads

BLOCK = 128
SIGNED = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}


# ------------------------------------------------------------------------------------------- maps
def _formula_signed() -> list[float]:
    """The documented signed map (bitsandbytes' dynamic map with 3 exponent bits and 4 bits in all),
    recomputed in float64 here, independent of the C++ table."""
    mags = [10.0 ** (i - 2) * (0.1 + 0.9 * (k + 0.5) / 2 ** i) for i in range(3) for k in range(2 ** i)]
    return sorted([-m for m in mags] + [0.0] + mags + [1.0])


def test_code_maps_follow_the_documented_formula() -> None:
    m = _quant.maps4()
    s, u = m["signed"].double(), m["unsigned"].double()
    want_s = torch.tensor(_formula_signed(), dtype=torch.float64).float().double()
    want_u = torch.tensor([(c + 1) / 16 for c in range(16)], dtype=torch.float64).float().double()
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    torch.testing.assert_close(u, want_u, rtol=0, atol=0)
    assert s.tolist()[:8] == pytest.approx([-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0.0])


def test_code_map_properties() -> None:
    m = _quant.maps4()
    for t in m.values():
        assert t.shape == (16,) and bool((t[1:] > t[:-1]).all()), "maps must be strictly increasing"
    s, u = m["signed"], m["unsigned"]
    assert s[7] == 0 and s[15] == 1 and bool((s[8:15] == -s[:7].flip(0)).all())
    assert u[15] == 1 and u[0] == 1 / 16 and bool((u > 0).all()), "the unsigned map has no zero"
    mid = _quant._tables4()
    for name in ("signed", "unsigned"):
        v = torch.tensor(mid[name + "_value"], dtype=torch.float64)
        want = ((v[1:] + v[:-1]) / 2).float()
        assert torch.equal(torch.tensor(mid[name + "_mid"], dtype=torch.float32), want)


def _nearest_f64(xn: torch.Tensor, signed: bool) -> torch.Tensor:
    table = _quant.maps4()["signed" if signed else "unsigned"].double()
    return (xn.double()[:, None] - table[None, :]).abs().argmin(dim=1)


def _unpack(codes: torch.Tensor, n: int) -> torch.Tensor:
    b = codes.view(torch.uint8).long()
    return torch.stack([b & 15, b >> 4], dim=1).reshape(-1)[:n]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 2, 127, 128, 129, 4097])
def test_quantize_round_trip_is_nearest_and_bounded(signed: bool, n: int) -> None:
    g = torch.Generator().manual_seed(n + signed)
    mag = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-12, 0, generator=g))
    x = (mag * (torch.randint(0, 2, (n,), generator=g) * 2 - 1) if signed else mag).float()
    codes, absmax = _quant.quantize4(x, signed)
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.shape == ((n + 1) // 2,)
    assert absmax.shape == (math.ceil(n / BLOCK),) and absmax.dtype == torch.float32
    if n % 2:
        assert int(codes.view(torch.uint8)[-1]) >> 4 == 0, "an odd tail's high nibble is 0"
    back = _quant.dequantize4(codes, absmax, (n,)).double()
    y = (x if signed else x.sqrt()).double()  # unsigned codes hold sqrt(state), taken in float32 as the kernels do
    yb = back if signed else back.sqrt()
    pad = torch.zeros(absmax.numel() * BLOCK, dtype=torch.float64)
    pad[:n] = y.abs()
    torch.testing.assert_close(absmax, pad.view(-1, BLOCK).amax(1).float(), rtol=0, atol=0)
    scale = absmax.double().repeat_interleave(BLOCK)[:n]
    xn = y / scale
    got = _unpack(codes, n)
    table = _quant.maps4()["signed" if signed else "unsigned"].double()
    # nearest up to ties decided by float32 midpoints
    err_got = (xn - table[got]).abs()
    err_ref = (xn - table[_nearest_f64(xn, signed)]).abs()
    assert bool((err_got <= err_ref + 1e-7).all())
    # the dequantized value is that code's entry times the scale
    torch.testing.assert_close(yb, table[got] * scale, rtol=1e-6, atol=0)
    # the error is at most half the larger neighbouring gap, or (unsigned, below the first entry) 1/16
    gaps = table[1:] - table[:-1]
    idx = got.clamp(max=14)
    bound = torch.maximum(gaps[idx], gaps[(idx - 1).clamp(min=0)]) / 2
    if not signed:
        bound = torch.where(got == 0, torch.full_like(bound, 1 / 16), bound)
    assert bool(((yb - y).abs() <= bound * scale * (1 + 1e-6) + 1e-12).all())


def test_packing_order_and_edges() -> None:
    # element 2k in the low nibble of byte k: values on the map come back as their codes
    table = _quant.maps4()["signed"]
    order = torch.tensor([15, 0, 7, 3, 12, 9, 1])  # code per element; code 15 (1.0) fixes absmax = 1
    codes, absmax = _quant.quantize4(table[order], True)
    assert float(absmax) == 1.0
    assert codes.view(torch.uint8).tolist() == [15 | 0 << 4, 7 | 3 << 4, 12 | 9 << 4, 1]
    codes, absmax = _quant.quantize4(torch.zeros(300), False)
    assert float(absmax.abs().sum()) == 0 and bool((_quant.dequantize4(codes, absmax, (300,)) == 0).all())
    codes, absmax = _quant.quantize4(torch.zeros(0), True)
    assert codes.shape == (0,) and absmax.shape == (0,)
    assert _quant.dequantize4(codes, absmax, (0, 3)).shape == (0, 3)
    codes, absmax = _quant.quantize4(torch.tensor([1.0, float("nan"), 0.5]), True)
    assert math.isnan(float(absmax)) and int(codes.view(torch.uint8)[0]) >> 4 == 0  # a NaN gets code 0
    with pytest.raises(ValueError, match="negative"):
        _quant.quantize4(torch.tensor([-1.0, 2.0]), False)
    with pytest.raises(ValueError, match="absmax must be float32"):
        _quant.dequantize4(torch.zeros(150, dtype=torch.uint8), torch.zeros(2), (300,))
    with pytest.raises(ValueError, match="cannot hold"):
        _quant.dequantize4(torch.zeros(150, dtype=torch.uint8), torch.zeros(3), (301,))


# ----------------------------------------------------------------------------- kernel vs torch
def _reference_step(p_before: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], kind: str,
                    kw: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One torch.optim step from the dequantized 4-bit state, in opmath precision (float64 for float64
    parameters, float32 otherwise): the new parameter (rounded to its dtype) and the float states."""
    op = torch.float64 if p_before.dtype == torch.float64 else torch.float32
    p = p_before.detach().to(op).clone().requires_grad_()
    p.grad = grad.detach().to(op).clone()
    opt = getattr(torch.optim, kind)([p], foreach=False, **kw)
    st: dict[str, Any] = {"step": state["step"].clone().float()}
    for key in SIGNED:
        if key in state:
            st[key] = _quant.dequantize4(state[key], state[key + "_absmax4"], state[key + "_shape4"], op)
    opt.state[p] = st
    opt.step()
    return p.detach().to(p_before.dtype), {k: v for k, v in opt.state[p].items() if k != "step"}


SIZES = [1, 2, 127, 128, 129, 4097]
CASES: list[tuple[str, dict[str, Any]]] = [
    ("Adam", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, maximize=True)),
    ("AdamW", dict(lr=0.01, amsgrad=True)),
]


def _check_against_reference(kind: str, kw: dict[str, Any], params: list[torch.Tensor], steps: int = 5) -> None:
    opt = getattr(fusedtrain.optim, kind)(params, state_bits=4, min_8bit_size=0, **kw)
    g = torch.Generator().manual_seed(7)
    compared = 0
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]
        before = {}
        for p, gr in zip(params, grads):
            p.grad = gr
            if p in opt.state:
                before[p] = ({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()},
                             p.detach().clone())
        opt.step()
        for p, gr in zip(params, grads):
            st = opt.state[p]
            keys = [k for k in SIGNED if k in st]
            assert keys
            for key in keys:
                assert st[key].dtype == (torch.int8 if SIGNED[key] else torch.uint8)
                assert st[key].shape == ((p.numel() + 1) // 2,) and st[key + "_shape4"] == tuple(p.shape)
                assert st[key + "_absmax4"].shape == (math.ceil(p.numel() / BLOCK),)
            if p not in before or p.numel() == 0:
                continue
            old_state, old_p = before[p]
            new_p, ref = _reference_step(old_p, gr, old_state, kind, kw)
            if p.dtype in (torch.float16, torch.bfloat16):
                torch.testing.assert_close(p.detach().float(), new_p.float(), rtol=1e-2, atol=1e-5)
            else:
                tol = 1e-12 if p.dtype == torch.float64 else 2e-6
                torch.testing.assert_close(p.detach(), new_p, rtol=tol, atol=tol)
            for key in keys:
                codes, absmax = _quant.quantize4(ref[key], SIGNED[key])
                rtol = 4e-6 if p.dtype != torch.float64 else 1e-12
                torch.testing.assert_close(st[key + "_absmax4"], absmax, rtol=rtol, atol=0)
                diff = (_unpack(st[key], p.numel()) - _unpack(codes, p.numel())).abs()
                # float32 functors agree with torch to ulps: a code may differ by one at a midpoint, rarely
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01, (key, int(diff.sum()))
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + "-" + "-".join(map(str, c[1].values())))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_torch_on_dequantized_states(case: tuple[str, dict[str, Any]], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    params = [torch.randn(n, dtype=torch.float64).to(dtype).requires_grad_() for n in SIZES]
    params.append(torch.randn(70, 41, dtype=torch.float64).to(dtype).t().requires_grad_())  # non-contiguous
    params.append(torch.randn(30, 41, dtype=torch.float64).to(dtype)[:, ::2].requires_grad_())  # not dense
    params.append(torch.zeros(0, 3, dtype=dtype, requires_grad=True))  # empty
    _check_against_reference(case[0], case[1], params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    params = [torch.randn(n).to(dtype).requires_grad_() for n in (129, 4097)]
    _check_against_reference("AdamW", dict(lr=0.01), params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_codes_at_every_midpoint(dtype: torch.dtype) -> None:
    """The kernel's encoder at and next to every midpoint of both maps: with betas (0, 0) one Adam step leaves
    exp_avg = g and exp_avg_sq = g*g, and a 1 per block fixes the block's absmax to 1."""
    tables = _quant._tables4()
    xs = []
    for name in ("signed_mid", "unsigned_mid"):
        m = torch.tensor(tables[name], dtype=torch.float32)
        for x in (m, torch.nextafter(m, torch.full((), -2.0)), torch.nextafter(m, torch.full((), 2.0))):
            xs.append(x.to(dtype))
    g = torch.cat(xs + [torch.tensor([0.0, 1e-30, 1.0, 1 / 32], dtype=dtype)])
    n = g.numel()
    blocks = math.ceil(n / (BLOCK - 1))
    body = torch.zeros(blocks * (BLOCK - 1), dtype=dtype)
    body[:n] = g
    full = torch.ones(blocks, BLOCK, dtype=dtype)  # element 0 of every block is 1
    full[:, 1:] = body.view(blocks, BLOCK - 1)
    full = full.reshape(-1)
    assert int((full == 1).sum()) >= blocks and bool((full[1:n + 1] == g).all())
    p = torch.zeros_like(full, requires_grad=True)
    p.grad = full.clone()
    opt = fusedtrain.optim.Adam([p], lr=0.0, betas=(0.0, 0.0), state_bits=4, min_8bit_size=0)
    opt.step()
    st = opt.state[p]
    codes, absmax = _quant.quantize4(full, True)
    assert torch.equal(st["exp_avg_absmax4"], absmax) and torch.equal(st["exp_avg"], codes)
    # exp_avg_sq = g*g (exact for these values' float32 squares' roots up to rounding): the kernel's codes
    # equal quantize4 of the state it computed
    codes, absmax = _quant.quantize4(full * full, False)
    assert torch.equal(st["exp_avg_sq_absmax4"], absmax) and torch.equal(st["exp_avg_sq"], codes)


def test_non_contiguous_param_uses_row_major_blocks() -> None:
    torch.manual_seed(2)
    base = torch.randn(301, 20)
    a = base.t().contiguous().requires_grad_()
    b = base.clone().t().requires_grad_()
    oa = fusedtrain.optim.AdamW([a], lr=0.01, state_bits=4, min_8bit_size=0)
    ob = fusedtrain.optim.AdamW([b], lr=0.01, state_bits=4, min_8bit_size=0)
    for _ in range(3):
        g = torch.randn(20, 301)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a.detach(), b.detach())
    for key in ("exp_avg", "exp_avg_absmax4", "exp_avg_sq", "exp_avg_sq_absmax4"):
        assert torch.equal(oa.state[a][key], ob.state[b][key]), key


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_cpu_kernel(dtype: torch.dtype) -> None:
    """quant4_cuda.cuh against quant4_cpu.h: same tables, same float arithmetic (--fmad=false), so the same
    codes, scales and parameters up to the per-element functor's own CPU/GPU differences."""
    torch.manual_seed(3)
    cpu = [torch.randn(n, dtype=torch.float64).to(dtype).requires_grad_() for n in (1, 127, 129, 4097)]
    cpu.append(torch.randn(70, 41).to(dtype).t().requires_grad_())
    gpu = [p.detach().cuda().requires_grad_() for p in cpu]
    oc = fusedtrain.optim.AdamW(cpu, lr=0.01, amsgrad=True, state_bits=4, min_8bit_size=0)
    og = fusedtrain.optim.AdamW(gpu, lr=0.01, amsgrad=True, state_bits=4, min_8bit_size=0)
    for _ in range(4):
        for p, q in zip(cpu, gpu):
            p.grad = torch.randn(p.shape).to(dtype)
            q.grad = p.grad.cuda()
        oc.step()
        og.step()
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)
        for key in SIGNED:
            a, b = oc.state[p], og.state[q]
            torch.testing.assert_close(b[key + "_absmax4"].cpu(), a[key + "_absmax4"], rtol=1e-5, atol=0)
            diff = (_unpack(b[key].cpu(), p.numel()) - _unpack(a[key], p.numel())).abs()
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01, key


# ------------------------------------------------------------------------------------ options, api
def test_small_params_keep_float_states_and_memory() -> None:
    big = torch.randn(1024, 1024, requires_grad=True)
    small = torch.randn(100, requires_grad=True)
    opt = fusedtrain.optim.AdamW([big, small], lr=1e-3, state_bits=4)
    assert opt.state_bits == 4 and opt.min_8bit_size == 4096
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax4" not in opt.state[small]
    st = opt.state[big]
    nbytes = sum(v.numel() * v.element_size() for k, v in st.items() if isinstance(v, torch.Tensor) and k != "step")
    assert nbytes / big.numel() <= 1.1
    assert nbytes == 2 * (big.numel() // 2 + 4 * big.numel() // BLOCK)  # 1.0625 B per parameter
    opt2 = fusedtrain.optim.AdamW([big], lr=1e-3, state_bits=4, min_8bit_size=10**7)
    big.grad = torch.randn_like(big)
    opt2.step()
    assert opt2.state[big]["exp_avg"].dtype == torch.float32


def test_bad_options_are_refused() -> None:
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="state_bits"):
        fusedtrain.optim.AdamW(p, state_bits=2)
    with pytest.raises(ValueError, match="state_dtype"):
        fusedtrain.optim.AdamW(p, state_bits=4, state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="differentiable"):
        fusedtrain.optim.AdamW(p, state_bits=4, differentiable=True)


OTHERS = ["SGD", "Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax", "Adadelta", "Lion", "ASGD", "Rprop", "Lamb",
          "Lars", "ScheduleFreeAdamW", "ScheduleFreeSGD", "Muon", "Adafactor"]


@pytest.mark.parametrize("name", OTHERS)
def test_other_optimizers_refuse_state_bits_4(name: str) -> None:
    if not hasattr(fusedtrain.optim, name):
        pytest.skip(f"fusedtrain.optim.{name} needs a newer torch")
    p = torch.zeros(64, 64, requires_grad=True)
    with pytest.raises(ValueError, match="state_bits"):
        getattr(fusedtrain.optim, name)([p], state_bits=4)


def test_4bit_optimizers_list() -> None:
    have = {name for name in fusedtrain.optim.__all__ if isinstance(getattr(fusedtrain.optim, name), type)
            and getattr(getattr(fusedtrain.optim, name), "_rule_4bit", None) is not None}
    assert {"Adam", "AdamW"} <= have <= {"Adam", "AdamW", "Adam8bit", "AdamW8bit"}
    assert fusedtrain._ops.RULES["adam4bit"]["hyper"] == fusedtrain._ops.RULES["adam"]["hyper"]


def test_op_refuses_bad_quantized_lists_and_writes_nothing() -> None:
    p = torch.randn(301)
    g = torch.randn(301)
    step = torch.tensor(0.0)
    good = [torch.zeros(151, dtype=torch.int8), torch.zeros(3), torch.zeros(151, dtype=torch.uint8), torch.zeros(3)]
    hyper = fusedtrain._ops.hyper_list("adam4bit", dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                                        amsgrad=False, maximize=False, decoupled_weight_decay=True))
    bad_lists = [
        ([torch.zeros(151, dtype=torch.uint8)] + good[1:], "int8|Char"),  # signed state with unsigned bytes
        ([torch.zeros(301, dtype=torch.int8)] + good[1:], r"shape \[151\]"),  # one byte per element
        (good[:1] + [torch.zeros(2)] + good[2:], r"float32 of shape \[3\]"),  # 256-element blocks
        (good[:3] + [torch.zeros(3, dtype=torch.float64)], "float32"),
        (good[:2] + [torch.zeros(151, 1, dtype=torch.uint8)] + good[3:], "shape"),
    ]
    for states, match in bad_lists:
        before = p.clone()
        snapshot = [s.clone() for s in states]
        with pytest.raises(RuntimeError, match=match):
            fusedtrain._ops.step_("adam4bit", hyper, [p], [g], states, [step], lr=0.1)
        assert torch.equal(p, before) and float(step) == 0.0
        assert all(torch.equal(a, b) for a, b in zip(states, snapshot))
    fusedtrain._ops.step_("adam4bit", hyper, [p], [g], good, [step], lr=0.1)
    assert float(step) == 1.0 and int(good[0].view(torch.uint8).long().sum()) > 0


def test_traced_step_equals_planned_step() -> None:
    torch.manual_seed(6)
    a = [torch.randn(5001, requires_grad=True), torch.randn(10, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    oa = fusedtrain.optim.AdamW(a, lr=0.01, state_bits=4)
    ob = fusedtrain.optim.AdamW(b, lr=0.01, state_bits=4)
    for _ in range(3):
        for x, y in zip(a, b):
            gr = torch.randn(x.shape)
            x.grad, y.grad = gr.clone(), gr.clone()
        oa.step()
        ob._step_traced()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for k, v in oa.state[x].items():
            assert (torch.equal(v, ob.state[y][k]) if isinstance(v, torch.Tensor) else v == ob.state[y][k]), k


def test_master_weights_update_the_master_as_a_float32_parameter() -> None:
    """bfloat16 parameters with float32 masters: the master and its 4-bit states follow exactly the float32
    parameter run with the same (bfloat16) gradients; the parameter is the master rounded."""
    torch.manual_seed(4)
    p32 = torch.randn(4096 * 2 + 1).to(torch.bfloat16).float().requires_grad_()
    p16 = p32.detach().to(torch.bfloat16).requires_grad_()
    o16 = fusedtrain.optim.AdamW([p16], lr=1e-2, state_bits=4, master_weights=True)
    o32 = fusedtrain.optim.AdamW([p32], lr=1e-2, state_bits=4)
    for _ in range(5):
        gr = torch.randn(p16.shape).to(torch.bfloat16)
        p16.grad, p32.grad = gr.clone(), gr.float()
        o16.step()
        o32.step()
    st = o16.state[p16]
    assert st["exp_avg"].dtype == torch.int8 and st["master_param"].dtype == torch.float32
    assert torch.equal(st["master_param"], p32.detach()) and torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))
    for key in ("exp_avg", "exp_avg_absmax4", "exp_avg_sq", "exp_avg_sq_absmax4"):
        assert torch.equal(st[key], o32.state[p32][key]), key


@pytest.mark.parametrize("opts", [dict(stochastic_rounding=True), dict()])
def test_bfloat16_params_keep_the_float32_states(opts: dict[str, Any]) -> None:
    """Without weight decay Adam's states depend on the gradients alone: a bfloat16 parameter (stochastic
    rounding or not) gets exactly the codes and scales of a float32 parameter with the same gradients, and
    stays within bfloat16 rounding of it."""
    torch.manual_seed(5)
    p32 = torch.randn(4096 + 3).to(torch.bfloat16).float().requires_grad_()
    p16 = p32.detach().to(torch.bfloat16).requires_grad_()
    o16 = fusedtrain.optim.Adam([p16], lr=1e-2, state_bits=4, **opts)
    o32 = fusedtrain.optim.Adam([p32], lr=1e-2, state_bits=4)
    for _ in range(5):
        gr = torch.randn(p16.shape).to(torch.bfloat16)
        p16.grad, p32.grad = gr.clone(), gr.float()
        o16.step()
        o32.step()
    for key in ("exp_avg", "exp_avg_absmax4", "exp_avg_sq", "exp_avg_sq_absmax4"):
        assert torch.equal(o16.state[p16][key], o32.state[p32][key]), key
    # 5 roundings of at most one bfloat16 ulp (<= 2^-7 relative) of values within 5 lr of the final one
    bound = 5 * 2 ** -7 * (p32.detach().abs() + 5e-2)
    assert bool(((p16.detach().float() - p32.detach()).abs() <= bound).all())


# --------------------------------------------------------------------------------- checkpoints
def _model_params(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(5001, requires_grad=True), torch.randn(64, 81, requires_grad=True),
            torch.randn(10, requires_grad=True)]


def test_checkpoint_resumes_bit_exactly() -> None:
    params = _model_params(8)
    g = torch.Generator().manual_seed(9)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(10)]
    opt = fusedtrain.optim.AdamW(params, lr=0.01, state_bits=4)
    run_grads(opt, params, grads[:5])
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    sd = opt.state_dict()["state"]
    assert sd[1]["exp_avg"].dtype == torch.int8 and sd[1]["exp_avg_sq"].dtype == torch.uint8
    assert sd[1]["exp_avg"].shape == (64 * 81 // 2,) and sd[1]["exp_avg_shape4"] == (64, 81)
    assert sd[0]["exp_avg_sq"].shape == (2501,) and sd[0]["exp_avg_sq_shape4"] == (5001,)
    assert sd[1]["exp_avg_absmax4"].dtype == torch.float32 and sd[1]["exp_avg_absmax4"].shape == (41,)
    assert opt.state_dict()["state"][2]["exp_avg"].dtype == torch.float32  # below min_8bit_size
    run_grads(opt, params, grads[5:])
    buf.seek(0)
    saved = torch.load(buf)  # (weights_only: the shape tuples load)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = fusedtrain.optim.AdamW(resumed, lr=0.01, state_bits=4)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[0]]["exp_avg"].dtype == torch.int8
    run_grads(opt2, resumed, grads[5:])
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert (torch.equal(v, opt2.state[q][k]) if isinstance(v, torch.Tensor) else v == opt2.state[q][k]), k


def test_to_torch_state_dict_loads_into_torch() -> None:
    params = _model_params(10)
    g = torch.Generator().manual_seed(11)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
    opt = fusedtrain.optim.AdamW(params, lr=0.01, state_bits=4)
    run_grads(opt, params, grads)
    sd = fusedtrain.optim.to_torch_state_dict(opt.state_dict())
    for entry in sd["state"].values():
        assert not any(k.endswith(("_absmax4", "_shape4")) for k in entry)
        assert entry["exp_avg"].dtype == torch.float32
    tparams = [p.detach().clone().requires_grad_() for p in params]
    topt = torch.optim.AdamW(tparams, lr=0.01)
    topt.load_state_dict(sd)
    st = opt.state[params[1]]
    want = _quant.dequantize4(st["exp_avg_sq"], st["exp_avg_sq_absmax4"], params[1].shape)
    assert torch.equal(topt.state[tparams[1]]["exp_avg_sq"], want)
    run_grads(topt, tparams, grads[:1])  # torch steps from it
    assert opt.state_dict()["state"][0]["exp_avg"].dtype == torch.int8  # the input is left as it was


def test_torch_state_dict_is_quantized_on_load_and_converted_between_widths() -> None:
    params = _model_params(12)
    g = torch.Generator().manual_seed(13)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
    topt = torch.optim.AdamW(params, lr=0.01)
    run_grads(topt, params, grads)
    mine = [p.detach().clone().requires_grad_() for p in params]
    opt = fusedtrain.optim.AdamW(mine, lr=0.01, state_bits=4)
    opt.load_state_dict(topt.state_dict())
    st = opt.state[mine[1]]
    for key in ("exp_avg", "exp_avg_sq"):
        codes, absmax = _quant.quantize4(topt.state[params[1]][key], SIGNED[key])
        assert torch.equal(st[key], codes) and torch.equal(st[key + "_absmax4"], absmax)
    assert opt.state[mine[2]]["exp_avg"].dtype == torch.float32
    run_grads(opt, mine, grads[:1])
    # a 4-bit checkpoint loads into a 32-bit optimizer as float states, and into an 8-bit one requantized
    for bits in (32, 8):
        other = [p.detach().clone().requires_grad_() for p in mine]
        o = fusedtrain.optim.AdamW(other, lr=0.01, state_bits=bits)
        o.load_state_dict(opt.state_dict())
        so = o.state[other[1]]
        assert "exp_avg_absmax4" not in so and "exp_avg_shape4" not in so
        floats = _quant.dequantize4(st["exp_avg"], st["exp_avg_absmax4"], mine[1].shape)
        if bits == 32:
            assert so["exp_avg"].dtype == torch.float32 and torch.equal(so["exp_avg"], floats)
        else:
            codes, absmax = _quant.quantize(floats, True)
            assert torch.equal(so["exp_avg"], codes) and torch.equal(so["exp_avg_absmax"], absmax)
        run_grads(o, other, grads[:1])
    # and an 8-bit checkpoint into a 4-bit optimizer
    eight = [p.detach().clone().requires_grad_() for p in mine]
    o8 = fusedtrain.optim.AdamW(eight, lr=0.01, state_bits=8)
    run_grads(o8, eight, grads[:2])
    back = [p.detach().clone().requires_grad_() for p in eight]
    o4 = fusedtrain.optim.AdamW(back, lr=0.01, state_bits=4)
    o4.load_state_dict(o8.state_dict())
    s8 = o8.state[eight[1]]
    codes, absmax = _quant.quantize4(_quant.dequantize(s8["exp_avg_sq"], s8["exp_avg_sq_absmax"]), False)
    assert torch.equal(o4.state[back[1]]["exp_avg_sq"], codes) and "exp_avg_sq_absmax" not in o4.state[back[1]]
    run_grads(o4, back, grads[:1])


def test_deepcopy_and_pickle_keep_state_bits() -> None:
    p = [torch.randn(5000, requires_grad=True)]
    opt = fusedtrain.optim.AdamW(p, lr=0.01, state_bits=4, min_8bit_size=100)
    p[0].grad = torch.randn(5000)
    opt.step()
    for c in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert c.state_bits == 4 and c.min_8bit_size == 100
        (q,) = c.param_groups[0]["params"]
        q.grad = p[0].grad.clone()
        c.step()
        assert c.state[q]["exp_avg"].dtype == torch.int8


# ---------------------------------------------------------------------------------- convergence
def test_convergence_4bit_against_float32() -> None:
    """The digits MLP of the 8-bit convergence test (tests/_helpers.py: digits_loss), five batch orders. 4 bits is
    not as close as 8 bits: measured (benchmarks/NOTES.md, "4-bit optimizer states") -1.1, +8.1, +4.8, +17.7 and
    +19.2 % above float32 after 100 steps (8 bits: within 1 % on each). The bounds guard that, not the 2 % of
    8 bits: every order within 25 %, the median within 10 % (a zero code for the second moments diverged,
    quantizing them without square roots cost 11-13 %)."""
    gaps = []
    for order in DIGITS_ORDERS:
        full, low = digits_loss(32, order), digits_loss(4, order)
        assert full < 0.15, (order, full)  # it learned
        gaps.append((low - full) / full)
    assert max(gaps) <= 0.25 and sorted(gaps)[len(gaps) // 2] <= 0.10, gaps
