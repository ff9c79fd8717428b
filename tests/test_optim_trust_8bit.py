"""LAMB and LARS with 8-bit states (state_bits=8; Note [quantized trust passes] in
csrc/include/fusedtrain/rules_trust_quant.h): each step against timm.optim.Lamb / Lars (or, where LAMB's update
comes from the requantized moments, a float64 LAMB update on them, itself checked against timm) applied to the
dequantized states; codes against quantize() of the reference's new states; checkpoints, copies, refusals,
determinism and the CUDA kernels against the CPU."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch

import fusedtrain
from fusedtrain.optim import _quant
from _helpers import run_grads, step_cpu_and_cuda

timm_optim = pytest.importorskip("timm.optim")

BLOCK = 256
SIGNED = {"exp_avg": True, "exp_avg_sq": False, "momentum_buffer": True}
KEYS = {"Lamb": ("exp_avg", "exp_avg_sq"), "Lars": ("momentum_buffer",)}

LAMB_CASES: list[dict[str, Any]] = [
    dict(lr=0.01, weight_decay=0.0),  # no adaptation: one pass, the update from the new moments in registers
    dict(lr=0.01, weight_decay=0.0, always_adapt=True),
    dict(lr=0.01, weight_decay=0.05),
    dict(lr=0.01, weight_decay=0.05, trust_clip=True, max_grad_norm=None),
    dict(lr=0.01, weight_decay=0.05, decoupled_decay=True, always_adapt=True),
    dict(lr=0.01, weight_decay=0.1, decoupled_decay=True, corrected_weight_decay=True),
    dict(lr=0.02, weight_decay=0.05, bias_correction=False, eps=1e-3, betas=(0.8, 0.99)),
    dict(lr=0.02, weight_decay=0.05, grad_averaging=False, max_grad_norm=1e6),
]
LARS_CASES: list[dict[str, Any]] = [
    dict(lr=0.5, momentum=0.9),  # no adaptation
    dict(lr=0.5, momentum=0.9, weight_decay=1e-3),
    dict(lr=0.5, momentum=0.9, always_adapt=True, nesterov=True),
    dict(lr=0.5, momentum=0.9, weight_decay=1e-2, dampening=0.3, trust_coeff=0.02, eps=1e-3),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-4, trust_clip=True, nesterov=True),
    dict(lr=0.5, momentum=0.0, weight_decay=1e-3),  # no state: the 8-bit rule without state lists
]
CASES = [("Lamb", kw) for kw in LAMB_CASES] + [("Lars", kw) for kw in LARS_CASES]


def _id(case: tuple[str, dict[str, Any]]) -> str:
    name, kw = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items() if k != "lr")


def _adapts(kw: dict[str, Any]) -> bool:
    return kw.get("weight_decay", 0.01) != 0.0 or kw.get("always_adapt", False)


def _absmax_shape(shape: torch.Size) -> tuple[int, ...]:
    rows, row = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))
    return (rows, math.ceil(row / BLOCK)) if len(shape) >= 2 else (math.ceil(row / BLOCK),)


def _states(opt: torch.optim.Optimizer, p: torch.Tensor, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """p's states as float tensors of `dtype` (dequantized where they are codes)."""
    st = opt.state[p]
    out = {}
    for key in KEYS[name]:
        if key in st:
            v = st[key]
            out[key] = (_quant.dequantize(v, st[key + "_absmax"], dtype) if _quant.is_codes(v) else v.to(dtype))
    return out


def _lamb_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
                 kw: dict[str, Any]) -> torch.Tensor:
    """timm's LAMB update in float64 from given new moments m, v (g: the clipped gradient): the new parameter."""
    p, m, v = p.double(), m.double(), v.double()
    beta1, beta2 = kw.get("betas", (0.9, 0.999))
    lr, wd, eps = kw["lr"], kw.get("weight_decay", 0.01), kw.get("eps", 1e-6)
    bc1, bc2 = (1 - beta1 ** step, 1 - beta2 ** step) if kw.get("bias_correction", True) else (1.0, 1.0)
    u = (m / bc1) / (v.sqrt() / math.sqrt(bc2) + eps)
    if wd != 0 and kw.get("decoupled_decay", False):
        scale = lr * lr / kw["lr"] if kw.get("corrected_weight_decay", False) else lr  # (max_lr = the lr here)
        p = p - scale * wd * p
    elif wd != 0:
        u = u + wd * p.double()
    if _adapts(kw):
        w_norm, u_norm = p.norm(), u.norm()
        ratio = w_norm / u_norm if (w_norm > 0 and u_norm > 0) else torch.ones((), dtype=torch.float64)
        if kw.get("trust_clip", False):
            ratio = ratio.clamp(max=1.0)
        u = u * ratio
    return p - lr * u


