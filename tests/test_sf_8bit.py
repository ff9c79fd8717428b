"""ScheduleFreeAdamW with 8-bit states (state_bits=8, issue 17): exp_avg_sq as uint8 codes of its square root in row
blocks (Note [8-bit optimizer states] in csrc/include/fusedtrain/quant.h) while z, the iterate itself, stays float
(Note [mixed state lists] in rules_quant.h). The kernel against the schedulefree package's AdamWScheduleFree stepping
the dequantized state in float64, the train/eval switch, checkpoints, refusals and convergence."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import fusedtrain
import pytest
import schedulefree
import torch
from fusedtrain.optim import _quant

from _helpers import DIGITS_ORDERS, assert_cuda_matches_cpu_8bit, digits_loss, run_grads

BLOCK = 256
# rows of 300, 175, 10, 512, 257 elements: tails, one block, several blocks per row
ROW_SHAPES = [(5, 300), (3, 7, 5, 5), (1000, 10), (2, 512), (1, 1, 257)]
CONFIGS: list[dict[str, Any]] = [
    dict(lr=0.01),
    dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, warmup_steps=3),
    dict(lr=0.02, warmup_steps=2, r=1.0, weight_lr_power=1.0, weight_decay=0.05),
]
GROUP_KEYS = ("k", "lr_max", "weight_sum")  # the schedule's running group state


def _row_blocks(shape: torch.Size) -> list[tuple[int, int]]:
    """Note [row blocks], written out here: each block's (first element, end) in row-major order."""
    rows, row = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))
    return [(r * row + k * BLOCK, r * row + min(row, (k + 1) * BLOCK))
            for r in range(rows) for k in range(math.ceil(row / BLOCK))]


