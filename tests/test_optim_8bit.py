"""8-bit blockwise-quantized optimizer states (state_bits=8; Note [8-bit optimizer states] in
csrc/include/fusedtrain/quant.h): the code maps, quantization against float64 references, the kernels
against torch.optim stepping the dequantized states, checkpoints, and convergence."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import fusedtrain
import pytest
import torch
from fusedtrain.optim import _quant

from _helpers import (DIGITS_ORDERS, assert_cuda_matches_cpu_8bit, assert_same_values, digits_loss, run_grads,
                      step_cpu_and_cuda)

BLOCK = 256


def _row_blocks(shape: torch.Size) -> list[tuple[int, int, int, int]]:
    """The blocks of Note [row blocks], written out here (independent of _quant): (row, block within the row,
    first element, end) in row-major element order; a parameter of >= 2 dims has size(0) rows of
    prod(shape[1:]) elements, a smaller one a single row."""
    rows, row = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))
    return [(r, k, r * row + k * BLOCK, r * row + min(row, (k + 1) * BLOCK))
            for r in range(rows) for k in range(math.ceil(row / BLOCK))]


def _absmax_shape(shape: torch.Size) -> tuple[int, ...]:
    rows, row = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))
    return (rows, math.ceil(row / BLOCK)) if len(shape) >= 2 else (math.ceil(row / BLOCK),)


# ------------------------------------------------------------------------------------------- maps
def _formula_unsigned() -> list[float]:
    """The documented unsigned map, recomputed in float64 here (independent of the C++ table)."""
    out = [0.0]
    for e in range(7):
        for j in range(2 ** (e + 1)):
            out.append(10.0 ** (e - 6) * (0.1 + 0.9 * j / 2 ** (e + 1)))
    return out + [1.0]


def _formula_signed() -> list[float]:
    """Magnitudes of signed codes 0..127."""
    out = [0.0]
    for e in range(1, 7):
        for j in range(2 ** e):
            out.append(10.0 ** (e - 6) * (0.1 + 0.9 * j / 2 ** e))
    return out + [1.0]


def test_code_maps_follow_the_documented_formula() -> None:
    m = _quant.maps()
    u, s = m["unsigned"].double(), m["signed"].double()
    assert u.shape == (256,) and s.shape == (256,)
    torch.testing.assert_close(u, torch.tensor(_formula_unsigned(), dtype=torch.float64).float().double(),
                               rtol=0, atol=0)
    mags = torch.tensor(_formula_signed(), dtype=torch.float64).float().double()
    torch.testing.assert_close(s[128:], mags, rtol=0, atol=0)            # codes 0..127
    torch.testing.assert_close(s[1:128], -mags[1:].flip(0), rtol=0, atol=0)  # codes -127..-1
    assert s[0] == -1.0  # code -128 decodes to -1 (never written)


def test_code_map_properties() -> None:
    m = _quant.maps()
    u, s = m["unsigned"], m["signed"]
    assert bool((u[1:] > u[:-1]).all()), "unsigned map must be strictly increasing"
    assert bool((s[2:] > s[1:-1]).all()), "signed map (codes -127..127) must be strictly increasing"
    assert u[0] == 0 and u[255] == 1
    assert s[128] == 0 and s[255] == 1 and s[1] == -1  # code 0, +127, -127
    assert bool((s[129:] == -s[1:128].flip(0)).all()), "signed map must be symmetric"
    # dynamic: small values keep their relative precision (8 decades), the top decade is fine-grained
    nz = u[1:]
    assert float(nz[0]) == pytest.approx(1e-7, rel=1e-6) and float(s[129]) == pytest.approx(1e-6, rel=1e-6)
    rel = (nz[1:] - nz[:-1]) / nz[1:]
    assert float(rel[nz[1:] > 0.1].max()) < 0.08 and float(rel[nz[1:] > 0.01].max()) < 0.15
    assert float(rel.max()) < 0.82  # the coarsest step: 1e-7 -> 5.5e-7


def _nearest_codes_f64(xn: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float64 reference of the nearest code: argmin over the table of |x - map[c]|."""
    m = _quant.maps()
    if signed:
        table = m["signed"][1:].double()  # codes -127..127
        d = (xn.double()[:, None] - table[None, :]).abs()
        return d.argmin(dim=1) - 127
    table = m["unsigned"].double()
    return (xn.double()[:, None] - table[None, :]).abs().argmin(dim=1)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 4097])