def _clip(grads: list[torch.Tensor], kw: dict[str, Any]) -> float:
    """timm's global clipping divisor max(|g_all| / max_grad_norm, 1) (LAMB only)."""
    max_norm = kw.get("max_grad_norm", 1.0)
    if max_norm is None:
        return 1.0
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    return max(norm / max_norm, 1.0)


def _timm_step(name: str, kw: dict[str, Any], p_before: torch.Tensor, grad: torch.Tensor,
               states: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One timm step of one parameter from the given (float, opmath) states: new parameter and states."""
    p = p_before.detach().clone().requires_grad_()
    p.grad = grad.clone()
    args = {k: v for k, v in kw.items() if k != "max_grad_norm"}
    if name == "Lamb":
        opt = timm_optim.Lamb([p], foreach=False, max_grad_norm=None, **args)  # (the caller clips)
        opt.param_groups[0]["step"] = torch.tensor(float(step - 1))
    else:
        opt = timm_optim.Lars([p], foreach=False, **args)
    opt.state[p] = {k: v.clone() for k, v in states.items()}
    opt.step()
    return p.detach(), {k: opt.state[p][k] for k in KEYS[name] if k in opt.state[p]}


def _params(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    out = [torch.randn(1, n, dtype=torch.float64).to(dtype).requires_grad_() for n in (1, 255, 256, 257, 4097)]
    out.append(torch.randn(5, 300, dtype=torch.float64).to(dtype).requires_grad_())  # row blocks with tails
    out.append(torch.randn(70, 40, dtype=torch.float64).to(dtype).t().requires_grad_())  # non-contiguous
    out.append(torch.randn(30, 40, dtype=torch.float64).to(dtype)[:, ::2].requires_grad_())  # not dense
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_kernel_matches_timm_on_dequantized_states(case: tuple[str, dict[str, Any]], dtype: torch.dtype) -> None:
    """Each step equals timm's step from the dequantized states (LAMB with adaptation: the float64 LAMB update
    from the moments the step stored, whose norm gives the trust ratio), and the new codes and absmax are
    quantize() of timm's new states (up to a rare one-code flip at a midpoint, where float32 arithmetic differs
    from timm's by an ulp)."""
    name, kw = case
    params = _params(dtype, 0)
    opt = getattr(fusedtrain.optim, name)(params, state_bits=8, min_8bit_size=0, **kw)
    g = torch.Generator().manual_seed(1)
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    checked = 0
    for step in range(1, 5):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in params]
        before = [(p.detach().clone(), _states(opt, p, name, dtype)) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr
        opt.step()
        clip = _clip(grads, kw) if name == "Lamb" else 1.0
        for p, gr, (old_p, old_states) in zip(params, grads, before):
            st = opt.state[p]
            for key in KEYS[name]:
                if key == "momentum_buffer" and kw["momentum"] == 0:
                    assert key not in st or st[key] is None
                    continue
                assert st[key].dtype == (torch.int8 if SIGNED[key] else torch.uint8) and st[key].shape == p.shape
                assert st[key + "_absmax"].shape == _absmax_shape(p.shape)
            if step == 1 and name == "Lamb":
                old_states = {k: torch.zeros_like(old_p) for k in KEYS[name]}
            ref_p, ref_states = _timm_step(name, kw, old_p.to(dtype), (gr.double() / clip).to(dtype), old_states,
                                           step)
            if name == "Lamb":
                # the float64 update reproduces timm's from timm's own moments...
                torch.testing.assert_close(
                    _lamb_update(old_p, gr.double() / clip, ref_states["exp_avg"], ref_states["exp_avg_sq"], step,
                                 kw).to(dtype), ref_p, **tol)
                if _adapts(kw):  # ... and the step applies it to the moments it stored
                    stored = _states(opt, p, name, torch.float64)
                    ref_p = _lamb_update(old_p, gr.double() / clip, stored["exp_avg"], stored["exp_avg_sq"], step,
                                         kw).to(dtype)
            torch.testing.assert_close(p.detach(), ref_p, **tol)
            for key, value in ref_states.items():
                if value is None:
                    continue
                codes, absmax = _quant.quantize(value, SIGNED[key])  # (in the opmath dtype, as the kernel)
                torch.testing.assert_close(st[key + "_absmax"], absmax, rtol=4e-6 if dtype != torch.float64 else 1e-12,
                                           atol=0)
                diff = (st[key].long() - codes.long()).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01, (key, int(diff.sum()))
            checked += 1
    assert checked == 4 * len(params)


def test_one_step_codes_equal_quantized_reference() -> None:
    """After the first step, m = (1 - b1) g and v = (1 - b2) g^2 (LARS without adaptation: b = g) exactly in
    float64: the codes and absmax are quantize() of them (float64 parameters: a midpoint flip is ~1e-9 likely)."""
    torch.manual_seed(3)
    for name, kw in (("Lamb", dict(lr=0.01, weight_decay=0.05, max_grad_norm=None)),
                     ("Lars", dict(lr=0.5, momentum=0.9))):
        p = torch.randn(5, 300, dtype=torch.float64, requires_grad=True)
        opt = getattr(fusedtrain.optim, name)([p], state_bits=8, min_8bit_size=0, **kw)
        g = torch.randn(5, 300, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        want = ({"exp_avg": 0.1 * g, "exp_avg_sq": (1 - 0.999) * g * g} if name == "Lamb"
                else {"momentum_buffer": g})
        for key, value in want.items():
            codes, absmax = _quant.quantize(value, SIGNED[key])
            assert torch.equal(opt.state[p][key + "_absmax"], absmax), key
            assert torch.equal(opt.state[p][key], codes), key


def test_mixed_8bit_and_float_states_in_one_group() -> None:
    """Parameters below min_8bit_size and of 0 / 1 dims keep float32 states in the same group: they step exactly
    as the float-state optimizer steps them (their trust ratios are per tensor), the large one has codes."""
    for name, kw in (("Lamb", dict(lr=0.01, weight_decay=0.05, max_grad_norm=None)),
                     ("Lars", dict(lr=0.5, momentum=0.9, weight_decay=1e-3))):
        torch.manual_seed(4)
        params = [torch.randn(64, 80, requires_grad=True), torch.randn(5000, requires_grad=True),
                  torch.randn(10, 10, requires_grad=True), torch.randn((), requires_grad=True)]
        twins = [p.detach().clone().requires_grad_() for p in params]
        opt = getattr(fusedtrain.optim, name)(params, state_bits=8, **kw)
        ref = getattr(fusedtrain.optim, name)(twins, **kw)
        g = torch.Generator().manual_seed(5)
        run_grads(opt, params, [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)])
        g = torch.Generator().manual_seed(5)
        run_grads(ref, twins, [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)])
        key = KEYS[name][0]
        assert opt.state[params[0]][key].dtype == torch.int8
        for p, q in zip(params[1:], twins[1:]):
            assert opt.state[p][key].dtype == torch.float32 and key + "_absmax" not in opt.state[p]
            assert torch.equal(p, q)
            for k in KEYS[name]:
                assert torch.equal(opt.state[p][k], ref.state[q][k])
        # and the 8-bit one stays near its float twin
        assert float((params[0] - twins[0]).detach().abs().max()) < 0.05 * float(twins[0].detach().abs().max())


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_deterministic_across_thread_counts(name: str) -> None:
    """The per-tensor sums of the block walk (LAMB's pass 1) add the blocks in a fixed order: the same bits with
    1 and 2 threads."""
    kw = dict(lr=0.01, weight_decay=0.05) if name == "Lamb" else dict(lr=0.5, momentum=0.9, weight_decay=1e-3)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(6)
            params = [torch.randn(300, 700, requires_grad=True), torch.randn(3, 5000, requires_grad=True)]
            opt = getattr(fusedtrain.optim, name)(params, state_bits=8, min_8bit_size=0, **kw)
            g = torch.Generator().manual_seed(7)
            run_grads(opt, params, [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)])
            results.append(([p.detach().clone() for p in params], [dict(opt.state[p]) for p in params]))
    finally:
        torch.set_num_threads(threads)
    (pa, sa), (pb, sb) = results
    for x, y, a, b in zip(pa, pb, sa, sb):
        assert torch.equal(x, y)
        for k in a:
            assert torch.equal(a[k], b[k]), k


