"""fusedtrain.regularization.penalty: value and gradient against pure torch (float64 reference), odd sizes,
empty, 0-dim and non-contiguous tensors, dtypes, several devices/dtypes in one call, opcheck, errors."""

from __future__ import annotations

import pytest
import torch

from fusedtrain import _build
from fusedtrain.regularization import penalty
from conftest import DEVICES



def _params(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Odd sizes, an empty and a 0-dim tensor, a transposed and a strided view."""
    ts = [torch.randn(s, dtype=torch.float64) for s in [(1,), (7,), (4097,), (0,), (), (33, 17), (70_001,)]]
    ts.append(torch.randn(9, 6, dtype=torch.float64).t())
    ts.append(torch.randn(8, 10, dtype=torch.float64)[:, ::3])
    return [t.to(dtype).to(device).requires_grad_() for t in ts]


def _reference(params: list[torch.Tensor], l1: float, l2: float) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        q = p.detach().to(torch.float64).cpu()
        total = total + l1 * q.abs().sum() + l2 * q.square().sum()
    return total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l1, l2", [(0.1, 0.0), (0.0, 0.3), (0.05, 0.2)])
def test_float64_value_and_gradient_match_torch(device: str, l1: float, l2: float) -> None:
    params = _params(device, torch.float64)
    value = penalty(params, l1=l1, l2=l2)
    assert value.dtype == torch.float64 and value.dim() == 0 and value.device.type == device
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = sum(l1 * p.abs().sum() + l2 * p.square().sum() for p in ref_params)
    assert torch.allclose(value, ref, rtol=1e-13, atol=0)
    (2.5 * value).backward()
    (2.5 * ref).backward()
    for p, q in zip(params, ref_params):
        assert p.grad.shape == p.shape
        assert torch.allclose(p.grad, q.grad, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32(device: str, dtype: torch.dtype) -> None:
    params = _params(device, dtype)
    value = penalty(params, l1=0.01, l2=0.02)
    assert value.dtype == torch.float32
    ref = _reference(params, 0.01, 0.02)
    assert abs(value.item() - ref.item()) <= 1e-5 * ref.item()  # float32 sums of exactly the stored values
    value.backward()
    for p in params:
        q = p.detach().double()
        expected = (0.01 * q.sign() + 0.04 * q).to(dtype)
        assert p.grad.dtype == dtype
        assert torch.allclose(p.grad.double(), expected.double(), rtol=1e-2 if dtype != torch.float32 else 1e-6,
                              atol=1e-6)


def test_large_float32_sum_is_accurate() -> None:
    x = torch.randn(3_000_000)
    value = penalty([x], l1=1.0, l2=1.0).item()
    ref = _reference([x], 1.0, 1.0).item()
    assert abs(value - ref) <= 1e-6 * ref
    # torch's own float32 sums for comparison: ours is not worse than 10x theirs
    theirs = (x.abs().sum() + x.square().sum()).item()
    assert abs(value - ref) <= max(10 * abs(theirs - ref), 1e-6 * ref)


def test_weight_decay_correspondence_and_sign_at_zero() -> None:
    lam = 0.1
    p = torch.randn(100, requires_grad=True)
    penalty([p], l2=lam / 2).backward()
    assert torch.allclose(p.grad, lam * p.detach(), rtol=1e-6)  # SGD weight_decay=lam adds lam * theta
    z = torch.tensor([0.0, -0.0, 1.0, -2.0], requires_grad=True)
    penalty([z], l1=0.5).backward()
    assert torch.equal(z.grad, torch.tensor([0.0, 0.0, 0.5, -0.5]))
    inf = torch.tensor([float("inf"), 1.0], requires_grad=True)
    assert penalty([inf], l2=1.0).item() == float("inf")  # no 0 * inf from the unused L1 term
    penalty([inf], l1=1.0).backward()
    assert torch.equal(inf.grad, torch.tensor([1.0, 1.0]))


def test_mixed_dtypes_generators_and_empty() -> None:
    a = torch.randn(10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    c = torch.randn(5).bfloat16().requires_grad_()
    value = penalty((t for t in (b, a, c)), l1=0.1, l2=0.2)
    assert value.dtype == torch.float64
    assert torch.allclose(value, _reference([a, b, c], 0.1, 0.2), rtol=1e-6)
    value.backward()
    assert a.grad is not None and b.grad is not None and c.grad is not None
    assert torch.equal(penalty([], l1=1.0), torch.zeros(()))
    e = torch.randn(0, requires_grad=True)
    v = penalty([e], l1=1.0, l2=1.0)
    assert v.item() == 0.0
    v.backward()
    assert e.grad.shape == (0,)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ref = sum(0.01 * p.abs().sum() for p in model.parameters())
    assert torch.allclose(penalty(model.parameters(), l1=0.01), ref)


def test_independent_of_threads_and_isa() -> None:
    params = [torch.randn(s) for s in (100_000, 33, 250_001)]
    ref = penalty(params, l1=0.3, l2=0.7)
    lib = _build.library()
    threads, isa = torch.get_num_threads(), lib.cpu_isa()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for name in ("baseline", "avx2", "avx512"):
                try:
                    lib.set_cpu_isa(name)
                except RuntimeError:
                    continue
                assert torch.equal(penalty(params, l1=0.3, l2=0.7), ref), (n, name)
    finally:
        torch.set_num_threads(threads)
        lib.set_cpu_isa(isa)


def test_gradcheck() -> None:
    ps = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((5,), (3, 4), ())]
    assert torch.autograd.gradcheck(lambda *t: penalty(t, l1=0.3, l2=0.4), ps)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    ops = torch.ops.fusedtrain
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        ps = [torch.randn(s, device=device, dtype=dtype) for s in ((7,), (4097,), (0,), (3, 5))]
        torch.library.opcheck(ops.penalty.default, (ps, 0.1, 0.2))
        torch.library.opcheck(ops.penalty.default, ([p.clone().requires_grad_() for p in ps], 0.1, 0.2))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        torch.library.opcheck(ops.penalty_backward.default, (ps, torch.tensor(1.5, dtype=acc, device=device), 0.1,
                                                             0.2))


def test_errors() -> None:
    p = torch.randn(3)
    with pytest.raises(ValueError, match="Invalid l1 value"):
        penalty([p], l1=-1.0)
    with pytest.raises(ValueError, match="Invalid l2 value"):
        penalty([p], l2=float("nan"))
    with pytest.raises(RuntimeError, match="only float32, float64, float16 and bfloat16"):
        penalty([torch.arange(3)], l1=1.0)
    with pytest.raises(RuntimeError, match="one device and one dtype"):
        torch.ops.fusedtrain.penalty([p, p.double()], 0.1, 0.1)