def test_quantize_round_trip_is_nearest_and_bounded(signed: bool, n: int) -> None:
    g = torch.Generator().manual_seed(n + signed)
    # magnitudes spread over 8 decades, the shape of Adam's states
    mag = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-18, 0, generator=g))
    x = (mag * (torch.randint(0, 2, (n,), generator=g) * 2 - 1) if signed else mag).float()
    codes, absmax = _quant.quantize(x, signed)
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.shape == x.shape
    assert absmax.shape == (math.ceil(n / BLOCK),) and absmax.dtype == torch.float32
    back = _quant.dequantize(codes, absmax).double()
    if not signed:  # unsigned codes hold sqrt(state) (Note [square-root states]): check in that domain
        x, back = x.sqrt(), back.sqrt()
    pad = torch.zeros(absmax.numel() * BLOCK)
    pad[:n] = x.abs()
    torch.testing.assert_close(absmax, pad.view(-1, BLOCK).amax(1), rtol=0, atol=0)
    scale = absmax.double().repeat_interleave(BLOCK)[:n]
    xn = x.double() / scale
    ref = _nearest_codes_f64(xn, signed)
    got = codes.long()
    # nearest up to ties decided by float32 midpoints: a differing code must be equally near in float64
    m = _quant.maps()
    table = (m["signed"][1:] if signed else m["unsigned"]).double()
    off = 127 if signed else 0
    err_got = (xn - table[got + off]).abs()
    err_ref = (xn - table[ref + off]).abs()
    assert bool((err_got <= err_ref + 1e-7).all())
    # the round-trip error is at most half the gap to the neighbouring entry (relative to the block's absmax)
    gaps = (table[1:] - table[:-1])
    idx = (got + off).clamp(max=table.numel() - 2)
    bound = torch.maximum(gaps[idx], gaps[(idx - 1).clamp(min=0)]) / 2 * scale + 1e-12
    assert bool(((back - x.double()).abs() <= bound * (1 + 1e-6) + 1e-7 * x.double().abs()).all())
    # the block's largest magnitude is exact (up to the square root's rounding for unsigned codes)
    for b in range(absmax.numel()):
        seg = x[b * BLOCK:(b + 1) * BLOCK]
        i = int(seg.abs().argmax())
        assert float(back[b * BLOCK + i]) == pytest.approx(float(seg[i]), rel=0 if signed else 1e-7)


def test_quantize_edges() -> None:
    codes, absmax = _quant.quantize(torch.zeros(300), False)
    assert int(codes.abs().sum()) == 0 and float(absmax.abs().sum()) == 0
    assert bool((_quant.dequantize(codes, absmax) == 0).all())
    with pytest.raises(ValueError, match="negative"):
        _quant.quantize(torch.tensor([-1.0, 2.0]), False)
    with pytest.raises(ValueError, match="absmax must be float32"):
        _quant.dequantize(torch.zeros(300, dtype=torch.uint8), torch.zeros(1))
    with pytest.raises(ValueError, match=r"absmax must be float32 of shape \[5, 2\]"):  # the flat layout's [6]
        _quant.dequantize(torch.zeros(5, 300, dtype=torch.int8), torch.zeros(6))
    # 0-dim and empty states
    for shape in [(), (0,), (0, 300), (4, 0), (3, 0, 2)]:
        x = torch.rand(shape)
        codes, absmax = _quant.quantize(x, False)
        assert codes.shape == x.shape and absmax.shape == _absmax_shape(torch.Size(shape))
        torch.testing.assert_close(_quant.dequantize(codes, absmax), x, rtol=0.05, atol=0)


ROW_SHAPES = [(5, 300), (3, 7, 5, 5), (1000, 10), (2, 512), (1, 1, 257)]


