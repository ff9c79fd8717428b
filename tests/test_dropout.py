"""Dropout family: the Philox stream against an independent NumPy Philox (Random123's known answers), the
keep rule, scaling against torch, reproducibility, layouts, dtypes, autograd without a stored mask,
opcheck, bias-dropout-add, Dropout2d / DropPath / DropConnect, MC dropout, torch.compile."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fusedtrain
from fusedtrain import _build, _ops
from fusedtrain import nn as fnn
from fusedtrain.nn import functional as F
from conftest import CUDA_OK, DEVICES

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASK32 = np.uint64(0xFFFFFFFF)


# ---- an independent Philox-4x32-10 (Salmon et al. 2011) in NumPy --------------------------------------

def philox4x32_10(c: list[np.ndarray], k: list[np.ndarray]) -> list[np.ndarray]:
    c0, c1, c2, c3 = (np.asarray(x, dtype=np.uint64) for x in c)
    k0, k1 = (np.asarray(x, dtype=np.uint64) for x in k)
    for _ in range(10):
        p0 = c0 * np.uint64(0xD2511F53)  # < 2^64: exact in uint64
        p1 = c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & MASK32
        k0 = (k0 + np.uint64(0x9E3779B9)) & MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & MASK32
    return [c0, c1, c2, c3]


def words(seed: int, n: int, offset: int = 0) -> np.ndarray:
    """The uint32 words of indices 0..n-1 of the stream (seed, offset): block b gives indices 4b..4b+3."""
    seed %= 1 << 64
    b = np.arange((n + 3) // 4, dtype=np.uint64)
    out = philox4x32_10([b & MASK32, b >> np.uint64(32), np.uint64(offset & 0xFFFFFFFF), np.uint64(offset >> 32)],
                        [np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)])
    return np.stack(out, axis=1).reshape(-1)[:n]


def threshold(p: float) -> int:
    return min(math.floor(p * 2**32 + 0.5), 2**32 - 1)


def ref_keep(seed: int, n: int, p: float) -> torch.Tensor:
    return torch.from_numpy(words(seed, n).astype(np.int64) >= threshold(p))


def scale32(p: float) -> torch.Tensor:
    """torch's CPU float32 dropout scale: float32(1) / float32(1 - p)."""
    return torch.tensor(1.0, dtype=torch.float32) / torch.tensor(1.0 - p, dtype=torch.float32)


def kept(y: torch.Tensor) -> torch.Tensor:
    return (y != 0).cpu()


@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_reference_philox_known_answers(counter, key, expected) -> None:
    assert [int(w) for w in philox4x32_10(list(counter), list(key))] == list(expected)


# ---- the mask -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.3141592653589793, 1e-9, 1 - 1e-12])
@pytest.mark.parametrize("seed", [0, 12345, -1, 2**63 + 17])
def test_mask_is_the_philox_keep_rule(device: str, p: float, seed: int) -> None:
    n = 100_003  # not a multiple of 4 or of the CPU's 64-element pass
    x = torch.rand(n, device=device) + 0.5
    y = F.dropout(x, p, seed=seed)
    assert torch.equal(kept(y), ref_keep(seed, n, p))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropped_fraction(p: float) -> None:
    n = 1 << 17
    for _ in range(3):
        y = F.dropout(torch.ones(n), p)
        dropped = (y == 0).sum().item()
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(dropped - n * p) < 5 * sigma, (dropped, n * p, sigma)