def _model_params(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(5000, requires_grad=True), torch.randn(64, 80, requires_grad=True),
            torch.randn(10, requires_grad=True)]


OPTS = {"Lamb": dict(lr=0.01, weight_decay=0.05), "Lars": dict(lr=0.5, momentum=0.9, weight_decay=1e-3)}


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_checkpoint_resumes_bit_exactly(name: str) -> None:
    params = _model_params(8)
    g = torch.Generator().manual_seed(9)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(8)]
    cls = getattr(fusedtrain.optim, name)
    opt = cls(params, state_bits=8, **OPTS[name])
    run_grads(opt, params, grads[:4])
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    sd = opt.state_dict()["state"][1]
    for key in KEYS[name]:
        assert sd[key].dtype == (torch.int8 if SIGNED[key] else torch.uint8)
        assert sd[key + "_absmax"].dtype == torch.float32 and sd[key + "_absmax"].shape == (64, 1)
        assert opt.state_dict()["state"][0][key].dtype == torch.float32  # 1-D
    run_grads(opt, params, grads[4:])
    buf.seek(0)
    saved = torch.load(buf)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = cls(resumed, state_bits=8, **OPTS[name])
    opt2.load_state_dict(saved["opt"])
    run_grads(opt2, resumed, grads[4:])
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_float_state_dicts_quantize_on_load_and_back(name: str) -> None:
    """A float-state checkpoint (timm's, or state_bits=32) is quantized on load; to_torch_state_dict gives float
    states that timm loads; an 8-bit checkpoint loads into a 32-bit optimizer as float states."""
    params = _model_params(12)
    g = torch.Generator().manual_seed(13)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
    cls = getattr(fusedtrain.optim, name)
    tparams = [p.detach().clone().requires_grad_() for p in params]
    topt = getattr(timm_optim, name)(tparams, **OPTS[name])
    run_grads(topt, tparams, grads)
    mine = [p.detach().clone().requires_grad_() for p in tparams]
    opt = cls(mine, state_bits=8, **OPTS[name])
    opt.load_state_dict(topt.state_dict())
    for key in KEYS[name]:
        codes, absmax = _quant.quantize(topt.state[tparams[1]][key], SIGNED[key])
        assert torch.equal(opt.state[mine[1]][key], codes) and torch.equal(opt.state[mine[1]][key + "_absmax"], absmax)
        assert opt.state[mine[0]][key].dtype == torch.float32
    run_grads(opt, mine, grads[:1])
    sd = fusedtrain.optim.to_torch_state_dict(opt.state_dict())
    for entry in sd["state"].values():
        assert not any(k.endswith("_absmax") for k in entry)
        for key in KEYS[name]:
            assert entry[key].dtype == torch.float32
    back = [p.detach().clone().requires_grad_() for p in mine]
    timm_back = getattr(timm_optim, name)(back, **OPTS[name])
    timm_back.load_state_dict(sd)
    for key in KEYS[name]:
        want = _quant.dequantize(opt.state[mine[1]][key], opt.state[mine[1]][key + "_absmax"])
        assert torch.equal(timm_back.state[back[1]][key], want)
    run_grads(timm_back, back, grads[:1])
    assert opt.state_dict()["state"][1][KEYS[name][0]].dtype == torch.int8  # the input is left as it was
    plain = [p.detach().clone().requires_grad_() for p in mine]
    opt32 = cls(plain, **OPTS[name])
    opt32.load_state_dict(opt.state_dict())
    for key in KEYS[name]:
        st = opt32.state[plain[1]]
        assert st[key].dtype == torch.float32 and key + "_absmax" not in st
    run_grads(opt32, plain, grads[:1])


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_deepcopy_keeps_state_bits(name: str) -> None:
    params = [torch.randn(50, 100, requires_grad=True)]
    opt = getattr(fusedtrain.optim, name)(params, state_bits=8, min_8bit_size=100, **OPTS[name])
    params[0].grad = torch.randn(50, 100)
    opt.step()
    c = copy.deepcopy(opt)
    assert c.state_bits == 8 and c.min_8bit_size == 100 and c.state[c.param_groups[0]["params"][0]][
        KEYS[name][0]].dtype == torch.int8


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_refused_step_writes_nothing(name: str) -> None:
    params = [torch.randn(64, 80, requires_grad=True), torch.randn(64, 80, requires_grad=True)]
    opt = getattr(fusedtrain.optim, name)(params, state_bits=8, min_8bit_size=0, **OPTS[name])
    run_grads(opt, params, [[torch.randn(p.shape) for p in params]])
    params[0].grad = torch.randn(64, 80)
    params[1].grad = torch.randn(64, 80).to_sparse()  # refused: sparse
    before = ([p.detach().clone() for p in params], [{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                                       for k, v in opt.state[p].items()} for p in params])
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    for p, old_p, old_st in zip(params, *before):
        assert torch.equal(p, old_p)
        for k, v in old_st.items():
            assert torch.equal(opt.state[p][k], v), k


