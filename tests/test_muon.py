"""fusedtrain.optim.Muon against torch.optim.Muon (Note [Muon's step] in python/fusedtrain/optim/muon.py).

Tolerances. Outside Newton-Schulz (momentum buffer, Nesterov, weight decay, the adjusted update) the
arithmetic is torch's, so the momentum buffers agree to float32 ulps and, with ``ns_steps=0`` (Newton-Schulz
reduced to its bfloat16 normalization), so do the parameters. torch runs Newton-Schulz in bfloat16; the
bfloat16 products here are the same sums in another order (float32 GEMMs on the CPU), so a product rounds
to the other bfloat16 neighbour now and then: after 10 steps the parameters must agree with torch's to
``BF16_FRACTION`` of how far they moved. ``ns_dtype=torch.float64`` is checked against a float64 reference
of torch's algorithm to 1e-12, ``ns_dtype=torch.float32`` to float32 accuracy.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

import fusedtrain

from _helpers import step_scaled_and_clipped

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")

BF16_FRACTION = 0.02
SHAPES = [(3, 5), (5, 3), (1, 7), (7, 1), (4, 4), (4, 4), (6, 10), (10, 6), (0, 4)]
CONFIGS: list[dict[str, Any]] = [
    dict(lr=0.02),
    dict(lr=0.02, nesterov=False, weight_decay=0.0, momentum=0.9),
    dict(lr=0.01, weight_decay=0.2, adjust_lr_fn="match_rms_adamw"),
    dict(lr=0.01, adjust_lr_fn="spectral_unclamped", ns_coefficients=(3.4, -4.7, 2.0), ns_steps=6),
]


def _params(dtype: torch.dtype, shapes: list[tuple[int, ...]] = SHAPES, transposed: bool = True
            ) -> list[torch.Tensor]:
    ps = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    if transposed:  # a dense non-contiguous parameter and a strided (not dense) one
        ps.append(torch.randn(9, 6, dtype=torch.float64).to(dtype).t())
        ps.append(torch.randn(8, 10, dtype=torch.float64).to(dtype)[:, ::3])
    return [p.requires_grad_() for p in ps]


def _clone(ps: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in ps]


def _step_both(pairs: list[tuple[torch.optim.Optimizer, list[torch.Tensor]]], n: int,
               shapes_from: list[torch.Tensor], reshape: Any = None) -> None:
    for _ in range(n):
        grads = [torch.randn(p.shape, dtype=torch.float64) for p in shapes_from]
        for opt, ps in pairs:
            for p, g in zip(ps, grads):
                p.grad = (reshape(g, p) if reshape else g).to(p.dtype)
            opt.step()


def _moved_fraction(ours: list[torch.Tensor], theirs: list[torch.Tensor], start: list[torch.Tensor]) -> float:
    def diff(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x.detach().double() - y.detach().double()).abs().max())

    err = max((diff(a, b) for a, b in zip(ours, theirs) if a.numel()), default=0.0)
    moved = max(diff(b, s) for b, s in zip(theirs, start) if b.numel())
    assert moved > 0
    return err / moved


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_torch_to_bfloat16_rounding(cfg: dict[str, Any], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    pa = _params(dtype)
    pb, start = _clone(pa), _clone(pa)
    ref = [p.detach().double().requires_grad_() for p in pa]
    a = fusedtrain.optim.Muon(pa, **cfg)
    b = torch.optim.Muon(pb, **cfg)
    runs = [(a, pa), (b, pb)]
    if dtype == torch.bfloat16:
        runs.append((torch.optim.Muon(ref, **cfg), ref))
    _step_both(runs, 10, pa)
    if dtype == torch.bfloat16:
        # bfloat16 parameters: each step's update is below half an ulp of most parameters, so which way a
        # parameter rounds decides; the rule of the parity tests: the error against a float64 run (torch's
        # Muon on float64 copies) is at most twice torch's own
        ours = max(float((x.detach().double() - r.detach()).abs().max()) for x, r in zip(pa, ref) if r.numel())
        theirs = max(float((y.detach().double() - r.detach()).abs().max()) for y, r in zip(pb, ref) if r.numel())
        assert ours <= 2 * theirs, (ours, theirs)
    else:
        frac = _moved_fraction(pa, pb, start)
        assert frac <= BF16_FRACTION, frac
    # the momentum buffers do not depend on Newton-Schulz: torch's arithmetic, to ulps (torch's vectorized
    # lerp uses an FMA, which the kernels do not: Note [no FMA contraction] in math.h)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    if dtype == torch.bfloat16:
        tol = dict(rtol=8e-3, atol=8e-3)  # one bfloat16 rounding of the same value
        if not cfg.get("nesterov", True):
            # torch.optim.Muon's bug: with nesterov=False the Newton-Schulz input is the buffer itself, and
            # for a bfloat16 buffer .bfloat16() returns that very tensor, which NS then divides by its norm
            # in place (its momentum buffer is normalized every step). fusedtrain keeps the buffer intact.
            return
    for x, y in zip(pa, pb):
        assert set(a.state[x]) == set(b.state[y]) == {"momentum_buffer"}
        bx, by = a.state[x]["momentum_buffer"], b.state[y]["momentum_buffer"]
        assert bx.dtype == by.dtype and bx.stride() == by.stride()
        torch.testing.assert_close(bx, by, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nesterov", [True, False])
def test_update_outside_newton_schulz_matches_torch(dtype: torch.dtype, nesterov: bool) -> None:
    """ns_steps=0: Newton-Schulz is its bfloat16 normalization only, which is torch's arithmetic too; then
    the whole step (weight decay, adjusted lr, update) agrees with torch to float32/float64 ulps."""
    torch.manual_seed(1)
    pa = _params(dtype)
    pb = _clone(pa)
    kw = dict(lr=0.05, weight_decay=0.3, ns_steps=0, nesterov=nesterov)
    a, b = fusedtrain.optim.Muon(pa, **kw), torch.optim.Muon(pb, **kw)
    _step_both([(a, pa), (b, pb)], 5, pa)
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, **tol)


def _reference_step(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, lr: float, weight_decay: float,
                    momentum: float, nesterov: bool, coeffs: tuple[float, float, float], steps: int,
                    eps: float) -> None:
    """torch.optim.Muon's algorithm in float64 throughout (no bfloat16)."""
    buf.lerp_(g, 1 - momentum)
    x = g.lerp(buf, momentum) if nesterov else buf.clone()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    a, b, c = coeffs
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if tall else x
    p.mul_(1 - lr * weight_decay).add_(x, alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))