def _dequantize_by_blocks(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """exp_avg_sq of (uint8 codes, absmax) block by block: (map[code] * absmax)^2 in float32, as float64."""
    assert codes.dtype == torch.uint8
    table = _quant.maps()["unsigned"]
    idx = codes.reshape(-1).long()
    out = torch.empty(codes.numel(), dtype=torch.float32)
    for b, (e0, e1) in enumerate(_row_blocks(codes.shape)):
        out[e0:e1] = table[idx[e0:e1]] * absmax.reshape(-1)[b]
    return (out * out).double().view(codes.shape)


def _requantize_reference(v: torch.Tensor, absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 requantization of the state v block by block: absmax = max sqrt(v) of the block (or the given one),
    codes = the nearest map entry of sqrt(v) / absmax (argmin over the table)."""
    y = v.double().sqrt().reshape(-1)
    table = _quant.maps()["unsigned"].double()
    blocks = _row_blocks(v.shape)
    scales = absmax.double().reshape(-1) if absmax is not None else torch.zeros(len(blocks), dtype=torch.float64)
    codes = torch.zeros(y.numel(), dtype=torch.long)
    for b, (e0, e1) in enumerate(blocks):
        if absmax is None:
            scales[b] = y[e0:e1].max()
        if float(scales[b]) > 0:
            codes[e0:e1] = ((y[e0:e1] / scales[b])[:, None] - table[None, :]).abs().argmin(dim=1)
    return codes.view(v.shape), scales


def _params(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    params = [torch.randn(shape, dtype=torch.float64).to(dtype).requires_grad_() for shape in ROW_SHAPES]
    params.append(torch.randn(300, 5, dtype=torch.float64).to(dtype).t().requires_grad_())  # [5, 300], transposed
    params.append(torch.randn(3, 7, 5, 10, dtype=torch.float64).to(dtype)[..., ::2].requires_grad_())  # not dense
    return params


def _reference_step(kw: dict[str, Any], group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor,
                    old: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """schedulefree's AdamWScheduleFree (foreach=False) in float64, one step from the group's schedule state and
    the dequantized state (z as is, exp_avg_sq block by block); returns the new y and state."""
    ref_p = p.detach().double().clone().requires_grad_()
    ref_p.grad = grad.double().clone()
    ref = schedulefree.AdamWScheduleFree([ref_p], foreach=False, **kw)
    ref.param_groups[0].update({k: group[k] for k in GROUP_KEYS}, train_mode=True)
    if old:
        ref.state[ref_p] = {"z": old["z"].double().clone(),
                            "exp_avg_sq": _dequantize_by_blocks(old["exp_avg_sq"], old["exp_avg_sq_absmax"])}
    ref.step()
    return ref_p.detach(), ref.state[ref_p]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_kernel_matches_float64_reference(kw: dict[str, Any], dtype: torch.dtype) -> None:
    """Each of 6 steps (through the warm-up) equals the reference on the dequantized state, then requantized block
    by block in float64, up to the kernel's opmath rounding: y and z to rounding, absmax to rounding, codes equal
    but for ties at float32 midpoints. Odd rows, a transposed and a non-dense parameter, all in one call."""
    params = _params(dtype, 20)
    opt = fusedtrain.optim.ScheduleFreeAdamW(params, state_bits=8, min_8bit_size=0, **kw)
    opt.train()
    g = torch.Generator().manual_seed(21)
    tol = 1e-12 if dtype == torch.float64 else 3e-6
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in params]
        group = {k: opt.param_groups[0][k] for k in GROUP_KEYS}
        before = [({k: v.clone() for k, v in opt.state[p].items()}, p.detach().clone()) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr
        opt.step()
        for p, gr, (old, old_p) in zip(params, grads, before):
            st = opt.state[p]
            assert st["z"].dtype == dtype and st["z"].shape == p.shape  # z stays float, as the float rule keeps it
            assert st["exp_avg_sq"].dtype == torch.uint8 and set(st) == {"z", "exp_avg_sq", "exp_avg_sq_absmax"}
            want_p, want = _reference_step(kw, group, old_p, gr, old)
            torch.testing.assert_close(p.detach().double(), want_p, rtol=tol, atol=tol)
            torch.testing.assert_close(st["z"].double(), want["z"], rtol=tol, atol=tol)
            _, want_absmax = _requantize_reference(want["exp_avg_sq"])
            torch.testing.assert_close(st["exp_avg_sq_absmax"].double().reshape(-1), want_absmax, rtol=4e-6, atol=0)
            want_codes, _ = _requantize_reference(want["exp_avg_sq"], st["exp_avg_sq_absmax"])
            diff = (st["exp_avg_sq"].long() - want_codes).abs()
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01, int(diff.sum())
    assert opt.param_groups[0]["k"] == 6


@pytest.mark.cuda
@pytest.mark.parametrize("kw", CONFIGS[1:], ids=["wd-warmup", "r-power"])
def test_cuda_equals_cpu(kw: dict[str, Any]) -> None:
    """The CUDA block kernel with a float state (its own lists: Note [mixed state lists]) writes the CPU's y, z,
    codes and scales in float64."""
    shapes = ROW_SHAPES + [(2, 3, 0), (7, 1)]
    torch.manual_seed(22)
    cpu = [torch.randn(shape, dtype=torch.float64).requires_grad_() for shape in shapes]
    gpu = [p.detach().cuda().requires_grad_() for p in cpu]
    opts = [fusedtrain.optim.ScheduleFreeAdamW(ps, state_bits=8, min_8bit_size=0, **kw) for ps in (cpu, gpu)]
    g = torch.Generator().manual_seed(23)
    for opt in opts:
        opt.train()
    for _ in range(4):
        for p, q in zip(cpu, gpu):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            q.grad = p.grad.cuda()
        for opt in opts:
            opt.step()
    assert_cuda_matches_cpu_8bit(cpu, gpu, opts, state_atol=1e-14)


@pytest.mark.cuda
def test_cuda_master_weights_equal_cpu() -> None:
    """bfloat16 parameters with float32 masters (the copy list after a float state's single list) on CUDA and CPU:
    the same masters, z and parameters."""
    torch.manual_seed(24)
    cpu = [torch.randn(64, 300).to(torch.bfloat16).requires_grad_()]
    gpu = [p.detach().cuda().requires_grad_() for p in cpu]
    opts = [fusedtrain.optim.ScheduleFreeAdamW(ps, lr=0.01, state_bits=8, min_8bit_size=0, master_weights=True)
            for ps in (cpu, gpu)]
    for opt in opts:
        opt.train()
    for _ in range(3):
        cpu[0].grad = torch.randn(64, 300).to(torch.bfloat16)
        gpu[0].grad = cpu[0].grad.cuda()
        for opt in opts:
            opt.step()
    st, sg = opts[0].state[cpu[0]], opts[1].state[gpu[0]]
    assert st["z"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.uint8
    torch.testing.assert_close(sg["master_param"].cpu(), st["master_param"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sg["z"].cpu(), st["z"], rtol=1e-6, atol=1e-6)
    assert torch.equal(gpu[0].detach().cpu(), sg["master_param"].cpu().to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------ options
def test_small_params_keep_float_states() -> None:
    big = torch.randn(64, 80, requires_grad=True)
    small = torch.randn(10, 10, requires_grad=True)  # below min_8bit_size
    vector = torch.randn(5000, requires_grad=True)  # 1-D (Note [8-bit states in the optimizers])
    opt = fusedtrain.optim.ScheduleFreeAdamW([big, small, vector], lr=0.01, state_bits=8)
    assert opt.state_bits == 8 and opt.min_8bit_size == 4096
    opt.train()
    for _ in range(2):
        for p in (big, small, vector):
            p.grad = torch.randn_like(p)
        opt.step()
    for p in (small, vector):
        assert set(opt.state[p]) == {"z", "exp_avg_sq"}
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32 and opt.state[p]["z"].dtype == torch.float32
    st = opt.state[big]
    assert st["z"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.uint8
    assert st["exp_avg_sq_absmax"].shape == (64, 1)
    nbytes = sum(v.numel() * v.element_size() for v in st.values())
    assert nbytes == 4 * big.numel() + big.numel() + 4 * 64  # z float32, one byte per v, one scale per row


def test_bfloat16_master_weights_keep_float32_z() -> None:
    """With master weights z is float32 (as the float rule keeps it) and the bfloat16 parameter is the master's
    rounding; the run tracks the float-state run."""
    torch.manual_seed(25)
    p8 = torch.randn(64, 128).to(torch.bfloat16).requires_grad_()
    ref = p8.detach().clone().requires_grad_()
    o8 = fusedtrain.optim.ScheduleFreeAdamW([p8], lr=1e-2, state_bits=8, master_weights=True, min_8bit_size=0)
    oref = fusedtrain.optim.ScheduleFreeAdamW([ref], lr=1e-2, master_weights=True)
    start = p8.detach().float().clone()
    for opt in (o8, oref):
        opt.train()
    for _ in range(10):
        grad = torch.randn(64, 128).to(torch.bfloat16)
        p8.grad, ref.grad = grad.clone(), grad.clone()
        o8.step()
        oref.step()
    st = o8.state[p8]
    assert st["z"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.uint8
    assert torch.equal(p8.detach(), st["master_param"].to(torch.bfloat16))
    moved = float((oref.state[ref]["master_param"] - start).abs().mean())
    assert moved > 1e-2 and float((st["master_param"] - oref.state[ref]["master_param"]).abs().mean()) < 0.1 * moved


def _trained(seed: int, steps: int = 4, **kw: Any) -> tuple[fusedtrain.optim.ScheduleFreeAdamW, list[torch.Tensor],
                                                             list[list[torch.Tensor]]]:
    torch.manual_seed(seed)
    params = [torch.randn(5000, requires_grad=True), torch.randn(64, 80, requires_grad=True),
              torch.randn(10, requires_grad=True)]
    g = torch.Generator().manual_seed(seed + 1)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(2 * steps)]
    opt = fusedtrain.optim.ScheduleFreeAdamW(params, lr=0.01, warmup_steps=2, weight_decay=0.01, state_bits=8, **kw)
    opt.train()
    run_grads(opt, params, grads[:steps])
    return opt, params, grads[steps:]


def test_train_eval_equal_the_float_switch() -> None:
    """train()/eval() read z only: from the same parameters and z, the 8-bit optimizer and a float one switch to
    the same x and back to the same y (bit for bit)."""
    opt, params, _ = _trained(30)
    plain = [p.detach().clone().requires_grad_() for p in params]
    other = fusedtrain.optim.ScheduleFreeAdamW(plain, lr=0.01, warmup_steps=2, weight_decay=0.01)
    other.load_state_dict(fusedtrain.optim.to_torch_state_dict(opt.state_dict()))
    for to in ("eval", "train", "eval"):
        getattr(opt, to)()
        getattr(other, to)()
        for p, q in zip(params, plain):
            assert torch.equal(p, q)
            assert torch.equal(opt.state[p]["z"], other.state[q]["z"])
    assert opt.state[params[1]]["exp_avg_sq"].dtype == torch.uint8  # the switch leaves the codes alone
    beta1 = opt.param_groups[0]["betas"][0]
    x = params[1].detach().clone()
    opt.train()
    want = x.lerp(opt.state[params[1]]["z"], 1 - beta1)
    assert torch.equal(params[1].detach(), want)


def test_checkpoint_resumes_bit_exactly() -> None:
    opt, params, rest = _trained(31)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    sd = opt.state_dict()["state"]
    assert sd[1]["exp_avg_sq"].dtype == torch.uint8 and sd[1]["exp_avg_sq_absmax"].shape == (64, 1)
    assert sd[1]["z"].dtype == torch.float32 and "z_absmax" not in sd[1]
    assert sd[0]["exp_avg_sq"].dtype == torch.float32 and sd[2]["exp_avg_sq"].dtype == torch.float32
    run_grads(opt, params, rest)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = fusedtrain.optim.ScheduleFreeAdamW(resumed, lr=0.01, warmup_steps=2, weight_decay=0.01, state_bits=8)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[1]]["exp_avg_sq"].dtype == torch.uint8
    run_grads(opt2, resumed, rest)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        assert set(opt.state[p]) == set(opt2.state[q])
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k
    assert opt.param_groups[0]["k"] == opt2.param_groups[0]["k"] == 8


def test_to_torch_state_dict_loads_into_schedulefree() -> None:
    opt, params, rest = _trained(32)
    sd = fusedtrain.optim.to_torch_state_dict(opt.state_dict())
    for entry in sd["state"].values():
        assert set(entry) == {"z", "exp_avg_sq"} and entry["exp_avg_sq"].dtype == torch.float32
    refp = [p.detach().clone().requires_grad_() for p in params]
    ref = schedulefree.AdamWScheduleFree(refp, lr=0.01, warmup_steps=2, weight_decay=0.01, foreach=False)
    ref.load_state_dict(sd)
    st = opt.state[params[1]]
    assert torch.equal(ref.state[refp[1]]["exp_avg_sq"], _quant.dequantize(st["exp_avg_sq"], st["exp_avg_sq_absmax"]))
    assert torch.equal(ref.state[refp[1]]["z"], st["z"])
    assert ref.param_groups[0]["k"] == 4 and ref.param_groups[0]["train_mode"]
    run_grads(ref, refp, rest[:1])  # the reference steps from it
    assert opt.state_dict()["state"][1]["exp_avg_sq"].dtype == torch.uint8  # the input is left as it was


def test_float_state_dict_is_quantized_on_load() -> None:
    """A schedulefree (float) state dict loads into the 8-bit optimizer: exp_avg_sq quantized exactly as the kernels
    requantize, z as saved; and an 8-bit checkpoint loads into a float optimizer as float states."""
    torch.manual_seed(33)
    params = [torch.randn(64, 80, requires_grad=True), torch.randn(10, requires_grad=True)]
    g = torch.Generator().manual_seed(34)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
    ref = schedulefree.AdamWScheduleFree(params, lr=0.01, foreach=False)
    ref.train()
    run_grads(ref, params, grads[:3])
    mine = [p.detach().clone().requires_grad_() for p in params]
    opt = fusedtrain.optim.ScheduleFreeAdamW(mine, lr=0.01, state_bits=8)
    opt.load_state_dict(ref.state_dict())
    st = opt.state[mine[0]]
    codes, absmax = _quant.quantize(ref.state[params[0]]["exp_avg_sq"], False)
    assert torch.equal(st["exp_avg_sq"], codes) and torch.equal(st["exp_avg_sq_absmax"], absmax)
    assert st["z"].dtype == torch.float32 and torch.equal(st["z"], ref.state[params[0]]["z"])
    assert opt.state[mine[1]]["exp_avg_sq"].dtype == torch.float32
    run_grads(opt, mine, grads[3:])
    plain = [p.detach().clone().requires_grad_() for p in mine]
    opt32 = fusedtrain.optim.ScheduleFreeAdamW(plain, lr=0.01)
    opt32.load_state_dict(opt.state_dict())
    st32 = opt32.state[plain[0]]
    assert set(st32) == {"z", "exp_avg_sq"} and st32["exp_avg_sq"].dtype == torch.float32
    torch.testing.assert_close(st32["exp_avg_sq"], _quant.dequantize(opt.state[mine[0]]["exp_avg_sq"],
                                                                     opt.state[mine[0]]["exp_avg_sq_absmax"]))
    run_grads(opt32, plain, grads[3:])


def test_deepcopy_keeps_state_bits() -> None:
    opt, params, rest = _trained(35, min_8bit_size=100)
    c = copy.deepcopy(opt)
    assert c.state_bits == 8 and c.min_8bit_size == 100
    cparams = c.param_groups[0]["params"]
    run_grads(opt, params, rest[:1])
    run_grads(c, cparams, rest[:1])
    for p, q in zip(params, cparams):
        assert torch.equal(p, q)


def test_refusals() -> None:
    p = [torch.zeros(64, 64, requires_grad=True)]
    with pytest.raises(ValueError, match=r"state_bits: 8; fusedtrain.optim.ScheduleFreeSGD has no 8-bit states: its "
                                         "only state z is the optimization iterate"):
        fusedtrain.optim.ScheduleFreeSGD(p, state_bits=8)
    with pytest.raises(ValueError, match="state_bits: 4; fusedtrain.optim.ScheduleFreeAdamW has no 4-bit states"):
        fusedtrain.optim.ScheduleFreeAdamW(p, state_bits=4)
    with pytest.raises(ValueError, match="state_dtype"):
        fusedtrain.optim.ScheduleFreeAdamW(p, state_bits=8, state_dtype=torch.bfloat16)


def test_op_refuses_bad_lists_and_writes_nothing() -> None:
    """The op checks a float state's list by its kind (the parameter's dtype and shape) next to the codes' lists,
    before anything is written."""
    p = torch.randn(4, 300)
    g = torch.randn(4, 300)
    hyper = fusedtrain._ops.hyper_list("sf_adamw8bit", dict(beta2=0.999, eps=1e-8, weight_decay=0.0,
                                                            bias_correction2=0.001, ckp1=0.5, y_coef=-0.01,
                                                            scheduled_lr=0.01))
    assert fusedtrain._ops.RULES["sf_adamw8bit"]["hyper"] == fusedtrain._ops.RULES["sf_adamw"]["hyper"]
    z = p.clone()
    good = [z, torch.zeros(4, 300, dtype=torch.uint8), torch.zeros(4, 2)]
    bad_lists = [
        ([z.double()] + good[1:], r"float state of the dtype and shape of params\[0\]"),
        ([z[:, :299]] + good[1:], r"float state of the dtype and shape"),
        (good[:1] + [torch.zeros(4, 300, dtype=torch.int8)] + good[2:], "Byte|uint8"),
        (good[:2] + [torch.zeros(8)], r"float32 of shape \[4, 2\]"),
        (good[:2], "3 state lists"),
    ]
    for states, match in bad_lists:
        before, z_before = p.clone(), [s.clone() for s in states]
        with pytest.raises(RuntimeError, match=match):
            fusedtrain._ops.step_("sf_adamw8bit", hyper, [p], [g], states)
        assert torch.equal(p, before) and all(torch.equal(a, b) for a, b in zip(states, z_before))
    z0 = z.clone()
    fusedtrain._ops.step_("sf_adamw8bit", hyper, [p], [g], good)
    assert not torch.equal(z, z0) and int(good[1].sum()) > 0 and not torch.equal(p, z0)


# ---------------------------------------------------------------------------------------------- convergence
def test_convergence_8bit_within_2_percent_of_float() -> None:
    """The digits MLP of test_optim_8bit.py's convergence test (tests/_helpers.py: digits_loss), trained with
    ScheduleFreeAdamW and evaluated at x (eval mode), five batch orders: the loss falls from 2.3 to ~0.11, and the
    8-bit run ends within 2 % (+ 1e-3) of the float run on every order (measured -0.3 to +0.2 %)."""
    for order in DIGITS_ORDERS:
        full, low = digits_loss(32, order, optimizer="ScheduleFreeAdamW"), \
            digits_loss(8, order, optimizer="ScheduleFreeAdamW")
        assert full < 0.15, (order, full)  # it learned
        assert abs(low - full) <= 0.02 * full + 1e-3, (order, full, low)