def test_lamb_caution_refuses_state_bits_8() -> None:
    p = torch.randn(64, 80, requires_grad=True)
    with pytest.raises(ValueError, match="caution"):
        fusedtrain.optim.Lamb([p], caution=True, state_bits=8)
    opt = fusedtrain.optim.Lamb([p], state_bits=8, min_8bit_size=0)
    with pytest.raises(ValueError, match="caution"):
        opt.add_param_group({"params": [torch.randn(3, 3, requires_grad=True)], "caution": True})
    assert len(opt.param_groups) == 1
    p.grad = torch.randn(64, 80)
    opt.step()
    opt.param_groups[0]["caution"] = True  # set after construction: refused at the step, before any write
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    with pytest.raises(ValueError, match="caution"):
        opt.step()
    assert torch.equal(p, before[0])
    for k, v in before[1].items():
        assert torch.equal(opt.state[p][k], v), k
    fusedtrain.optim.Lamb([p], caution=True, state_bits=32)  # float states: fine
    # the op refuses it before any write (the step counter included)
    q, g, step = torch.randn(2, 300), torch.randn(2, 300), torch.tensor(0.0)
    states = [torch.zeros(2, 300, dtype=torch.int8), torch.zeros(2, 2), torch.zeros(2, 300, dtype=torch.uint8),
              torch.zeros(2, 2)]
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, grad_averaging=True, bias_correction=True,
                 decoupled_decay=False, max_lr=0.0, trust_clip=False, always_adapt=False, caution=True)
    before = q.clone()
    with pytest.raises(RuntimeError, match="caution"):
        fusedtrain._ops.step_("lamb8bit", fusedtrain._ops.hyper_list("lamb8bit", hyper), [q], [g], states, [step],
                              lr=0.1)
    assert torch.equal(q, before) and float(step) == 0.0 and not any(bool(t.any()) for t in states)
    hyper["caution"] = False
    fusedtrain._ops.step_("lamb8bit", fusedtrain._ops.hyper_list("lamb8bit", hyper), [q], [g], states, [step], lr=0.1)
    assert float(step) == 1.0 and not torch.equal(q, before) and bool(states[0].any())


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
@pytest.mark.parametrize("opts", [dict(master_weights=True), dict(stochastic_rounding=True), dict()],
                         ids=["master", "stochastic", "plain"])