def _reference_quantize(y: torch.Tensor, signed: bool, absmax: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Note [row blocks] in float64, block by block (_row_blocks): absmax = max |y| of the block (or the given
    one), codes = the nearest map entry of y / absmax (argmin, _nearest_codes_f64); y is the state (signed) or
    its square root (unsigned)."""
    flat = y.double().reshape(-1)
    given = absmax is not None
    scales = absmax.double().reshape(-1) if given else torch.zeros(len(_row_blocks(y.shape)), dtype=torch.float64)
    codes = torch.zeros(flat.numel(), dtype=torch.long)
    for b, (_, _, e0, e1) in enumerate(_row_blocks(y.shape)):
        if not given:
            scales[b] = flat[e0:e1].abs().max()
        scale = float(scales[b])
        if scale > 0:
            codes[e0:e1] = _nearest_codes_f64(flat[e0:e1] / scale, signed)
    return codes.view(y.shape), scales.view(_absmax_shape(y.shape))


@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_uses_row_blocks(shape: tuple[int, ...], signed: bool) -> None:
    """Blocks stay inside a dim-0 slice (Note [row blocks]): absmax and codes against the float64 reference
    computed block by block; where 256 divides the row it is the flat layout with absmax reshaped."""
    g = torch.Generator().manual_seed(sum(shape) + signed)
    mag = torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(-18, 0, generator=g))
    x = (mag * (torch.randint(0, 2, shape, generator=g) * 2 - 1) if signed else mag).float()
    codes, absmax = _quant.quantize(x, signed)
    assert codes.shape == x.shape and absmax.shape == _absmax_shape(x.shape) == _quant.absmax_shape(x.shape)
    y = x if signed else x.sqrt()  # (the square root in float32, as the kernels take it)
    ref_codes, ref_absmax = _reference_quantize(y, signed)
    assert torch.equal(absmax, ref_absmax.float())
    ref_codes, _ = _reference_quantize(y, signed, absmax)
    diff = (codes.long() - ref_codes).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01  # ties at float32 midpoints only
    back = _quant.dequantize(codes, absmax)
    for b, (r, k, e0, e1) in enumerate(_row_blocks(x.shape)):
        top = int(y.reshape(-1)[e0:e1].abs().argmax()) + e0
        assert float(back.reshape(-1)[top]) == pytest.approx(float(x.reshape(-1)[top]), rel=0 if signed else 1e-6)
    if math.prod(shape[1:]) % BLOCK == 0:
        flat_codes, flat_absmax = _quant.quantize(x.reshape(-1), signed)
        assert torch.equal(codes.reshape(-1), flat_codes) and torch.equal(absmax.reshape(-1), flat_absmax)


# ----------------------------------------------------------------------------- kernels vs torch
def _reference_step(p_before: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], kind: str,
                    kw: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One torch.optim step from the dequantized 8-bit state (opmath precision: float64 for float64
    parameters, float32 otherwise), returning the new parameter (rounded to its dtype) and the float states."""
    op = torch.float64 if p_before.dtype == torch.float64 else torch.float32
    p = p_before.detach().to(op).clone().requires_grad_()
    p.grad = grad.detach().to(op).clone()
    # torch's class, or (Lion: timm's, not in torch) fusedtrain's float-state class, tested against timm's elsewhere
    cls = getattr(torch.optim, kind, None) or getattr(fusedtrain.optim, kind)
    opt = cls([p], foreach=False, **kw)
    st: dict[str, Any] = {"step": state["step"].clone().float()} if "step" in state else {}
    for key, value in state.items():  # tensor scalars (NAdam's mu_product)
        if key not in SIGNED and key != "step" and not key.endswith("_absmax"):
            st[key] = value.clone()
    for key in SIGNED:
        if key in state:
            value = state[key]
            st[key] = (_quant.dequantize(value, state[key + "_absmax"], op) if _quant.is_codes(value)
                       else value.to(op)).view(p.shape).clone()
    opt.state[p] = st
    opt.step()
    return p.detach().to(p_before.dtype), {k: v for k, v in opt.state[p].items() if k != "step"}


SIZES = [1, 255, 256, 257, 4097]
# state key -> whether it is stored with signed (int8) codes
SIGNED = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False, "momentum_buffer": True, "sum": False,
          "square_avg": False, "grad_avg": True, "exp_inf": False, "acc_delta": False}