@pytest.mark.parametrize("ns_dtype,param_dtype,tol", [(torch.float64, torch.float64, 1e-12),
                                                      (torch.float32, torch.float64, 2e-5),
                                                      (torch.float32, torch.float32, 2e-5)])
def test_float_newton_schulz_matches_float64_reference(ns_dtype: torch.dtype, param_dtype: torch.dtype,
                                                       tol: float) -> None:
    torch.manual_seed(2)
    shapes = [(3, 5), (5, 3), (4, 4), (4, 4), (1, 6), (12, 7)]
    pa = _params(param_dtype, shapes, transposed=False)
    ref = [p.detach().double().clone() for p in pa]
    bufs = [torch.zeros_like(p) for p in ref]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    opt = fusedtrain.optim.Muon(pa, ns_dtype=ns_dtype, **kw)
    for _ in range(5):
        grads = [torch.randn(p.shape, dtype=torch.float64) for p in pa]
        for p, g in zip(pa, grads):
            p.grad = g.to(param_dtype)
        opt.step()
        for p, g, buf in zip(ref, grads, bufs):
            _reference_step(p, g.to(param_dtype).double(), buf, coeffs=(3.4445, -4.775, 2.0315), steps=5, eps=1e-7,
                            **kw)
    for x, y in zip(pa, ref):
        torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol)