def test_bfloat16_options_track_float_states(name: str, opts: dict[str, Any]) -> None:
    torch.manual_seed(14)
    kw = dict(lr=0.01, weight_decay=0.05) if name == "Lamb" else dict(lr=1.0, momentum=0.9, weight_decay=1e-2)
    p32 = torch.randn(64, 128)
    p8 = p32.to(torch.bfloat16).requires_grad_()
    ref = p32.to(torch.bfloat16).requires_grad_()
    start = p8.detach().float().clone()
    o8 = getattr(fusedtrain.optim, name)([p8], state_bits=8, **kw, **opts)
    oref = getattr(fusedtrain.optim, name)([ref], **kw, **opts)
    for _ in range(20):
        g = torch.randn(p8.shape).to(torch.bfloat16)
        p8.grad, ref.grad = g.clone(), g.clone()
        o8.step()
        oref.step()
    assert o8.state[p8][KEYS[name][0]].dtype == torch.int8
    if opts.get("master_weights"):
        master, ref_master = o8.state[p8]["master_param"], oref.state[ref]["master_param"]
        assert torch.equal(p8.detach(), master.to(torch.bfloat16))
        moved = float((ref_master - start).abs().mean())
        assert moved > 1e-2 and float((master - ref_master).abs().mean()) < 0.1 * moved
    else:
        moved = float((ref.detach().float() - start).abs().mean())
        assert moved > 1e-2 and float((p8.detach().float() - ref.detach().float()).abs().mean()) < 0.5 * moved


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_grad_scale_found_inf_and_traced_step(name: str) -> None:
    """GradScaler's protocol (grad_scale / found_inf): a scaled step equals the unscaled one bit for bit (the scale
    is a power of two) and a step with found_inf writes nothing; the traced step (torch.compile's path) equals
    the planned one."""
    torch.manual_seed(20)
    pa = [torch.randn(64, 80, dtype=torch.float64, requires_grad=True), torch.randn(7, dtype=torch.float64,
                                                                                    requires_grad=True)]
    pb = [p.detach().clone().requires_grad_() for p in pa]
    pc = [p.detach().clone().requires_grad_() for p in pa]
    a, b, c = (getattr(fusedtrain.optim, name)(ps, state_bits=8, min_8bit_size=0, **OPTS[name]) for ps in (pa, pb, pc))
    g = torch.Generator().manual_seed(21)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in pa]
        for x, y, z, gr in zip(pa, pb, pc, grads):
            x.grad, y.grad, z.grad = gr * 1024.0, gr.clone(), gr.clone()
        a.grad_scale, a.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        a.step()
        b.step()
        c._step_traced()
    for x, y, z in zip(pa, pb, pc):
        assert torch.equal(x, y) and torch.equal(x, z)
        for k, v in b.state[y].items():
            assert torch.equal(a.state[x][k], v) and torch.equal(c.state[z][k], v), k
    assert a.state[pa[0]][KEYS[name][0]].dtype == torch.int8
    before = ([p.detach().clone() for p in pa], [{k: v.clone() for k, v in a.state[p].items()} for p in pa])
    a.found_inf = torch.tensor(1.0)
    a.step()
    for p, old_p, old_st in zip(pa, *before):
        assert torch.equal(p, old_p)
        for k, v in old_st.items():
            assert torch.equal(a.state[p][k], v), k


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cuda_equals_cpu(case: tuple[str, dict[str, Any]]) -> None:
    """float64 (no fused multiply-adds in the functors): the CUDA block kernels and per-block sums give the CPU's
    parameters to rounding of the sums' order and the same codes (up to a rare midpoint flip)."""
    name, kw = case
    cpu = _params(torch.float64, 16) + [torch.randn(2, 3, 0, dtype=torch.float64).requires_grad_()]
    gpu, opts = step_cpu_and_cuda(getattr(fusedtrain.optim, name), cpu, dict(state_bits=8, min_8bit_size=0, **kw))
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-10, atol=1e-12)
        for key, value in opts[0].state[p].items():
            other = opts[1].state[q][key]
            if not isinstance(value, torch.Tensor):
                assert other is None and value is None
                continue
            other = other.cpu()
            if _quant.is_codes(value):
                diff = (other.long() - value.long()).abs()
                assert diff.numel() == 0 or (int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01), key
            else:
                torch.testing.assert_close(other, value, rtol=1e-10, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_cuda_deterministic(name: str) -> None:
    results = []
    for _ in range(2):
        torch.manual_seed(18)
        params = [torch.randn(300, 700, device="cuda", requires_grad=True),
                  torch.randn(3, 5000, device="cuda", requires_grad=True)]
        opt = getattr(fusedtrain.optim, name)(params, state_bits=8, min_8bit_size=0, **OPTS[name])
        g = torch.Generator(device="cuda").manual_seed(19)
        run_grads(opt, params, [[torch.randn(p.shape, generator=g, device="cuda") for p in params]
                                for _ in range(3)])
        results.append(([p.detach().clone() for p in params], [dict(opt.state[p]) for p in params]))
    (pa, sa), (pb, sb) = results
    for x, y, a, b in zip(pa, pb, sa, sb):
        assert torch.equal(x, y)
        for k in a:
            assert torch.equal(a[k], b[k]), k