def test_threshold_rounding() -> None:
    # P(drop) = t / 2^32 is within 2^-32 of p; the keep test is u >= t, so u = t - 1 drops and u = t keeps.
    for p in [1e-12, 2.0**-33, 0.1, 0.5, 1 / 3, 0.9, 1 - 2.0**-34]:
        assert abs(threshold(p) / 2**32 - p) <= 2.0**-32
    seed, n = 99, 4096
    w = words(seed, n).astype(np.int64)
    u = int(w[0])
    for t, keep in [(u, True), (u + 1, False)]:
        p = t / 2**32  # exactly representable: threshold(p) == t
        assert threshold(p) == t
        y = F.dropout(torch.ones(n), p, seed=seed)
        assert bool(y[0] != 0) is keep


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.7, 0.123456789])
def test_survivors_scaled_like_torch_fp32_fp64(p: float) -> None:
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(50_000, dtype=torch.float64).to(dtype)
        ours, theirs = F.dropout(x, p, seed=3), TF.dropout(x, p)
        both = (ours != 0) & (theirs != 0)
        assert both.sum() > 1000
        assert torch.equal(ours[both], theirs[both])  # bitwise: the same multiplication by the same scale
        k = ours != 0
        expected = x[k] * (scale32(p) if dtype == torch.float32 else 1.0 / (1.0 - p))
        assert torch.equal(ours[k], expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_survivors_scaled_in_float_for_half_types(dtype: torch.dtype) -> None:
    p = 0.3
    x = torch.randn(20_000).to(dtype)
    y = F.dropout(x, p, seed=1)
    k = y != 0
    assert torch.equal(y[k], (x[k].float() * scale32(p)).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_mask_different_seeds_differ(device: str) -> None:
    x = torch.randn(10_000, device=device)
    a, b = F.dropout(x, 0.5, seed=42), F.dropout(x, 0.5, seed=42)
    assert torch.equal(a, b)
    masks = [kept(F.dropout(x, 0.5, seed=s)) for s in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert (masks[i] != masks[j]).float().mean() > 0.4  # independent masks differ in ~half the places
    # without a seed: two calls differ, torch.manual_seed reproduces them
    torch.manual_seed(7)
    c, d = F.dropout(x, 0.5), F.dropout(x, 0.5)
    assert not torch.equal(c, d)
    torch.manual_seed(7)
    assert torch.equal(F.dropout(x, 0.5), c)
    g = torch.Generator().manual_seed(5)
    e = F.dropout(x, 0.5, generator=g)
    g.manual_seed(5)
    assert torch.equal(F.dropout(x, 0.5, generator=g), e)


@pytest.mark.parametrize("device", DEVICES)
def test_seed_tensor_and_offset(device: str) -> None:
    x = torch.randn(1000, device=device)
    assert torch.equal(F.dropout(x, 0.4, seed=torch.tensor(9)), F.dropout(x, 0.4, seed=9))
    s = torch.tensor(9)
    other = fusedtrain._ops.dropout(x, s, 1, 0.4)  # another offset: another stream
    assert not torch.equal(kept(other), kept(F.dropout(x, 0.4, seed=9)))
    w = philox4x32_10([np.arange(250, dtype=np.uint64), 0, 1, 0], [9, 0])
    assert torch.equal(kept(other), torch.from_numpy(np.stack(w, 1).reshape(-1).astype(np.int64) >= threshold(0.4)))
    with pytest.raises(ValueError, match="CPU"):
        F.dropout(x, 0.4, seed=torch.tensor(9.0))
    with pytest.raises(TypeError, match="seed"):
        F.dropout(x, 0.4, seed=1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (4097,), (33, 17), (3, 0, 5)])
def test_dtypes_and_shapes(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = (torch.rand(shape, dtype=torch.float64) + 0.5).to(dtype).to(device)
    y = F.dropout(x, 0.25, seed=11)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    n = x.numel()
    if n:
        assert torch.equal(kept(y).reshape(-1), ref_keep(11, n, 0.25))
        k = y != 0
        assert torch.equal(y[k], (x[k].to(torch.float64 if dtype == torch.float64 else torch.float32)
                                  * (1 / 0.75 if dtype == torch.float64 else scale32(0.25))).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_equals_contiguous(device: str) -> None:
    base = torch.randn(40, 60, device=device)
    views = [base.t(), base[:, ::3], base[5:25, 7:50], torch.randn(2, 3, 5, 7, device=device).to(
        memory_format=torch.channels_last)]
    for v in views:
        assert not v.is_contiguous()
        out = F.dropout(v, 0.4, seed=5)
        assert torch.equal(out, F.dropout(v.contiguous(), 0.4, seed=5))
        if v.dim() == 4:  # channels-last
            assert torch.equal(F.dropout2d(v, 0.4, seed=5), F.dropout2d(v.contiguous(), 0.4, seed=5))
        w = v.clone()  # same strides as v
        F.dropout(w, 0.4, inplace=True, seed=5)
        assert torch.equal(w, out)


def test_results_independent_of_threads_and_isa() -> None:
    x = torch.randn(300_001)
    ref = F.dropout(x, 0.3, seed=8)
    ref2d = F.dropout2d(x[:300_000].reshape(10, 30, 10, 100), 0.3, seed=8)
    lib = _build.library()
    threads, isa = torch.get_num_threads(), lib.cpu_isa()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for name in ("baseline", "avx2", "avx512"):
                try:
                    lib.set_cpu_isa(name)
                except RuntimeError:
                    continue  # not supported by this processor
                assert torch.equal(F.dropout(x, 0.3, seed=8), ref), (n, name)
                assert torch.equal(F.dropout2d(x[:300_000].reshape(10, 30, 10, 100), 0.3, seed=8), ref2d), (n, name)
    finally:
        torch.set_num_threads(threads)
        lib.set_cpu_isa(isa)


# ---- torch's conventions ------------------------------------------------------------------------------

def test_edges_p0_p1_training_false_and_errors() -> None:
    x = torch.randn(100, requires_grad=True)
    assert F.dropout(x, 0.0) is x
    assert F.dropout(x, 0.5, training=False) is x
    y = F.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros(100))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(100))
    inf = torch.tensor([float("inf"), 1.0])
    assert torch.equal(torch.isnan(F.dropout(inf, 1.0)), torch.isnan(TF.dropout(inf, 1.0)))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError) as ours:
            F.dropout(x, bad)
        with pytest.raises(ValueError) as theirs:
            TF.dropout(x, bad)
        assert str(ours.value) == str(theirs.value)
        with pytest.raises(ValueError) as ours:
            fnn.Dropout(bad)
        with pytest.raises(ValueError) as theirs:
            nn.Dropout(bad)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError, match="only float32, float64, float16 and bfloat16"):
        F.dropout(torch.arange(10), 0.5)
    cuda_generator = SimpleNamespace(device=torch.device("cuda"))  # stands in for torch.Generator("cuda")
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        F.dropout(x, 0.5, generator=cuda_generator)  # type: ignore[arg-type]