def test_state_dict_round_trips_with_torch() -> None:
    torch.manual_seed(3)
    pa = _params(torch.float32, [(3, 5), (6, 2)], transposed=False)
    pb, pc = _clone(pa), _clone(pa)
    a = fusedtrain.optim.Muon(pa, lr=0.02, ns_steps=0)
    b = torch.optim.Muon(pb, lr=0.02, ns_steps=0)
    _step_both([(a, pa), (b, pb)], 2, pa)
    # ours -> torch: torch steps on from our state as from its own
    b2 = torch.optim.Muon(_clone(pb), lr=0.5)
    b2.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b2.param_groups[0]["lr"] == 0.02
    # torch -> ours (torch's groups lack fusedtrain's keys: they take the defaults)
    c = fusedtrain.optim.Muon(pc, lr=0.5, flatten=True)
    c.load_state_dict(copy.deepcopy(b.state_dict()))  # (a state dict shares the optimizer's tensors)
    assert c.param_groups[0]["lr"] == 0.02 and c.param_groups[0]["use_muon"] is True
    assert c.param_groups[0]["flatten"] is True
    for x, y in zip(pc, pb):
        x.data.copy_(y)
    _step_both([(c, pc), (b, pb)], 3, pa)
    for x, y in zip(pc, pb):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(c.state[x]["momentum_buffer"], b.state[y]["momentum_buffer"], rtol=2e-6,
                                   atol=2e-6)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(differentiable=True), ValueError, "differentiable=True is not supported"),
    (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True` together"),
    (dict(l1=0.1), ValueError, "l1=0.1 is not supported by Muon"),
    (dict(master_weights=True), ValueError, "master_weights=True is not supported"),
    (dict(capturable=True), ValueError, "capturable=True is not supported"),
    (dict(state_dtype=torch.bfloat16), ValueError, "state_dtype=torch.bfloat16 is not supported"),
    (dict(stochastic_rounding=True), ValueError, "stochastic_rounding=True is not supported"),
    (dict(bogus=1), TypeError, "unexpected keyword argument 'bogus'"),
    (dict(ns_dtype=torch.float16), ValueError, "Invalid ns_dtype"),
    (dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm"),
    (dict(lr=-1.0), ValueError, "Learning rate should be >= 0"),
    (dict(adjust_lr_fn="bogus"), ValueError, "Adjust learning rate function bogus is not supported"),
])
def test_option_errors(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fusedtrain.optim.Muon([torch.nn.Parameter(torch.randn(3, 4))], **kwargs)


def test_non_matrix_parameters_need_a_flag() -> None:
    with pytest.raises(ValueError, match="Muon only supports 2D parameters.*use_muon=False"):
        fusedtrain.optim.Muon([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters.*flatten=True"):
        fusedtrain.optim.Muon([torch.nn.Parameter(torch.randn(3, 4, 2))])
    opt = fusedtrain.optim.Muon([torch.nn.Parameter(torch.randn(3, 4))])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.randn(3))]))
    assert len(opt.param_groups) == 1
    fusedtrain.optim.Muon([torch.nn.Parameter(torch.randn(3, 4, 2))], flatten=True)
    fusedtrain.optim.Muon([dict(params=[torch.nn.Parameter(torch.randn(3))], use_muon=False)])


def test_refused_step_mutates_nothing() -> None:
    good = torch.nn.Parameter(torch.randn(3, 4))
    bad = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))
    opt = fusedtrain.optim.Muon([good, bad])
    good.grad, bad.grad = torch.randn(3, 4), torch.randn(3, 4, dtype=torch.complex64)
    before = good.detach().clone()
    with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
        opt.step()
    assert torch.equal(good, before) and len(opt.state) == 0
    # an (n, 0) matrix: torch's "original" lr adjustment divides by 0; the error comes before any write
    empty = torch.nn.Parameter(torch.randn(4, 0))
    opt = fusedtrain.optim.Muon([good, empty])
    good.grad, empty.grad = torch.randn(3, 4), torch.randn(4, 0)
    with pytest.raises(ZeroDivisionError):
        opt.step()
    assert torch.equal(good, before) and len(opt.state) == 0


def test_muon_and_adamw_groups_match_torch_muon_and_adamw() -> None:
    torch.manual_seed(4)
    mats = _params(torch.float32, [(6, 4), (4, 6), (5, 5)], transposed=False)
    others = [torch.randn(s).requires_grad_() for s in [(6,), (), (7, 3), (2, 3, 4)]]
    mb, ob = _clone(mats), _clone(others)
    mstart = _clone(mats)
    opt = fusedtrain.optim.Muon([
        dict(params=mats),
        dict(params=others, use_muon=False, lr=3e-3, weight_decay=0.01, adamw_betas=(0.9, 0.95)),
    ], lr=0.02, weight_decay=0.1)
    muon = torch.optim.Muon(mb, lr=0.02, weight_decay=0.1)
    adamw = torch.optim.AdamW(ob, lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(6):
        for group_a, group_b in ((mats, mb), (others, ob)):
            for p, q in zip(group_a, group_b):
                g = torch.randn(p.shape)
                p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        muon.step()
        adamw.step()
    for x, y in zip(others, ob):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6)
        assert set(opt.state[x]) == {"step", "exp_avg", "exp_avg_sq"}
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[x][key], adamw.state[y][key], rtol=2e-6, atol=2e-6)
        assert float(opt.state[x]["step"]) == 6.0
    assert _moved_fraction(mats, mb, mstart) <= BF16_FRACTION


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (30, 2, 2, 2)])
def test_flatten_matches_torch_on_the_reshaped_matrix(shape: tuple[int, ...]) -> None:
    torch.manual_seed(5)
    conv = torch.randn(shape).requires_grad_()
    mat = conv.detach().reshape(shape[0], -1).clone().requires_grad_()
    start = [mat.detach().clone()]
    a = fusedtrain.optim.Muon([conv], lr=0.02, flatten=True)
    b = torch.optim.Muon([mat], lr=0.02)
    _step_both([(a, [conv]), (b, [mat])], 8, [conv], reshape=lambda g, p: g.reshape(p.shape))
    assert _moved_fraction([conv.detach().reshape(shape[0], -1)], [mat], start) <= BF16_FRACTION
    assert a.state[conv]["momentum_buffer"].shape == conv.shape


def test_max_grad_norm_and_grad_scale_equal_unscaled_clipped_gradients() -> None:
    torch.manual_seed(6)
    pa = _params(torch.float32, [(3, 5), (5, 3), (4, 4)], transposed=False)
    pb = _clone(pa)
    a = fusedtrain.optim.Muon(pa, lr=0.02, max_grad_norm=0.5)
    b = fusedtrain.optim.Muon(pb, lr=0.02)
    step_scaled_and_clipped(a, pa, b, pb, 0.5)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.state[x]["momentum_buffer"], b.state[y]["momentum_buffer"], rtol=1e-6,
                                   atol=1e-7)
    assert a.last_grad_norm is not None
    # found_inf: the step is skipped, nothing changes
    before = [p.detach().clone() for p in pa]
    bufs = [a.state[p]["momentum_buffer"].clone() for p in pa]
    a.found_inf = torch.tensor(1.0)
    a.step()
    for p, q, buf in zip(pa, before, bufs):
        assert torch.equal(p, q) and torch.equal(a.state[p]["momentum_buffer"], buf)


def test_ema_is_updated_after_the_step() -> None:
    model = torch.nn.Linear(4, 3, bias=False)
    ema = fusedtrain.ensemble.EMA(model, decay=0.75)
    opt = fusedtrain.optim.Muon(model.parameters(), lr=0.1, ema=ema)
    model.weight.grad = torch.randn(3, 4)
    start = ema.module.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.weight.detach(), start)
    torch.testing.assert_close(ema.module.weight.detach(), start.lerp(model.weight.detach(), 0.25))


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 5)
        self.b = torch.nn.Linear(5, 5, bias=False)
        self.c = torch.nn.Parameter(torch.randn(4))  # not given to the optimizer
        self.register_buffer("seen", torch.zeros(3))


@pytest.mark.parametrize("twice", [False, True])
def test_fused_ema_equals_step_then_update(twice: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The update kernels move the averages of the Muon and AdamW groups' parameters in their pass; the
    result equals the step without an EMA followed by ema.update(), bit for bit, over steps with a warmup
    weight, a buffer and a parameter the optimizer does not hold. A parameter listed twice (updated twice)
    falls back to ema.update() after the step."""
    from fusedtrain.optim import muon as muon_module
    torch.manual_seed(13)
    nets = [_Net().double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    emas = [fusedtrain.ensemble.EMA(n, decay=0.9, warmup=3) for n in nets]

    def groups(n: _Net) -> list[dict[str, Any]]:
        hidden = [n.a.weight, n.b.weight] + ([n.b.weight] if twice else [])
        return [dict(params=hidden), dict(params=[n.a.bias], use_muon=False, lr=0.01)]

    fused = fusedtrain.optim.Muon(groups(nets[0]), lr=0.05, ema=emas[0], ns_dtype=torch.float64)
    plain = fusedtrain.optim.Muon(groups(nets[1]), lr=0.05, ns_dtype=torch.float64)
    emas[0].module.seen.fill_(1.0)
    emas[1].module.seen.fill_(1.0)
    kernel_ema: list[int] = []
    real = muon_module._ops.step_

    def spy(rule: str, *args: Any, **kw: Any) -> None:
        kernel_ema.append(len(kw.get("ema_params", ())))
        real(rule, *args, **kw)

    monkeypatch.setattr(muon_module._ops, "step_", spy)
    for step in range(4):
        for n in nets:
            n.seen.fill_(float(step))
            torch.manual_seed(100 + step)
            for p in n.parameters():
                p.grad = torch.randn_like(p)
        fused.step()
        plain.step()
        emas[1].update()
    for x, y in zip(list(emas[0].module.parameters()) + list(emas[0].module.buffers()),
                    list(emas[1].module.parameters()) + list(emas[1].module.buffers())):
        assert torch.equal(x, y)
    for x, y in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(x, y)
    assert emas[0].num_updates == emas[1].num_updates == 4
    assert (sum(kernel_ema) > 0) != twice  # fused unless a parameter is updated twice


def test_batched_shapes_and_one_call_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parameters of one oriented shape (768x3072 and 3072x768 alike) share one Newton-Schulz batch."""
    from fusedtrain.optim import muon as muon_module
    calls: list[tuple[int, ...]] = []
    real = muon_module.newton_schulz

    def spy(x: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, *args)

    monkeypatch.setattr(muon_module, "newton_schulz", spy)
    ps = [torch.randn(s).requires_grad_() for s in [(4, 8), (8, 4), (4, 8), (5, 5), (5, 5)]]
    opt = fusedtrain.optim.Muon(ps, lr=0.02)
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert sorted(calls) == [(2, 5, 5), (3, 4, 8)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_torch(dtype: torch.dtype) -> None:
    """On the GPU Newton-Schulz runs in bfloat16 (batched cuBLAS); the element-wise passes are the CUDA
    rules. Same criteria as on the CPU; the state stays on the GPU."""
    torch.manual_seed(7)
    pa = [p.detach().cuda().requires_grad_() for p in _params(dtype, [(64, 96), (96, 64), (64, 96), (5, 3)])]
    pb, start = _clone(pa), _clone(pa)
    ref = [p.detach().double().requires_grad_() for p in pa]
    a, b = fusedtrain.optim.Muon(pa, lr=0.02), torch.optim.Muon(pb, lr=0.02)
    runs = [(a, pa), (b, pb)] + ([(torch.optim.Muon(ref, lr=0.02), ref)] if dtype == torch.bfloat16 else [])
    _step_both(runs, 10, pa, reshape=lambda g, p: g.to(p.device))
    if dtype == torch.bfloat16:
        ours = max(float((x.detach().double() - r.detach()).abs().max()) for x, r in zip(pa, ref))
        theirs = max(float((y.detach().double() - r.detach()).abs().max()) for y, r in zip(pb, ref))
        assert ours <= 2 * theirs
    else:
        assert _moved_fraction(pa, pb, start) <= BF16_FRACTION
    for x, y in zip(pa, pb):
        bx = a.state[x]["momentum_buffer"]
        assert bx.device == x.device
        torch.testing.assert_close(bx, b.state[y]["momentum_buffer"], rtol=8e-3 if dtype == torch.bfloat16 else 2e-6,
                                   atol=8e-3 if dtype == torch.bfloat16 else 2e-6)
