"""fusedtrain.nn.functional.cross_entropy / fusedtrain.nn.CrossEntropyLoss: the fused softmax cross-entropy with
label smoothing against torch.nn.functional.cross_entropy (loss and input.grad) and a float64 reference.

Tolerances: float64 matches torch to 1e-12 (relative, absolute 1e-15 on the gradient, whose entries are ~w / C).
float32: the loss within 4 ulps (relative 4 * 2^-23 = 4.8e-7) of torch's own float32 loss plus twice torch's own
error against float64, and every gradient entry within 8 float32 ulps of the row weight w from the float64
reference, no further from it than torch's float32 gradient plus 4 such ulps (the exp is a polynomial of ~1 ulp;
the softmax entries are products and differences of values of that size). float16 / bfloat16: errors against the
float64 reference at most twice torch's own error in that dtype plus one ulp of the dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from conftest import DEVICES
from fusedtrain import _ops
from fusedtrain import nn as ft_nn
from fusedtrain.nn import functional as F

EPS32 = 2.0**-23


def _case(n: int, c: int, dtype: torch.dtype = torch.float32, ignored: float = 0.2, ignore_index: int = -100,
          device: str = "cpu", scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    x = (torch.randn(n, c, dtype=torch.float64) * scale).to(dtype).to(device)
    t = torch.randint(0, c, (n,))
    t[torch.rand(n) < ignored] = ignore_index
    return x, t.to(device)


def _run(fn, x: torch.Tensor, t: torch.Tensor, grad_out: torch.Tensor | None = None,
         **kw) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, t, **kw)
    loss.backward(grad_out if grad_out is not None else None)
    return loss.detach(), x.grad


def _ref(x: torch.Tensor, t: torch.Tensor, grad_out: torch.Tensor | None = None, **kw) -> tuple[torch.Tensor, ...]:
    g = grad_out.double() if grad_out is not None else None
    return _run(TF.cross_entropy, x.double(), t, g, **kw)


REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("c", [1, 7, 8193])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_float64_matches_torch(c: int, reduction: str, smoothing: float) -> None:
    x, t = _case(37, c, torch.float64)
    go = torch.rand(37, dtype=torch.float64) + 0.5 if reduction == "none" else None
    kw = {"reduction": reduction, "label_smoothing": smoothing}
    loss, grad = _run(F.cross_entropy, x, t, go, **kw)
    ref_loss, ref_grad = _run(TF.cross_entropy, x, t, go, **kw)
    assert loss.dtype == grad.dtype == torch.float64 and loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("c", [1, 7, 33, 8193])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_float32_against_float64(c: int, reduction: str, smoothing: float) -> None:
    n = 41
    x, t = _case(n, c)
    kw = {"reduction": reduction, "label_smoothing": smoothing}
    loss, grad = _run(F.cross_entropy, x, t, **kw) if reduction != "none" else \
        _run(F.cross_entropy, x, t, torch.ones(n), **kw)
    tl, tg = _run(TF.cross_entropy, x, t, **kw) if reduction != "none" else \
        _run(TF.cross_entropy, x, t, torch.ones(n), **kw)
    rl, rg = _ref(x, t, **kw) if reduction != "none" else _ref(x, t, torch.ones(n), **kw)
    assert loss.dtype == grad.dtype == torch.float32
    err, torch_err = (loss.double() - rl).abs(), (tl.double() - rl).abs()
    assert (err <= 2 * torch_err + 4 * EPS32 * rl.abs() + 1e-30).all(), (err.max(), torch_err.max())
    torch.testing.assert_close(loss, tl, rtol=8 * EPS32, atol=1e-6)
    valid = (t != -100).sum().item()
    w = 1.0 / valid if reduction == "mean" and valid else 1.0
    unit = 8 * EPS32 * w
    gerr, torch_gerr = (grad.double() - rg).abs(), (tg.double() - rg).abs()
    assert gerr.max() <= unit, (gerr.max().item(), unit)
    assert (gerr <= torch_gerr + unit / 2).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_half_types_against_float64(dtype: torch.dtype, smoothing: float) -> None:
    x, t = _case(29, 517, dtype)
    loss, grad = _run(F.cross_entropy, x, t, label_smoothing=smoothing)
    tl, tg = _run(TF.cross_entropy, x, t, label_smoothing=smoothing)
    rl, rg = _ref(x, t, label_smoothing=smoothing)
    assert loss.dtype == tl.dtype == dtype and grad.dtype == dtype  # torch's dtype conventions
    ulp = torch.finfo(dtype).eps
    assert abs(loss.double() - rl) <= 2 * abs(tl.double() - rl) + ulp * abs(rl)
    gerr, terr = (grad.double() - rg).abs().max(), (tg.double() - rg).abs().max()
    assert gerr <= 2 * terr + ulp * rg.abs().max(), (gerr, terr)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_backward_scale_in_every_dtype(dtype: torch.dtype) -> None:
    """grad_output other than 1 (per row for 'none', a scalar for 'sum'): the backward op scales in float32."""
    x, t = _case(23, 129, dtype)
    for reduction, go in (("none", torch.rand(23, dtype=dtype) + 0.5), ("sum", torch.tensor(0.37, dtype=dtype))):
        _, grad = _run(F.cross_entropy, x, t, go, reduction=reduction, label_smoothing=0.1)
        _, tg = _run(TF.cross_entropy, x, t, go, reduction=reduction, label_smoothing=0.1)
        _, rg = _ref(x, t, go, reduction=reduction, label_smoothing=0.1)
        assert grad.dtype == dtype
        ulp = torch.finfo(dtype).eps
        gerr, terr = (grad.double() - rg).abs().max(), (tg.double() - rg).abs().max()
        assert gerr <= 2 * terr + ulp * rg.abs().max(), (reduction, gerr, terr)


def test_autocast_returns_float32_loss_and_input_dtype_grad() -> None:
    x, t = _case(16, 100, torch.bfloat16)
    x.requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16):
        loss = F.cross_entropy(x, t)
        ref = TF.cross_entropy(x, t)
    assert loss.dtype == ref.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, _ref(x.detach(), t)[0].float(), rtol=1e-6, atol=1e-6)


def test_ignore_index_edges() -> None:
    x, _ = _case(6, 9, torch.float64)
    every = torch.full((6,), -100)
    for reduction in REDUCTIONS:
        for smoothing in (0.0, 0.3):
            kw = {"reduction": reduction, "label_smoothing": smoothing}
            loss, grad = _run(F.cross_entropy, x, every, torch.ones(6, dtype=torch.float64)
                              if reduction == "none" else None, **kw)
            ref = TF.cross_entropy(x, every, **kw)
            torch.testing.assert_close(loss, ref, equal_nan=True)  # mean: nan (0 / 0), as torch
            assert torch.equal(grad, torch.zeros_like(x))
    # a custom ignore_index, with label smoothing: ignored rows get no loss and no gradient
    x, t = _case(50, 13, torch.float64, ignored=0.5, ignore_index=3)
    for reduction in REDUCTIONS:
        kw = {"reduction": reduction, "label_smoothing": 0.25, "ignore_index": 3}
        go = torch.rand(50, dtype=torch.float64) if reduction == "none" else None
        loss, grad = _run(F.cross_entropy, x, t, go, **kw)
        rl, rg = _run(TF.cross_entropy, x, t, go, **kw)
        torch.testing.assert_close(loss, rl, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, rg, rtol=1e-12, atol=1e-15)
        assert (grad[t == 3] == 0).all()


def test_empty_batch() -> None:
    x = torch.randn(0, 11, requires_grad=True)
    t = torch.zeros(0, dtype=torch.int64)
    for reduction in REDUCTIONS:
        loss = F.cross_entropy(x, t, reduction=reduction)
        torch.testing.assert_close(loss, TF.cross_entropy(x, t, reduction=reduction), equal_nan=True)
        loss.sum().backward()
        assert x.grad.shape == (0, 11)


def test_targets_out_of_range_raise_before_anything() -> None:
    x, t = _case(8, 5)
    for bad in (5, -1, 100):
        t2 = t.clone()
        t2[4] = bad
        with pytest.raises(RuntimeError, match=rf"target {bad} \(row 4\) is out of bounds.*\[0, 5\)"):
            F.cross_entropy(x, t2)
        with pytest.raises(RuntimeError, match="out of bounds"):
            _ops.cross_entropy(x, t2)  # the op itself, without the autograd wrapper
    t2 = t.clone()
    t2[0] = -100  # the default ignore_index is fine; another negative is not
    F.cross_entropy(x, t2)


def test_bad_arguments() -> None:
    x, t = _case(4, 6)
    with pytest.raises(NotImplementedError, match="weight="):
        F.cross_entropy(x, t, torch.ones(6))
    with pytest.raises(NotImplementedError, match="weight="):
        ft_nn.CrossEntropyLoss(weight=torch.ones(6))
    with pytest.raises(NotImplementedError, match="probability .soft. targets"):
        F.cross_entropy(x, torch.softmax(x, 1))
    with pytest.raises(TypeError, match="Long or Byte.*target.long"):
        F.cross_entropy(x, t.int())
    with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0"):
        F.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction must be"):
        F.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        F.cross_entropy(x, t[:3])
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        F.cross_entropy(x.long(), t)
    with pytest.raises(RuntimeError, match="op takes input of shape \\[N, C\\]"):
        _ops.cross_entropy(x.unsqueeze(0), t)
    # uint8 targets are accepted as torch does
    t = t.clamp(min=0)
    torch.testing.assert_close(F.cross_entropy(x, t.to(torch.uint8)), F.cross_entropy(x, t))


def test_shapes_unbatched_and_spatial() -> None:
    x = torch.randn(7, dtype=torch.float64)
    t = torch.tensor(3)
    for reduction in REDUCTIONS:
        loss, grad = _run(F.cross_entropy, x, t, reduction=reduction)
        rl, rg = _run(TF.cross_entropy, x, t, reduction=reduction)
        assert loss.shape == rl.shape
        torch.testing.assert_close(loss, rl, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, rg, rtol=1e-12, atol=1e-15)
    x = torch.randn(3, 5, 4, 2, dtype=torch.float64)  # [N, C, d1, d2]
    t = torch.randint(0, 5, (3, 4, 2))
    t[0, 1, 1] = -100
    for reduction in REDUCTIONS:
        go = torch.rand(3, 4, 2, dtype=torch.float64) if reduction == "none" else None
        kw = {"reduction": reduction, "label_smoothing": 0.1}
        loss, grad = _run(F.cross_entropy, x, t, go, **kw)
        rl, rg = _run(TF.cross_entropy, x, t, go, **kw)
        assert loss.shape == rl.shape
        torch.testing.assert_close(loss, rl, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, rg, rtol=1e-12, atol=1e-15)


def test_non_contiguous_inputs() -> None:
    base = torch.randn(40, 70, dtype=torch.float64)
    t = torch.randint(0, 35, (20,))
    views = [base[::2, 5:40],  # strided rows, unit class stride: read in place
             base[:35, :20].t(),  # classes strided: copied
             base[3:4, :35].expand(20, 35)]  # one row repeated (row stride 0)
    for x in views:
        loss, grad = _run(F.cross_entropy, x, t, label_smoothing=0.1)
        rl, rg = _run(TF.cross_entropy, x, t, label_smoothing=0.1)
        torch.testing.assert_close(loss, rl, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, rg, rtol=1e-12, atol=1e-15)


def test_extreme_logits() -> None:
    x = torch.randn(5, 10, dtype=torch.float64)
    x[0, 3] = float("-inf")  # a masked logit: probability exactly 0
    x[1] *= 1e4  # a saturated row
    x[2, :] = 88.0  # a constant row
    t = torch.tensor([1, 2, 0, 9, 4])
    for dtype in (torch.float64, torch.float32):
        loss, grad = _run(F.cross_entropy, x.to(dtype), t)
        rl, rg = _run(TF.cross_entropy, x.to(dtype), t)
        torch.testing.assert_close(loss, rl, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, rg, rtol=1e-5, atol=1e-7)
        assert grad[0, 3] == 0
    y = x.clone()
    y[4, 2] = float("nan")
    loss = F.cross_entropy(y, t, reduction="none")
    assert torch.isnan(loss[4]) and torch.isfinite(loss[:4]).all()


def test_grad_output_scales_and_retain_graph() -> None:
    x, t = _case(12, 31, torch.float64)
    x.requires_grad_(True)
    loss = F.cross_entropy(x, t, label_smoothing=0.1)
    (3.0 * loss).backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward(retain_graph=True)  # a second backward through the retained graph: the kept gradient is intact
    ref = _ref(x.detach(), t, label_smoothing=0.1)[1]
    torch.testing.assert_close(first, 3 * ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(x.grad, ref, rtol=1e-12, atol=1e-15)
    loss.backward()  # accumulates
    torch.testing.assert_close(x.grad, 2 * ref, rtol=1e-12, atol=1e-15)


def test_double_backward_raises() -> None:
    x, t = _case(4, 5, torch.float64)
    x.requires_grad_(True)
    loss = F.cross_entropy(x, t)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_gradcheck() -> None:
    x, t = _case(5, 6, torch.float64, ignored=0.3)
    x.requires_grad_(True)
    for reduction in REDUCTIONS:
        for smoothing in (0.0, 0.2):
            assert torch.autograd.gradcheck(
                lambda v, r=reduction, s=smoothing: F.cross_entropy(v, t, reduction=r, label_smoothing=s), (x,))


def test_no_grad_and_eval() -> None:
    x, t = _case(9, 40)
    with torch.no_grad():
        loss = F.cross_entropy(x.requires_grad_(True), t)
    torch.testing.assert_close(loss, TF.cross_entropy(x.detach(), t), rtol=8 * EPS32, atol=1e-6)
    assert not loss.requires_grad
    loss2, grad = _ops.cross_entropy(x.detach(), t, compute_grad=False)
    assert grad.numel() == 0 and torch.equal(loss2, loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_thread_count_independent(dtype: torch.dtype) -> None:
    x, t = _case(300, 1001, dtype)
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out.append([_run(F.cross_entropy, x, t, label_smoothing=0.1)[i] for i in range(2)] +
                       [F.cross_entropy(x, t, reduction="sum")])
    finally:
        torch.set_num_threads(threads)
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert torch.equal(a, b)


def test_isa_copies_agree_bitwise() -> None:
    """Fixed lanes, a fixed combining tree and no FMA contraction: every SIMD copy gives the same bits."""
    from fusedtrain import _build

    lib = _build.library()
    order = ["baseline", "avx2", "avx512"]
    usable = order[: order.index(lib.cpu_isa_detected()) + 1]
    original = lib.cpu_isa()
    x, t = _case(64, 1037)
    results = []
    try:
        for isa in usable:
            lib.set_cpu_isa(isa)
            results.append([_run(F.cross_entropy, x, t, label_smoothing=0.1)[i] for i in range(2)] +
                           [_run(F.cross_entropy, x.bfloat16(), t)[1]])
    finally:
        lib.set_cpu_isa(original)
    for isa, other in zip(usable[1:], results[1:]):
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), isa


def test_module() -> None:
    x, t = _case(10, 12, torch.float64, ignore_index=2)
    m = ft_nn.CrossEntropyLoss(ignore_index=2, reduction="sum", label_smoothing=0.05)
    assert isinstance(m, torch.nn.CrossEntropyLoss)
    ref = torch.nn.CrossEntropyLoss(ignore_index=2, reduction="sum", label_smoothing=0.05)
    la, ga = _run(lambda a, b: m(a, b), x, t)
    lb, gb = _run(lambda a, b: ref(a, b), x, t)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    x, t = _case(6, 9, device=device)
    for reduction in REDUCTIONS:
        for args in ((x, t, 0.1, -100, reduction, True), (x.requires_grad_(True), t, 0.0, 3, reduction, True),
                     (x.detach(), t, 0.0, -100, reduction, False)):
            torch.library.opcheck(torch.ops.fusedtrain.cross_entropy.default, args)
    g = torch.randn(6, 9, device=device)
    torch.library.opcheck(torch.ops.fusedtrain.cross_entropy_backward.default, (g, torch.tensor(2.0, device=device)))
    torch.library.opcheck(torch.ops.fusedtrain.cross_entropy_backward.default, (g, torch.rand(6, device=device)))


def test_torch_compile() -> None:
    x, t = _case(8, 21)
    fn = torch.compile(lambda a, b: F.cross_entropy(a, b, label_smoothing=0.1), backend="aot_eager", fullgraph=True)
    la, ga = _run(fn, x, t)
    lb, gb = _run(F.cross_entropy, x, t, label_smoothing=0.1)
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(ga, gb)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_matches_cpu(dtype: torch.dtype, reduction: str) -> None:
    x, t = _case(67, 8193, dtype)
    go = torch.rand(67) if reduction == "none" else None
    kw = {"reduction": reduction, "label_smoothing": 0.1}
    lc, gc = _run(F.cross_entropy, x, t, go, **kw)
    ld, gd = _run(F.cross_entropy, x.cuda(), t.cuda(), go.cuda() if go is not None else None, **kw)
    tol = {torch.float64: (1e-12, 1e-15), torch.float32: (1e-5, 1e-8), torch.bfloat16: (1.6e-2, 1e-5)}[dtype]
    torch.testing.assert_close(ld.cpu(), lc, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(gd.cpu(), gc, rtol=tol[0], atol=tol[1])


@pytest.mark.cuda
def test_cuda_edges() -> None:
    x, t = _case(5, 7, device="cuda")
    every = torch.full((5,), -100, device="cuda")
    assert torch.isnan(F.cross_entropy(x, every))
    assert F.cross_entropy(x, every, reduction="sum") == 0
    loss, grad = _run(F.cross_entropy, x[:, ::2], t.clamp(max=3), label_smoothing=0.2)  # strided classes
    rl, rg = _run(TF.cross_entropy, x[:, ::2], t.clamp(max=3), label_smoothing=0.2)
    torch.testing.assert_close(loss, rl)
    torch.testing.assert_close(grad, rg)