def test_inplace() -> None:
    x = torch.randn(1000)
    ref = F.dropout(x, 0.3, seed=4)
    y = F.dropout(x, 0.3, inplace=True, seed=4)
    assert y is x and torch.equal(x, ref)
    # autograd through an in-place dropout of a non-leaf
    a = torch.randn(1000, requires_grad=True)
    b = a * 2
    c = F.dropout(b, 0.3, inplace=True, seed=4)
    assert c is b
    c.sum().backward()
    assert torch.equal(a.grad, 2 * (ref != 0) * scale32(0.3))
    leaf = torch.randn(10, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        F.dropout(leaf, 0.3, inplace=True)
    m = fnn.Dropout(0.3, inplace=True)
    z = torch.randn(50)
    assert m(z) is z


@pytest.mark.parametrize("device", DEVICES)
def test_modules(device: str) -> None:
    m = fnn.Dropout(0.2)
    assert isinstance(m, nn.Dropout) and repr(m) == repr(nn.Dropout(0.2))
    assert repr(fnn.Dropout2d(0.3, inplace=True)) == repr(nn.Dropout2d(0.3, inplace=True))
    x = torch.randn(64, 32, device=device)
    torch.manual_seed(3)
    y = m(x)
    torch.manual_seed(3)
    assert torch.equal(y, F.dropout(x, 0.2))
    assert 0.1 < (y == 0).float().mean() < 0.3
    m.eval()
    assert m(x) is x
    dp = fnn.DropPath(0.25)
    assert repr(dp) == "DropPath(drop_prob=0.250)"
    with pytest.raises(ValueError, match="drop_prob has to be between 0 and 1"):
        fnn.DropPath(1.5)


def test_matches_timm_drop_path_conventions() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    x = torch.randn(4, 3, 5)
    theirs = timm_layers.DropPath(0.3)
    assert repr(fnn.DropPath(0.3)) == repr(theirs)
    theirs.eval()
    assert fnn.DropPath(0.3).eval()(x) is x and theirs(x) is x
    assert F.drop_path(x, 0.3) is x  # timm's functional default: training=False


# ---- autograd: gradients and what is kept for backward ------------------------------------------------

def test_gradcheck_float64() -> None:
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: F.dropout(t, 0.4, seed=1), (x,))
    assert torch.autograd.gradcheck(lambda t: F.dropout2d(t.reshape(2, 3, 7, 1), 0.4, seed=1), (x,))
    assert torch.autograd.gradcheck(lambda t: F.drop_path(t, 0.4, True, seed=2), (x,))
    assert torch.autograd.gradcheck(lambda t: F.drop_path(t, 0.4, True, False, seed=2), (x,))
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, u, v: F.bias_dropout_add(t, u, v, 0.4, seed=3), (x, b, r))
    assert torch.autograd.gradgradcheck(lambda t: F.dropout(t, 0.4, seed=1), (x,))


def _saved_numels(fn) -> list[int]:
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().sum().backward()
    return saved


def test_autograd_saves_no_mask() -> None:
    n = 4096
    x = torch.randn(n, requires_grad=True)
    torch_saved = _saved_numels(lambda: TF.dropout(x, 0.5))
    assert max(torch_saved) == n  # the hook sees torch's mask: the check below can fail
    for fn in [lambda: F.dropout(x, 0.5), lambda: F.dropout2d(x.reshape(4, 8, 16, 8), 0.5),
               lambda: F.drop_path(x.reshape(16, 256), 0.5, True),
               lambda: F.bias_dropout_add(x.reshape(64, 64), torch.randn(64, requires_grad=True),
                                          torch.randn(64, 64), 0.5),
               lambda: F.dropout(x * 1, 0.5, inplace=True)]:
        assert max(_saved_numels(fn), default=0) <= 1


# ---- opcheck -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    ops = torch.ops.fusedtrain
    s = torch.tensor(7)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 7, device=device, dtype=dtype)
        b, r = torch.randn(7, device=device, dtype=dtype), torch.randn(5, 7, device=device, dtype=dtype)
        xr, br, rr = (t.clone().requires_grad_() for t in (x, b, r))
        cases = [
            (ops.dropout.default, (x, s, 0, 0.3, 1, True)),
            (ops.dropout.default, (xr, s, 2, 0.3, 7, False)),
            (ops.dropout.default, (x.t(), s, 0, 0.6, 5, True)),
            (ops.dropout_.default, (x.clone(), s, 0, 0.3, 1, True)),
            (ops.bias_dropout_add.default, (x, b, r, s, 0, 0.3)),
            (ops.bias_dropout_add.default, (xr, br, rr, s, 0, 0.3)),
            (ops.bias_dropout_add_backward.default, (x, s, 0, 0.3, 7)),
        ]
        for op, args in cases:
            torch.library.opcheck(op, args)


def test_op_argument_errors() -> None:
    x, s = torch.randn(12), torch.tensor(1)
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        fusedtrain._ops.dropout(x, s, 0, 1.5)
    with pytest.raises(RuntimeError, match="must divide"):
        fusedtrain._ops.dropout(x, s, 0, 0.5, 5)
    with pytest.raises(RuntimeError, match="one-element int64 tensor on the CPU"):
        fusedtrain._ops.dropout(x, torch.tensor([1, 2]), 0, 0.5)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        F.bias_dropout_add(torch.randn(3, 4), torch.randn(5), torch.randn(3, 4), 0.5)
    with pytest.raises(RuntimeError, match="residual must have the shape"):
        F.bias_dropout_add(torch.randn(3, 4), torch.randn(4), torch.randn(4), 0.5)
    with pytest.raises(RuntimeError, match="one dtype"):  # the op itself; F.bias_dropout_add promotes first
        _ops.bias_dropout_add(torch.randn(3, 4), torch.randn(4).double(), torch.randn(3, 4), F._NO_SEED, 0, 0.5)