CASES: list[tuple[str, dict[str, Any]]] = [
    ("Adam", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, maximize=True)),
    ("AdamW", dict(lr=0.01, amsgrad=True)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True)),
    # the optimizers added after the first 8-bit rules (rules_quant_more.h)
    ("NAdam", dict(lr=0.01)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("RAdam", dict(lr=0.01)),
    ("RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("Adamax", dict(lr=0.01, weight_decay=0.1)),
    ("Adadelta", dict(lr=1.0, weight_decay=0.01)),
    ("Lion", dict(lr=0.01, weight_decay=0.1)),
]


def _check_against_reference(kind: str, kw: dict[str, Any], params: list[torch.Tensor], steps: int = 6) -> None:
    opt = getattr(fusedtrain.optim, kind)(params, state_bits=8, min_8bit_size=0, **kw)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]
        before = {}
        for p, gr in zip(params, grads):
            p.grad = gr
            if p in opt.state:
                before[p] = ({k: v.clone() for k, v in opt.state[p].items()}, p.detach().clone())
        opt.step()
        for p, gr in zip(params, grads):
            st = opt.state[p]
            keys = [k for k in SIGNED if k in st]
            assert keys
            for key in keys:
                assert st[key].dtype == (torch.int8 if SIGNED[key] else torch.uint8) and st[key].shape == p.shape
                assert st[key + "_absmax"].shape == _absmax_shape(p.shape)
            if p not in before:
                continue
            old_state, old_p = before[p]
            if not all(_quant.is_codes(old_state[k]) for k in keys):
                continue  # (Adagrad's constructor makes float sums: the kernel starts from their quantized form)
            new_p, ref = _reference_step(old_p, gr, old_state, kind, kw)
            if p.dtype in (torch.float16, torch.bfloat16):
                # one rounding of the same float32 value: equal, or one ulp apart where float32 differs by ulps
                torch.testing.assert_close(p.detach().float(), new_p.float(), rtol=1e-2, atol=1e-5)
            else:
                tol = 1e-12 if p.dtype == torch.float64 else 2e-6
                torch.testing.assert_close(p.detach(), new_p, rtol=tol, atol=tol)
            for key in keys:
                codes, absmax = _quant.quantize(ref[key], SIGNED[key])
                rtol = 4e-6 if p.dtype != torch.float64 else 1e-12  # float32: the functors agree to a few ulps
                torch.testing.assert_close(st[key + "_absmax"], absmax, rtol=rtol, atol=0)
                diff = (st[key].long() - codes.long()).abs()
                # the kernel's float32 math agrees with torch's to ulps: a code may differ only by one, at a
                # midpoint, and rarely
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01, (key, int(diff.sum()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + "-" + "-".join(map(str, c[1].values())))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_torch_on_dequantized_states(case: tuple[str, dict[str, Any]], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    # (1, n): one row of n elements, the flat blocks (1-D parameters keep float32 states)
    params = [torch.randn(1, n, dtype=torch.float64).to(dtype).requires_grad_() for n in SIZES]
    params.append(torch.randn(70, 40, dtype=torch.float64).to(dtype).t().requires_grad_())  # non-contiguous
    params.append(torch.randn(30, 40, dtype=torch.float64).to(dtype)[:, ::2].requires_grad_())  # not dense
    _check_against_reference(case[0], case[1], params)


def _dequantize_by_blocks(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """The state of (codes, absmax) block by block (_row_blocks), as Note [8-bit optimizer states] defines it:
    map[code] * absmax in float32, squared for unsigned codes; returned in float64."""
    table = _quant.maps()["signed" if codes.dtype == torch.int8 else "unsigned"]
    idx = codes.reshape(-1).long() + (128 if codes.dtype == torch.int8 else 0)
    out = torch.empty(codes.numel(), dtype=torch.float32)
    for b, (_, _, e0, e1) in enumerate(_row_blocks(codes.shape)):
        out[e0:e1] = table[idx[e0:e1]] * absmax.reshape(-1)[b]
    if codes.dtype == torch.uint8:
        out = out * out
    return out.double().view(codes.shape)


ROW_CASES = [("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
             ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
             ("RMSprop", dict(lr=0.01, momentum=0.9))]


@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_row_blocks_match_float64_reference(case: tuple[str, dict[str, Any]], dtype: torch.dtype) -> None:
    """Rows of 300, 175, 10, 512 and 257 elements (blocks with short tails), contiguous, transposed and not
    dense, in one call: each step equals dequantize (block by block) -> torch.optim's update in float64 ->
    requantize (block by block, float64), up to the kernel's opmath rounding."""
    kind, kw = case
    torch.manual_seed(14)
    params = [torch.randn(shape, dtype=torch.float64).to(dtype).requires_grad_() for shape in ROW_SHAPES]
    params.append(torch.randn(300, 5, dtype=torch.float64).to(dtype).t().requires_grad_())  # [5, 300], transposed
    params.append(torch.randn(3, 7, 5, 10, dtype=torch.float64).to(dtype)[..., ::2].requires_grad_())  # not dense
    opt = getattr(fusedtrain.optim, kind)(params, state_bits=8, min_8bit_size=0, **kw)
    g = torch.Generator().manual_seed(15)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for step in range(4):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        before = [({k: v.clone() for k, v in opt.state[p].items()}, p.detach().double().clone()) if step else None
                  for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.to(dtype)
        opt.step()
        for p, gr, old in zip(params, grads, before):
            st = opt.state[p]
            keys = [k for k in SIGNED if k in st]
            for key in keys:
                assert st[key].shape == p.shape and st[key + "_absmax"].shape == _absmax_shape(p.shape)
            if old is None:
                continue
            old_state, old_p = old
            ref_p = old_p.clone().requires_grad_()
            ref_p.grad = gr.clone()
            ref = getattr(torch.optim, kind)([ref_p], foreach=False, **kw)
            ref.state[ref_p] = {"step": old_state["step"].clone()} if "step" in old_state else {}
            for key in keys:
                ref.state[ref_p][key] = _dequantize_by_blocks(old_state[key], old_state[key + "_absmax"])
            ref.step()
            torch.testing.assert_close(p.detach().double(), ref_p.detach(), rtol=tol, atol=tol)
            for key in keys:
                state = ref.state[ref_p][key]
                y = state if SIGNED[key] else state.sqrt()
                _, want_absmax = _reference_quantize(y, SIGNED[key])
                torch.testing.assert_close(st[key + "_absmax"].double(), want_absmax, rtol=4e-6, atol=0)
                want_codes, _ = _reference_quantize(y, SIGNED[key], st[key + "_absmax"])
                diff = (st[key].long() - want_codes).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01, (key, int(diff.sum()))


@pytest.mark.cuda
@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: c[0])
def test_cuda_row_blocks_equal_cpu(case: tuple[str, dict[str, Any]]) -> None:
    """The CUDA block launch walks the same row blocks (its table carries each tensor's row length) and, in
    float64 (no fused multiply-add differences in the functors), writes the CPU's parameters, codes and scales."""
    kind, kw = case
    torch.manual_seed(16)
    shapes = ROW_SHAPES + [(2, 3, 0), (7, 1)]
    cpu = [torch.randn(shape, dtype=torch.float64).requires_grad_() for shape in shapes]
    gpu, opts = step_cpu_and_cuda(getattr(fusedtrain.optim, kind), cpu, dict(state_bits=8, min_8bit_size=0, **kw))
    assert_cuda_matches_cpu_8bit(cpu, gpu, opts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    params = [torch.randn(1, n).to(dtype).requires_grad_() for n in (257, 4097)]
    _check_against_reference("AdamW", dict(lr=0.01), params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_codes_at_every_midpoint(dtype: torch.dtype) -> None:
    """The kernels' encoder against the reference search, at and next to every midpoint of both maps: with
    betas (0, 0) one Adam step leaves exp_avg = g and exp_avg_sq = g*g exactly, and a 1 per block fixes the
    block's absmax to 1, so the kernel quantizes exactly the values given."""
    tables = _quant._tables()
    xs = []
    for mids in (tables["signed_mid"], tables["unsigned_mid"]):
        m = torch.tensor(mids, dtype=torch.float32)
        for x in (m, torch.nextafter(m, torch.zeros(())), torch.nextafter(m, torch.ones(()))):
            xs.append(x.to(dtype))
            xs.append(x.double().sqrt().to(dtype))  # g*g near the unsigned midpoints
    g = torch.cat(xs + [torch.tensor([0.0, 1e-30, 1.0], dtype=dtype)])
    g = torch.cat([g, -g])
    n = g.numel()
    blocks = math.ceil(n / (BLOCK - 1))
    full = torch.ones(blocks, BLOCK, dtype=dtype)  # element 0 of every block (row) is 1
    body = full[:, 1:].reshape(-1)
    body[:n] = g
    body[n:] = 0
    full[:, 1:] = body.view(blocks, BLOCK - 1)
    p = torch.zeros_like(full, requires_grad=True)
    p.grad = full.clone()
    opt = fusedtrain.optim.Adam([p], lr=0.0, betas=(0.0, 0.0), state_bits=8, min_8bit_size=0)
    opt.step()
    st = opt.state[p]
    codes, absmax = _quant.quantize(full, True)
    assert torch.equal(st["exp_avg_absmax"], absmax) and torch.equal(st["exp_avg"], codes)
    codes, absmax = _quant.quantize(full * full, False)
    assert torch.equal(st["exp_avg_sq_absmax"], absmax) and torch.equal(st["exp_avg_sq"], codes)


def test_non_contiguous_param_uses_row_major_blocks() -> None:
    """Blocks follow the row-major element order: a transposed parameter gets the codes of its contiguous twin."""
    torch.manual_seed(2)
    base = torch.randn(300, 20)
    a = base.t().contiguous().requires_grad_()
    b = base.clone().t().requires_grad_()  # same values, transposed strides
    oa = fusedtrain.optim.AdamW([a], lr=0.01, state_bits=8, min_8bit_size=0)
    ob = fusedtrain.optim.AdamW([b], lr=0.01, state_bits=8, min_8bit_size=0)
    for _ in range(3):
        g = torch.randn(20, 300)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a.detach(), b.detach())
    for key in ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"):
        assert torch.equal(oa.state[a][key], ob.state[b][key]), key


# ------------------------------------------------------------------------------------ options, api
def test_small_params_keep_float_states_and_memory() -> None:
    big = torch.randn(512, 300, requires_grad=True)
    narrow = torch.randn(512, 64, requires_grad=True)
    small = torch.randn(100, requires_grad=True)
    vector = torch.randn(5000, requires_grad=True)  # 1-D: float32 states (Note [8-bit states in the optimizers])
    opt = fusedtrain.optim.AdamW8bit([big, narrow, small, vector], lr=1e-3)
    assert opt.state_bits == 8 and opt.min_8bit_size == 4096
    for p in (big, narrow, small, vector):
        p.grad = torch.randn_like(p)
    opt.step()
    for p in (small, vector):
        assert opt.state[p]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in opt.state[p]
    for p in (big, narrow):
        nbytes = sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if k != "step")
        # two states: one byte each per element, and 4 bytes per block of up to 256 elements of a row
        assert nbytes == 2 * p.numel() + 2 * 4 * p.shape[0] * math.ceil(p.shape[1] / BLOCK)
        assert nbytes / p.numel() <= (2.1 if p is big else 2.13)  # (rows of 64: one scale per 64 elements)
    opt2 = fusedtrain.optim.AdamW([big], lr=1e-3, state_bits=8, min_8bit_size=10**6)
    big.grad = torch.randn_like(big)
    opt2.step()
    assert opt2.state[big]["exp_avg"].dtype == torch.float32


def test_aliases_equal_state_bits_8() -> None:
    torch.manual_seed(3)
    a = torch.randn(50, 100, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    oa = fusedtrain.optim.AdamW8bit([a], lr=0.01)
    ob = fusedtrain.optim.AdamW([b], lr=0.01, state_bits=8)
    for _ in range(3):
        g = torch.randn(50, 100)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b) and torch.equal(oa.state[a]["exp_avg"], ob.state[b]["exp_avg"])
    assert isinstance(fusedtrain.optim.Adam8bit([torch.zeros(1, requires_grad=True)]), fusedtrain.optim.Adam)


def test_bad_options_are_refused() -> None:
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="state_bits"):
        fusedtrain.optim.AdamW(p, state_bits=16)
    with pytest.raises(ValueError, match="state_dtype"):
        fusedtrain.optim.AdamW(p, state_bits=8, state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="differentiable"):
        fusedtrain.optim.AdamW(p, state_bits=8, differentiable=True)
    with pytest.raises(ValueError, match="min_8bit_size"):
        fusedtrain.optim.AdamW(p, state_bits=8, min_8bit_size=-1)


# optimizers without an 8-bit rule refuse state_bits=8 in the constructor, naming the argument
REFUSING: list[tuple[str, dict[str, Any]]] = [
    ("ASGD", {}), ("Rprop", {}), ("ScheduleFreeSGD", {}), ("Adafactor", {}),
]


@pytest.mark.parametrize("case", REFUSING, ids=lambda c: c[0])
def test_optimizers_without_8bit_states_refuse_state_bits_8(case: tuple[str, dict[str, Any]]) -> None:
    name, kw = case
    if not hasattr(fusedtrain.optim, name):
        pytest.skip(f"fusedtrain.optim.{name} needs a newer torch")
    cls = getattr(fusedtrain.optim, name)
    p = torch.zeros(64, 64, requires_grad=True)
    with pytest.raises(ValueError, match="state_bits=(8|32)"):
        cls([p], state_bits=8, **kw)
    opt = cls([p], state_bits=32, **kw)  # the default is accepted
    assert getattr(opt, "state_bits", 32) == 32


def test_8bit_optimizers_list() -> None:
    """Every optimizer class with per-element state either has an 8-bit rule or is in REFUSING."""
    have = {name for name in fusedtrain.optim.__all__
            if isinstance(getattr(fusedtrain.optim, name), type)
            and getattr(getattr(fusedtrain.optim, name), "_rule_8bit", None) is not None}
    assert have >= {"SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adadelta", "Lion",
                    "Adam8bit", "AdamW8bit", "Lamb", "Lars", "ScheduleFreeAdamW"} | (
                        {"Muon"} if hasattr(fusedtrain.optim, "Muon") else set())
    others = {getattr(fusedtrain.optim, name) for name in fusedtrain.optim.__all__
              if isinstance(getattr(fusedtrain.optim, name), type)
              and issubclass(getattr(fusedtrain.optim, name), torch.optim.Optimizer) and name not in have}
    refusing = {getattr(fusedtrain.optim, name) for name, _ in REFUSING if hasattr(fusedtrain.optim, name)}
    assert others <= refusing, others - refusing
    for name in have:  # the 8-bit rule takes its float rule's hyperparameters (Muon: its momentum pass's)
        cls = getattr(fusedtrain.optim, name)
        float_rule = "muon_momentum" if name == "Muon" else cls._rule
        assert fusedtrain._ops.RULES[cls._rule_8bit]["hyper"] == fusedtrain._ops.RULES[float_rule]["hyper"]


def test_op_refuses_bad_quantized_lists_and_writes_nothing() -> None:
    p = torch.randn(300)
    g = torch.randn(300)
    step = torch.tensor(0.0)
    good = [torch.zeros(300, dtype=torch.int8), torch.zeros(2), torch.zeros(300, dtype=torch.uint8), torch.zeros(2)]
    hyper = fusedtrain._ops.hyper_list("adam8bit", dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                                        amsgrad=False, maximize=False, decoupled_weight_decay=True))
    bad_lists = [
        ([torch.zeros(300, dtype=torch.uint8)] + good[1:], "int8|Char"),   # signed state with unsigned codes
        (good[:1] + [torch.zeros(3)] + good[2:], r"float32 of shape \[2\]"),  # wrong number of blocks
        (good[:3] + [torch.zeros(2, dtype=torch.float64)], "float32"),
        ([torch.zeros(299, dtype=torch.int8)] + good[1:], "shape"),
    ]
    for states, match in bad_lists:
        before = p.clone()
        with pytest.raises(RuntimeError, match=match):
            fusedtrain._ops.step_("adam8bit", hyper, [p], [g], states, [step], lr=0.1)
        assert torch.equal(p, before) and float(step) == 0.0
    fusedtrain._ops.step_("adam8bit", hyper, [p], [g], good, [step], lr=0.1)
    assert float(step) == 1.0 and int(good[0].abs().sum()) > 0


@pytest.mark.parametrize("opts", [dict(master_weights=True), dict(stochastic_rounding=True), dict()])
def test_bfloat16_options_run_and_track_float_states(opts: dict[str, Any]) -> None:
    torch.manual_seed(4)
    p32 = torch.randn(64, 128, requires_grad=True)
    p8 = p32.detach().to(torch.bfloat16).requires_grad_()
    ref = p32.detach().to(torch.bfloat16).requires_grad_()
    start = p8.detach().float().clone()
    o8 = fusedtrain.optim.AdamW([p8], lr=1e-2, state_bits=8, **opts)
    oref = fusedtrain.optim.AdamW([ref], lr=1e-2, **opts)
    for _ in range(20):
        g = torch.randn(p8.shape).to(torch.bfloat16)
        p8.grad, ref.grad = g.clone(), g.clone()
        o8.step()
        oref.step()
    st = o8.state[p8]
    assert st["exp_avg"].dtype == torch.int8
    if opts.get("master_weights"):
        master, ref_master = st["master_param"], oref.state[ref]["master_param"]
        assert master.dtype == torch.float32
        assert torch.equal(p8.detach(), master.to(torch.bfloat16))
        # 20 steps of at most lr each; the 8-bit states change each update by a few percent at most
        moved = float((ref_master - start).abs().mean())
        assert moved > 2e-2 and float((master - ref_master).abs().mean()) < 0.1 * moved
    else:
        # bfloat16 storage rounds each update (1 ulp = 2^-7 .. 2^-8 here): compare on average
        moved = float((ref.detach().float() - start).abs().mean())
        assert moved > 2e-2 and float((p8.detach().float() - ref.detach().float()).abs().mean()) < 0.5 * moved


@pytest.mark.parametrize("name,kw,key", [
    ("AdamW", dict(lr=0.01), "exp_avg"),
    ("Lamb", dict(lr=0.01, weight_decay=0.05), "exp_avg"),
    ("Lars", dict(lr=0.5, momentum=0.9, weight_decay=1e-3), "momentum_buffer"),
], ids=["AdamW", "Lamb", "Lars"])
def test_ema_is_not_fused_but_still_updated(name: str, kw: dict[str, Any], key: str) -> None:
    """8-bit passes keep no EMA in their kernels: the averages follow in ema.update()'s pass, equal to a twin
    optimizer without ema= followed by ema.update()."""
    from fusedtrain.ensemble import EMA
    torch.manual_seed(5)
    model = torch.nn.Linear(128, 64)
    twin = copy.deepcopy(model)
    ema, ema_twin = EMA(model, decay=0.9), EMA(twin, decay=0.9)
    opt = getattr(fusedtrain.optim, name)(model.parameters(), state_bits=8, ema=ema, **kw)
    opt_twin = getattr(fusedtrain.optim, name)(twin.parameters(), state_bits=8, **kw)
    x = torch.randn(16, 128)
    for _ in range(3):
        for m, o in ((model, opt), (twin, opt_twin)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
        ema_twin.update()
    assert opt.state[model.weight][key].dtype == torch.int8
    averages, twins = ema.averages_for(list(model.parameters())), ema_twin.averages_for(list(twin.parameters()))
    assert averages is not None and twins is not None
    for a, b in zip(averages, twins):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_traced_step_equals_planned_step() -> None:
    torch.manual_seed(6)
    a = [torch.randn(50, 100, requires_grad=True), torch.randn(10, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    oa = fusedtrain.optim.AdamW(a, lr=0.01, state_bits=8)
    ob = fusedtrain.optim.AdamW(b, lr=0.01, state_bits=8)
    for _ in range(3):
        for x, y in zip(a, b):
            g = torch.randn(x.shape)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob._step_traced()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for k in oa.state[x]:
            assert torch.equal(oa.state[x][k], ob.state[y][k]), k


# --------------------------------------------------------------------------------- checkpoints
def _model_params(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(5000, requires_grad=True), torch.randn(64, 80, requires_grad=True),
            torch.randn(10, requires_grad=True)]


def test_checkpoint_resumes_bit_exactly() -> None:
    params = _model_params(8)
    g = torch.Generator().manual_seed(9)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(10)]
    opt = fusedtrain.optim.AdamW(params, lr=0.01, state_bits=8)
    run_grads(opt, params, grads[:5])
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    sd = opt.state_dict()["state"][1]
    assert sd["exp_avg"].dtype == torch.int8 and sd["exp_avg_sq"].dtype == torch.uint8
    assert sd["exp_avg_absmax"].dtype == torch.float32 and sd["exp_avg_absmax"].shape == (64, 1)
    assert opt.state_dict()["state"][0]["exp_avg"].dtype == torch.float32  # 1-D
    assert opt.state_dict()["state"][2]["exp_avg"].dtype == torch.float32  # below min_8bit_size
    run_grads(opt, params, grads[5:])
    buf.seek(0)
    saved = torch.load(buf)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = fusedtrain.optim.AdamW(resumed, lr=0.01, state_bits=8)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[1]]["exp_avg"].dtype == torch.int8
    assert opt2.state[resumed[1]]["exp_avg_absmax"].dtype == torch.float32
    run_grads(opt2, resumed, grads[5:])
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k


def test_to_torch_state_dict_loads_into_torch() -> None:
    params = _model_params(10)
    g = torch.Generator().manual_seed(11)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
    opt = fusedtrain.optim.AdamW(params, lr=0.01, state_bits=8)
    run_grads(opt, params, grads)
    sd = fusedtrain.optim.to_torch_state_dict(opt.state_dict())
    for entry in sd["state"].values():
        assert not any(k.endswith("_absmax") for k in entry)
        assert entry["exp_avg"].dtype == torch.float32
    tparams = [p.detach().clone().requires_grad_() for p in params]
    topt = torch.optim.AdamW(tparams, lr=0.01)
    topt.load_state_dict(sd)
    want = _quant.dequantize(opt.state[params[1]]["exp_avg"], opt.state[params[1]]["exp_avg_absmax"])
    assert torch.equal(topt.state[tparams[1]]["exp_avg"], want)
    run_grads(topt, tparams, grads[:1])  # torch steps from it
    # the input is left as it was
    assert opt.state_dict()["state"][1]["exp_avg"].dtype == torch.int8


def test_torch_state_dict_is_quantized_on_load_and_codes_dequantized_for_32_bits() -> None:
    params = _model_params(12)
    g = torch.Generator().manual_seed(13)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
    topt = torch.optim.AdamW(params, lr=0.01)
    run_grads(topt, params, grads)
    mine = [p.detach().clone().requires_grad_() for p in params]
    opt = fusedtrain.optim.AdamW(mine, lr=0.01, state_bits=8)
    opt.load_state_dict(topt.state_dict())
    st = opt.state[mine[1]]
    codes, absmax = _quant.quantize(topt.state[params[1]]["exp_avg"], True)
    assert torch.equal(st["exp_avg"], codes) and torch.equal(st["exp_avg_absmax"], absmax)
    assert opt.state[mine[2]]["exp_avg"].dtype == torch.float32
    run_grads(opt, mine, grads[:1])
    # and an 8-bit checkpoint loads into a 32-bit optimizer as float states
    plain = [p.detach().clone().requires_grad_() for p in mine]
    opt32 = fusedtrain.optim.AdamW(plain, lr=0.01)
    opt32.load_state_dict(opt.state_dict())
    st32 = opt32.state[plain[1]]
    assert st32["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in st32
    torch.testing.assert_close(st32["exp_avg"], _quant.dequantize(st["exp_avg"], st["exp_avg_absmax"]))
    run_grads(opt32, plain, grads[:1])


def test_deepcopy_keeps_state_bits() -> None:
    p = [torch.randn(50, 100, requires_grad=True)]
    opt = fusedtrain.optim.AdamW(p, lr=0.01, state_bits=8, min_8bit_size=100)
    c = copy.deepcopy(opt)
    assert c.state_bits == 8 and c.min_8bit_size == 100


# ---------------------------------------------------------------------------------- convergence
def test_convergence_8bit_within_2_percent_of_float32() -> None:
    """100 steps of the digits MLP (tests/_helpers.py: digits_loss) on five batch orders: the loss falls from
    2.3 to ~0.09, and the 8-bit run ends within 2 % (+ 1e-3) of the float32 run on every order (measured -0.2 to
    +0.9 %). (Later the runs keep an absolute gap of ~1e-3 while the loss nears 0.02, where a 0.1 % change of
    the learning rate alone moves the final loss by 1.4-2 %: benchmarks/NOTES.md.)"""
    for order in DIGITS_ORDERS:
        full, low = digits_loss(32, order), digits_loss(8, order)
        assert full < 0.15, (order, full)  # it learned
        assert abs(low - full) <= 0.02 * full + 1e-3, (order, full, low)


@pytest.mark.parametrize("name", ["Adagrad", "SGD"])
def test_sparse_gradients_with_8bit_states_are_refused_or_kept_float(name: str) -> None:
    """Sparse gradients are updated by torch's implementation, which keeps float states: a parameter whose
    states would be 8-bit is refused (before anything is written, naming it and the fix); with min_8bit_size
    above its size, its states stay float and the step is torch's."""
    torch.manual_seed(0)
    dense = torch.randn(40, 40, requires_grad=True)
    emb = torch.randn(50, 16, requires_grad=True)
    kw = dict(lr=0.1) if name == "Adagrad" else dict(lr=0.1, momentum=0.9)
    key = "sum" if name == "Adagrad" else "momentum_buffer"

    def grads() -> None:
        dense.grad = torch.randn(40, 40)
        idx = torch.tensor([[1, 7, 7, 30]])
        emb.grad = torch.sparse_coo_tensor(idx, torch.randn(4, 16), (50, 16))

    opt = getattr(fusedtrain.optim, name)([dense, emb], state_bits=8, min_8bit_size=1, **kw)
    grads()
    before = copy.deepcopy([dense.detach(), emb.detach(), [dict(opt.state[p]) for p in (dense, emb)]])
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\] has a sparse gradient.*"
                                           r"min_8bit_size > 800"):
        opt.step()
    assert_same_values(before, [dense.detach(), emb.detach(), [dict(opt.state[p]) for p in (dense, emb)]],
                       "after the refused step")  # (torch's Adagrad makes its state at init)

    ours = getattr(fusedtrain.optim, name)([dense, emb], state_bits=8, min_8bit_size=801, **kw)
    d2, e2 = dense.detach().clone().requires_grad_(), emb.detach().clone().requires_grad_()
    ref = getattr(torch.optim, name)([d2, e2], **kw)
    for _ in range(3):
        grads()
        d2.grad, e2.grad = dense.grad.clone(), emb.grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(emb, e2, rtol=0, atol=0)  # torch's own step, float states
    assert ours.state[emb][key].dtype == torch.float32
    assert ours.state[dense][key].dtype == (torch.uint8 if name == "Adagrad" else torch.int8)