# ---- bias-dropout-add ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 129), (2, 3, 64), (5,), (3000, 7)])
def test_bias_dropout_add_matches_reference_with_our_mask(device: str, dtype: torch.dtype,
                                                          shape: tuple[int, ...]) -> None:
    p, seed = 0.35, 21
    x, r = (torch.randn(shape, dtype=torch.float64).to(dtype).to(device).requires_grad_() for _ in range(2))
    b = torch.randn(shape[-1], dtype=torch.float64).to(dtype).to(device).requires_grad_()
    out = F.bias_dropout_add(x, b, r, p, seed=seed)
    mask_scale = F.dropout(torch.ones(shape, dtype=dtype, device=device), p, seed=seed)  # OUR mask, scaled
    if dtype in (torch.float16, torch.bfloat16):  # the scale in float32, as the kernels multiply
        mask_scale = (mask_scale != 0) * scale32(p).to(device)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    out.backward(g)
    if dtype in (torch.float32, torch.float64):
        ref = r + (x + b) * mask_scale
        assert torch.equal(out, ref)  # same roundings: (x + b), * scale, + r
    else:  # half types: ours rounds once, from float32
        ref = (r.float() + (x.float() + b.float()) * mask_scale).to(dtype)
        assert torch.allclose(out.float(), ref.float(), rtol=2e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-2)
    grad_x = (g * mask_scale).to(dtype)
    assert torch.equal(x.grad, grad_x)
    assert torch.equal(r.grad, g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ref_gb = grad_x.to(acc).reshape(-1, shape[-1]).sum(0)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    if dtype in (torch.float16, torch.bfloat16):
        tol = dict(rtol=1e-2, atol=1e-2)
    assert torch.allclose(b.grad.to(acc), ref_gb, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_bias_dropout_add_mixed_dtypes_promote_like_torch(device: str, training: bool) -> None:
    """Under autocast a linear layer's bfloat16 output meets a float32 bias and residual: the result is
    what torch's ``r + dropout(x + b)`` gives (float32, by type promotion), and each input's gradient
    comes back in its own dtype (found by the train benchmark, issue 19)."""
    p, seed, shape = 0.3, 5, (6, 33)
    lin = nn.Linear(17, shape[-1], bias=False).to(device)
    inp = torch.randn(6, 17, device=device)
    b = torch.randn(shape[-1], device=device, requires_grad=True)
    r = torch.randn(shape, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        x = lin(inp)
        assert x.dtype == torch.bfloat16
        out = F.bias_dropout_add(x, b, r, p, training=training, seed=seed)
    x.retain_grad()
    assert out.dtype == torch.promote_types(x.dtype, b.dtype) == torch.float32
    keep = F.dropout(torch.ones(shape, device=device), p, seed=seed) if training else torch.ones(shape, device=device)
    ref = r + (x.float() + b) * keep
    assert torch.equal(out, ref)
    g = torch.randn(shape, device=device)
    out.backward(g)
    assert x.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.float32 and r.grad.dtype == torch.float32
    assert torch.equal(r.grad, g)
    assert torch.equal(x.grad, (g * keep).to(torch.bfloat16))
    assert torch.allclose(b.grad, (g * keep).sum(0), rtol=1e-5, atol=1e-5)
    ints = torch.ones(shape, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match="dtype"):  # integers only: nothing to promote to, refused by the op
        F.bias_dropout_add(ints, ints[0], ints, p)


def test_bias_dropout_add_eval_and_p0() -> None:
    x, r, b = torch.randn(9, 16), torch.randn(9, 16), torch.randn(16)
    assert torch.equal(F.bias_dropout_add(x, b, r, 0.5, training=False), r + (x + b))
    assert torch.equal(F.bias_dropout_add(x, b, r, 0.0), r + (x + b))
    assert torch.equal(F.bias_dropout_add(x, b, r, 1.0), r)
    big = torch.randn(300, 1000)
    out = F.bias_dropout_add(big, torch.zeros(1000), torch.zeros(300, 1000), 0.5, seed=1)
    assert torch.equal(kept(out).reshape(-1), ref_keep(1, big.numel(), 0.5))


def test_bias_dropout_add_bias_grad_independent_of_threads() -> None:
    x = torch.randn(700, 33, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    r = torch.randn(700, 33)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            b.grad = None
            F.bias_dropout_add(x, b, r, 0.2, seed=6).sum().backward()
            grads.append(b.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


# ---- Dropout2d, DropPath, DropConnect ------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout2d_whole_channels(device: str, p: float) -> None:
    N, C, H, W = 250, 400, 2, 3  # 100,000 channels
    x = torch.rand(N, C, H, W, device=device) + 0.5
    y = F.dropout2d(x, p, seed=13)
    k = kept(y).reshape(N * C, H * W)
    assert torch.equal(k.all(1), k.any(1))  # constant over each channel
    assert torch.equal(k[:, 0], ref_keep(13, N * C, p))  # channel (n, c) uses word n * C + c
    sigma = math.sqrt(N * C * p * (1 - p))
    assert abs((~k[:, 0]).sum().item() - N * C * p) < 5 * sigma
    kk = y != 0
    assert torch.equal(y[kk], x[kk] * scale32(p).to(device))


def test_dropout2d_follows_torch_for_3d_input_and_warns() -> None:
    x = torch.rand(6, 5, 4) + 0.5
    with pytest.warns(UserWarning, match="Received a 3D input"):
        y = F.dropout2d(x, 0.5, seed=1)
    k = kept(y)
    assert torch.equal(k.all(-1), k.any(-1))  # decisions per x[i, j], as torch's (N, C, L) reading
    with pytest.warns(UserWarning, match="Received a 3D input"):
        t = TF.dropout2d(torch.ones(200, 50, 4), 0.5)
    assert torch.equal((t != 0).all(-1), (t != 0).any(-1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.dropout2d(torch.randn(2, 3, 4, 5), 0.5)
    with pytest.warns(UserWarning, match="Received a 2-D input"):
        F.dropout2d(torch.randn(4, 5), 0.5)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="at least 2 dimensions"):
        F.dropout2d(torch.randn(5), 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_drop_path_whole_samples(device: str) -> None:
    N = 100_000
    x = torch.rand(N, 3, 2, device=device) + 0.5
    for scale_by_keep in (True, False):
        y = F.drop_path(x, 0.3, True, scale_by_keep, seed=17)
        k = kept(y).reshape(N, -1)
        assert torch.equal(k.all(1), k.any(1))
        assert torch.equal(k[:, 0], ref_keep(17, N, 0.3))
        kk = y != 0
        assert torch.equal(y[kk], x[kk] * scale32(0.3).to(device) if scale_by_keep else x[kk])
    sigma = math.sqrt(N * 0.3 * 0.7)
    assert abs((~k[:, 0]).sum().item() - N * 0.3) < 5 * sigma
    m = fnn.DropPath(0.3)
    torch.manual_seed(2)
    a = m(x)
    torch.manual_seed(2)
    assert torch.equal(a, F.drop_path(x, 0.3, True))
    assert torch.equal(F.drop_path(x, 1.0, True), torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
def test_drop_connect(device: str) -> None:
    lin = nn.Linear(13, 9).to(device)
    dc = fnn.DropConnect(lin, 0.4)
    assert "p=0.4" in repr(dc)
    x = torch.randn(6, 13, device=device)
    torch.manual_seed(5)
    out = dc(x)
    out.square().sum().backward()
    g_w, g_b = lin.weight.grad.clone(), lin.bias.grad.clone()
    lin.zero_grad()
    # reference: the same seed draw masks the weight once for the whole batch
    torch.manual_seed(5)
    w = F.dropout(lin.weight, 0.4)
    ref = TF.linear(x, w, lin.bias)
    ref.square().sum().backward()
    assert torch.equal(out, ref)
    assert torch.allclose(g_w, lin.weight.grad) and torch.allclose(g_b, lin.bias.grad)
    mask = w != 0
    assert (g_w[~mask] == 0).all() and (g_w[mask] != 0).all()  # the gradient flows through kept weights only
    dc.eval()
    assert torch.equal(dc(x), lin(x))
    with pytest.raises(AttributeError):
        fnn.DropConnect(lin, 0.4, names=("nope",))
    with pytest.raises(ValueError):
        fnn.DropConnect(lin, 2.0)


# ---- MC dropout ----------------------------------------------------------------------------------------

def _mc_model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 32),
                         fnn.Dropout(0.2), fnn.DropPath(0.1), nn.Linear(32, 4))


@pytest.mark.parametrize("softmax", [False, True])
def test_mc_dropout_predict_matches_manual_loop(softmax: bool) -> None:
    model = _mc_model()
    model.train()
    model(torch.randn(64, 10))  # non-trivial BatchNorm statistics
    model[4].eval()  # a mixture of modes, to check that each is restored
    modes = [m.training for m in model.modules()]
    stats = model[1].running_mean.clone()
    x = torch.randn(16, 10)
    torch.manual_seed(11)
    mean, var = fnn.mc_dropout_predict(model, x, samples=7, softmax=softmax)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[1].running_mean, stats)  # BatchNorm ran in eval mode
    # manual loop: everything eval, dropout modules train
    model.eval()
    for m in (model[3], model[5], model[6]):
        m.train()
    torch.manual_seed(11)
    with torch.no_grad():
        ys = torch.stack([model(x) for _ in range(7)])
    if softmax:
        ys = ys.softmax(-1)
    assert torch.allclose(mean, ys.mean(0), atol=1e-6)
    assert torch.allclose(var, ys.var(0, correction=0), atol=1e-6)
    assert (var > 0).any()
    assert not mean.requires_grad


def test_mc_dropout_predict_restores_modes_on_error() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Dropout(0.5), Boom())
    model.eval()
    with pytest.raises(RuntimeError, match="boom"):
        fnn.mc_dropout_predict(model, torch.randn(2, 3), samples=2)
    assert not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="samples"):
        fnn.mc_dropout_predict(model, torch.randn(2, 3), samples=0)
    assert fnn.is_dropout_module(nn.AlphaDropout()) and fnn.is_dropout_module(fnn.DropConnect(nn.Linear(2, 2)))
    assert not fnn.is_dropout_module(nn.BatchNorm1d(3))


# ---- torch.compile -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(12, 24), fnn.Dropout(0.3), nn.ReLU(), nn.Linear(24, 24), fnn.Dropout2d(0.2),
                          nn.Linear(24, 3))
    x = torch.randn(4, 6, 5, 24)[..., :12]  # non-contiguous, 4-D for Dropout2d
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # the seed draw traces too
    outs, grads = [], []
    for fn in (model, compiled):
        torch.manual_seed(123)
        y = fn(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(model[0].weight.grad.clone())
        model.zero_grad()
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    f = torch.compile(lambda t, b, r: F.bias_dropout_add(F.dropout(t, 0.4, seed=3), b, r, 0.1, seed=4),
                      backend=backend, fullgraph=True)
    t, b, r = torch.randn(5, 6), torch.randn(6), torch.randn(5, 6)
    assert torch.equal(f(t, b, r), F.bias_dropout_add(F.dropout(t, 0.4, seed=3), b, r, 0.1, seed=4))


# ---- CUDA: the same seed gives the same mask on both devices -------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and fusedtrain's CUDA kernels")
def test_cpu_and_cuda_masks_agree() -> None:
    for dtype in DTYPES:
        x = (torch.rand(100_003, dtype=torch.float64) + 0.5).to(dtype)
        for p in (0.1, 0.5):
            cpu, gpu = F.dropout(x, p, seed=77), F.dropout(x.cuda(), p, seed=77)
            assert torch.equal(cpu, gpu.cpu())
        x4 = x[:100_000].reshape(10, 50, 200)
        assert torch.equal(F.dropout2d(x4, 0.3, seed=5), F.dropout2d(x4.cuda(), 0.3, seed=5).cpu())
        assert torch.equal(F.drop_path(x4, 0.3, True, seed=5), F.drop_path(x4.cuda(), 0.3, True, seed=5).cpu())
    torch.manual_seed(0)
    a = F.dropout(torch.ones(4096), 0.5)
    torch.manual_seed(0)
    b = F.dropout(torch.ones(4096, device="cuda"), 0.5)
    assert torch.equal(a, b.cpu())  # the seed comes from the CPU generator for every device
    x = torch.randn(513, 96, dtype=torch.float64)
    bias, r = torch.randn(96, dtype=torch.float64), torch.randn(513, 96, dtype=torch.float64)
    assert torch.equal(F.bias_dropout_add(x, bias, r, 0.2, seed=9),
                       F.bias_dropout_add(x.cuda(), bias.cuda(), r.cuda(), 0.2, seed=9).cpu())
    misaligned = torch.randn(4099, device="cuda")[3:]
    assert torch.equal(F.dropout(misaligned, 0.5, seed=1).cpu(), F.dropout(misaligned.cpu(), 0.5, seed=1))


# ---- the benchmark family (tiny sizes: checks the rows and the memory report, not speed) --------------

def test_bench_family_rows_and_saved_bytes() -> None:
    from fusedtrain.bench import dropout as bench

    x = torch.randn(4096, requires_grad=True)
    assert bench.saved_bytes_per_element(lambda: TF.dropout(x, 0.5), 4096) == 4.0  # torch's float32 CPU mask
    assert bench.saved_bytes_per_element(lambda: F.dropout(x, 0.5), 4096) < 0.01  # our 8-byte seed
    rows = bench._dropout_rows(torch.device("cpu"), 4096, torch.float32, reps=2, warmup=1, bandwidth=10.0)
    rows += bench._bias_dropout_add_rows(torch.device("cpu"), 64, 32, torch.float32, reps=2, warmup=1,
                                         bandwidth=10.0)
    by = {(r.case.split(",")[0], r.impl): r for r in rows}
    ours = by[("dropout forward+backward", "fusedtrain")]
    assert ours.extra["saved_bytes_per_element"] < 0.01 and ours.bytes_moved == 16 * 4096
    assert by[("dropout forward+backward", "torch F.dropout")].extra["saved_bytes_per_element"] == 4.0
    assert all(r.median_ms > 0 for r in rows)
    assert all(r.vs_best_torch is not None and r.vs_best_torch > 0 for r in rows if r.impl.startswith("fusedtrain"))


# ---- CUDA graph capture and device seeds (issue 13) -----------------------------------------------------

class _OpRecorder(TorchDispatchMode):
    """Records every op call that reaches the dispatcher: fusedtrain's in ``calls`` (name, arguments), all
    of them in ``ops`` (qualified name, output)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []
        self.ops: list[tuple[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func.namespace == "fusedtrain":
            self.calls.append((func._opname, args))
        self.ops.append((f"{func.namespace}.{func._opname}", out))
        return out


def _seed_of(name: str, args: tuple) -> torch.Tensor:
    return args[3] if name == "bias_dropout_add" else args[1]


def _fake_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes torch report a CUDA graph capture in progress (the Python side's only source of truth)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def _family_calls(x: torch.Tensor, **kw) -> list[torch.Tensor]:
    """One call of each member of the dropout family on x (2-D, requires grad); returns the outputs."""
    b = torch.zeros(x.shape[-1], device=x.device)
    x4 = x.reshape(2, 2, 2, -1)
    return [F.dropout(x, 0.5, **kw), F.dropout2d(x4, 0.5, **kw), F.drop_path(x, 0.5, True, **kw),
            F.bias_dropout_add(x, b, x, 0.5, **kw), F.dropout(x * 1, 0.5, inplace=True, **kw)]


def test_capture_draws_the_seed_on_the_device_and_backward_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a CUDA graph captures a call on a CUDA input, the seed is a device tensor (drawn by torch's CUDA
    generator, refreshed on every replay), and autograd keeps that very tensor for the backward pass. Fake
    CUDA tensors let the Python logic run without a GPU; test_cuda_graph_replays_draw_fresh_masks runs the
    real thing."""
    _fake_capture(monkeypatch)
    cpu_state = torch.get_rng_state()
    with FakeTensorMode():
        x = torch.empty(8, 16, device="cuda:0", requires_grad=True)
        with _OpRecorder() as rec:
            outs = _family_calls(x)
    assert [name for name, _ in rec.calls] == ["dropout", "dropout", "dropout", "bias_dropout_add", "dropout_"]
    for (name, args), out in zip(rec.calls, outs):
        seed = _seed_of(name, args)
        assert seed.device == x.device and seed.dtype == torch.int64 and seed.numel() == 1, name
        assert out.grad_fn.saved_tensors[0] is seed, name  # the backward pass reads the same seed tensor
    assert torch.equal(torch.get_rng_state(), cpu_state)  # nothing drawn from the CPU generator


def test_explicit_seed_and_cpu_generator_under_capture_stay_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed seed (or a CPU generator's draw) under capture is what the user asked for: a host value, one
    mask for every replay (documented in Note [seeds]). CPU inputs are not affected by a capture either."""
    _fake_capture(monkeypatch)
    with FakeTensorMode():
        x = torch.empty(8, 16, device="cuda:0", requires_grad=True)
        with _OpRecorder() as rec:
            _family_calls(x, seed=5)
            _family_calls(x, generator=torch.Generator().manual_seed(1))
    assert len(rec.calls) == 10
    assert all(_seed_of(name, args).device.type == "cpu" for name, args in rec.calls)
    x = torch.randn(8, 16)
    torch.manual_seed(3)
    captured = F.dropout(x, 0.5)
    monkeypatch.undo()
    torch.manual_seed(3)
    assert torch.equal(F.dropout(x, 0.5), captured)


def test_outside_capture_the_seed_is_the_cpu_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a capture a CUDA input gets today's seed: the CPU generator's draw, a CPU tensor (so the same
    torch.manual_seed gives the same mask on every device). Under torch.compile the same CPU draw is copied
    to the device inside the graph (reduce-overhead captures the compiled kernels afterwards)."""
    with FakeTensorMode():
        x = torch.empty(8, 16, device="cuda:0", requires_grad=True)
        with _OpRecorder() as rec:
            _family_calls(x)
    assert len(rec.calls) == 5 and all(_seed_of(name, args).device.type == "cpu" for name, args in rec.calls)
    x = torch.randn(8, 16, requires_grad=True)  # the values, on real CPU tensors: the draw is unchanged
    torch.manual_seed(9)
    with _OpRecorder() as rec:
        _family_calls(x)
    torch.manual_seed(9)
    expected = [int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)) for _ in range(5)]  # as before issue 13
    assert [int(_seed_of(name, args)) for name, args in rec.calls] == expected
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with FakeTensorMode():
        x = torch.empty(8, 16, device="cuda:0", requires_grad=True)
        with _OpRecorder() as rec:
            F.dropout(x, 0.5)
    ops = [(name, out) for name, out in rec.ops if name in ("aten.randint", "aten._to_copy", "fusedtrain.dropout")]
    assert [name for name, _ in ops] == ["aten.randint", "aten._to_copy", "fusedtrain.dropout"]
    assert ops[0][1].device.type == "cpu"  # drawn from the CPU generator ...
    assert ops[1][1] is _seed_of(*rec.calls[0]) and ops[1][1].device == x.device  # ... copied to the device


def test_seed_tensor_placement_is_validated() -> None:
    """A seed tensor lives on the CPU or on the input's device, has one int64 element; anything else is
    refused by the Python layer and by the op, naming the fix. Where the seed lives does not change the
    mask: a one-element view at an offset is read as its value."""
    x = torch.randn(300)
    bads = [torch.tensor(3, device="meta"), torch.tensor([1, 2]), torch.tensor(3.0), torch.tensor(3, dtype=torch.int32)]
    for bad in bads:
        with pytest.raises(ValueError, match=r"one-element int64 tensor on the CPU or on the input's device \(cpu\)"):
            F.dropout(x, 0.5, seed=bad)
        with pytest.raises(ValueError, match="one-element int64 tensor"):
            F.bias_dropout_add(x.reshape(3, 100), torch.zeros(100), x.reshape(3, 100), 0.5, seed=bad)
    for bad in (torch.tensor([1, 2]), torch.tensor(3.0)):
        with pytest.raises(RuntimeError, match=r"seed must be a one-element int64 tensor on the CPU \(read by the "
                                               r"host\) or on the input's device cpu"):
            fusedtrain._ops.dropout(x, bad, 0, 0.5)
        with pytest.raises(RuntimeError, match="seed must be a one-element int64 tensor"):
            fusedtrain._ops.bias_dropout_add_backward(x.reshape(3, 100), bad, 0, 0.5, 100)
    view = torch.tensor([1, 9, 3])[1]
    assert view.storage_offset() == 1
    assert torch.equal(F.dropout(x, 0.5, seed=view), F.dropout(x, 0.5, seed=9))
    assert torch.equal(F.dropout(x, 0.5, seed=torch.tensor([[9]])), F.dropout(x, 0.5, seed=9))


def test_empty_last_dimension_bias_dropout_add_backward() -> None:
    """bias_dropout_add admits a last dimension of 0 (bias of shape [0]); its backward pass used to refuse
    bias_numel = 0, so any training step through such a layer failed in backward."""
    for shape in [(3, 0), (0, 0), (2, 0, 0)]:
        x = torch.randn(shape, requires_grad=True)
        b = torch.randn(0, requires_grad=True)
        r = torch.randn(shape, requires_grad=True)
        F.bias_dropout_add(x, b, r, 0.5, seed=1).sum().backward()
        assert x.grad.shape == shape and b.grad.shape == (0,) and r.grad.shape == shape
    gx, gb = fusedtrain._ops.bias_dropout_add_backward(torch.randn(4, 0), torch.tensor(1), 0, 0.5, 0)
    assert gx.shape == (4, 0) and gb.shape == (0,)


def _graph_warmup(fn, *args) -> None:
    """torch's recipe: a few eager iterations on a side stream before capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and fusedtrain's CUDA kernels")
@pytest.mark.parametrize("member", ["dropout", "dropout2d", "drop_path", "bias_dropout_add", "inplace", "module"])
def test_cuda_graph_replays_draw_fresh_masks(member: str) -> None:
    """Forward + backward captured in one CUDA graph: every replay draws a new mask, with the keep rule's
    law, and within each replay the backward pass uses the forward's mask."""
    x = (torch.rand(64, 256, device="cuda") + 0.5).requires_grad_()
    gout = torch.rand(64, 256, device="cuda") + 0.5
    bias = torch.zeros(256, device="cuda")
    drop = fnn.Dropout(0.5).cuda()

    def step() -> torch.Tensor:
        x.grad = None
        if member == "dropout":
            y = F.dropout(x, 0.5)
        elif member == "dropout2d":
            y = F.dropout2d(x.reshape(64, 256, 1, 1), 0.5).reshape(64, 256)
        elif member == "drop_path":
            y = F.drop_path(x, 0.5, True)
        elif member == "bias_dropout_add":
            y = F.bias_dropout_add(x, bias, torch.zeros_like(x), 0.5)
        elif member == "inplace":
            y = F.dropout(x * 1, 0.5, inplace=True)
        else:
            y = drop(x)
        y.backward(gout)
        return y

    _graph_warmup(step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    masks = []
    for _ in range(4):
        graph.replay()
        torch.cuda.synchronize()
        fwd, bwd = (y != 0).cpu(), (x.grad != 0).cpu()
        assert torch.equal(fwd, bwd)  # forward and backward agree within a replay
        kept = y != 0
        assert torch.equal(y[kept], x[kept].detach() * scale32(0.5).cuda())
        assert 0.3 < float(fwd.float().mean()) < 0.7
        masks.append(fwd)
    for i in range(len(masks) - 1):
        assert not torch.equal(masks[i], masks[i + 1])  # a fresh mask on every replay


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and fusedtrain's CUDA kernels")
def test_cuda_graph_with_a_fixed_seed_replays_that_mask() -> None:
    x = torch.rand(4096, device="cuda") + 0.5
    expected = F.dropout(x, 0.5, seed=7)
    _graph_warmup(lambda: F.dropout(x, 0.5, seed=7))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = F.dropout(x, 0.5, seed=7)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and fusedtrain's CUDA kernels")
def test_device_seed_gives_the_cpu_seed_mask() -> None:
    """The same seed value gives the same mask whether the seed tensor is on the CPU (read by the host) or
    on the GPU (read by the kernel), and on either device's input; the backward passes agree too."""
    for value in (0, 77, -1, 2**62 + 5):
        dev_seed = torch.tensor(value, device="cuda")
        for dtype in DTYPES:
            x = (torch.rand(10_007, dtype=torch.float64) + 0.5).to(dtype)
            ref = F.dropout(x, 0.3, seed=value)
            assert torch.equal(F.dropout(x.cuda(), 0.3, seed=dev_seed).cpu(), ref)
            x4 = x[:10_000].reshape(10, 50, 20)
            assert torch.equal(F.dropout2d(x4.cuda(), 0.3, seed=dev_seed).cpu(), F.dropout2d(x4, 0.3, seed=value))
            assert torch.equal(F.drop_path(x4.cuda(), 0.3, True, seed=dev_seed).cpu(),
                               F.drop_path(x4, 0.3, True, seed=value))
            inplace = x.cuda()
            F.dropout(inplace, 0.3, inplace=True, seed=dev_seed)
            assert torch.equal(inplace.cpu(), ref)
        x = torch.randn(129, 96, dtype=torch.float64, requires_grad=True)
        b = torch.randn(96, dtype=torch.float64, requires_grad=True)
        r = torch.randn(129, 96, dtype=torch.float64)
        g = torch.randn(129, 96, dtype=torch.float64)
        out = F.bias_dropout_add(x, b, r, 0.2, seed=value)
        out.backward(g)
        xc, bc = x.detach().cuda().requires_grad_(), b.detach().cuda().requires_grad_()
        out_c = F.bias_dropout_add(xc, bc, r.cuda(), 0.2, seed=dev_seed)
        out_c.backward(g.cuda())
        assert torch.equal(out_c.cpu(), out)
        assert torch.equal(xc.grad.cpu(), x.grad)
        torch.testing.assert_close(bc.grad.cpu(), b.grad, rtol=1e-12, atol=1e-12)
    s = torch.tensor(5, device="cuda")
    x = torch.randn(5, 7, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.fusedtrain.dropout.default, (x, s, 0, 0.3, 1, True))
    torch.library.opcheck(torch.ops.fusedtrain.bias_dropout_add_backward.default, (x.detach(), s, 0, 0.3, 7))
    with pytest.raises(ValueError, match="on the CPU or on the input's device"):
        F.dropout(torch.randn(10), 0.5, seed=s)  # a GPU seed for a CPU input
    with pytest.raises(RuntimeError, match="on the CPU .* or on the input's device cpu"):
        fusedtrain._ops.dropout(torch.randn(10), s, 0, 0.5)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and fusedtrain's CUDA kernels")
def test_cuda_generator_draws_on_the_device() -> None:
    x = torch.randn(4096, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    a = F.dropout(x, 0.5, generator=g)
    b = F.dropout(x, 0.5, generator=g)
    assert not torch.equal(a, b)
    g.manual_seed(3)
    assert torch.equal(F.dropout(x, 0.5, generator=g), a)
    with pytest.raises(ValueError, match="CPU torch.Generator or one on the input's device"):
        F.dropout(torch.randn(10), 0.5, generator=g)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and fusedtrain's CUDA kernels")
def test_compile_reduce_overhead_masks_are_fresh_and_match_eager() -> None:
    """torch.compile(mode="reduce-overhead") captures the compiled kernels in CUDA graphs: the masks still
    change on every call, equal eager's for the same torch.manual_seed, and backward matches forward."""
    torch._dynamo.reset()
    fn = torch.compile(lambda t: F.dropout(t, 0.5), mode="reduce-overhead", fullgraph=True)
    x = (torch.rand(64, 256, device="cuda") + 0.5).requires_grad_()
    masks = []
    for i in range(5):
        torch.compiler.cudagraph_mark_step_begin()
        torch.manual_seed(100 + i)
        x.grad = None
        y = fn(x)
        y.backward(torch.ones_like(y))
        fwd, bwd = (y != 0).cpu(), (x.grad != 0).cpu()
        torch.manual_seed(100 + i)
        assert torch.equal(fwd, (F.dropout(x.detach(), 0.5) != 0).cpu())
        assert torch.equal(fwd, bwd)
        masks.append(fwd)
    for i in range(len(masks) - 1):
        assert not torch.equal(masks[i], masks[i + 1])
