"""Property-based tests (hypothesis) of the dropout family, the penalty and the fused augmentation.

Random shapes (0-dim, 0 elements, 1, primes, more than 65536 elements), views (transposed, sliced with a
step, channels-last), dtypes, probabilities in [0, 1] and seeds, each compared with a trusted reference:
the NumPy Philox of tests/test_dropout.py and float arithmetic for the dropout family, float64 math for
the penalty, torchvision's float chain (tests/test_augment.py) for augment. Every refused call is
checked to have changed nothing (a snapshot before, compared after). The number of examples is bounded
(tests/_hypothesis.py: ``pytest --slow`` or ``FUSEDTRAIN_SLOW=1`` for more).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch

import _hypothesis  # noqa: F401  (registers and loads the settings profile; skips without hypothesis)
from hypothesis import assume, given, strategies as st

import fusedtrain
from fusedtrain.augment import BatchAugment
from fusedtrain.augment import functional as AF
from fusedtrain.nn import functional as F
from test_augment import FLOAT_TOL, _tv_chain
from test_dropout import scale32, threshold, words

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PRIMES = [2, 3, 5, 7, 11, 13, 17, 31, 61, 127, 257]


# ---------------------------------------------------------------- strategies

def _small_shapes(min_dims: int = 0, max_dims: int = 4) -> st.SearchStrategy[tuple[int, ...]]:
    dim = st.one_of(st.integers(0, 6), st.sampled_from(PRIMES[:8]))
    return st.lists(dim, min_size=min_dims, max_size=max_dims).map(tuple)


# > 65536 elements: more than 2^16 (one CUDA grid row, the CPU's reduction blocks), with prime sizes.
_LARGE_SHAPES = st.sampled_from([(65537,), (257, 263), (3, 131, 167), (2, 2, 127, 131)])


def shapes(min_dims: int = 0) -> st.SearchStrategy[tuple[int, ...]]:
    """Mostly small shapes (0-dim, empty, 1, primes), one in ten of more than 65536 elements."""
    small, large = _small_shapes(min_dims), _LARGE_SHAPES.filter(lambda s: len(s) >= min_dims)
    return st.integers(0, 9).flatmap(lambda k: large if k == 9 else small)


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype, view: str | None = None) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` (values from float64 normals, some exact zeros), laid out as
    ``view`` says: "contiguous", "transposed" (last two dims swapped in memory), "step" (every second
    element of a larger tensor along the last dim), "channels_last" (4-D) or "offset" (a view at an odd
    storage offset)."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kinds = ["contiguous", "step", "offset"] + (["transposed"] if len(shape) >= 2 else []) + \
        (["channels_last"] if len(shape) == 4 else [])
    view = view or draw(st.sampled_from(kinds))

    def make(s: tuple[int, ...]) -> torch.Tensor:
        t = torch.randn(s, dtype=torch.float64, generator=gen)
        t[torch.rand(s, generator=gen) < 0.05] = 0.0
        return t.to(dtype)

    if view == "transposed":
        return make(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    if view == "step" and len(shape) >= 1:
        return make(shape[:-1] + (2 * shape[-1],))[..., ::2]
    if view == "channels_last":
        return make(shape).to(memory_format=torch.channels_last)
    if view == "offset":
        return make((math.prod(shape) + 3,))[3:].view(shape)
    return make(shape)


probabilities = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 1e-9, 1 - 1e-9]), st.floats(0.0, 1.0))
seeds = st.integers(-(2**63), 2**64 - 1)


# ---------------------------------------------------------------- references

def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(p: float, dtype: torch.dtype, rescale: bool = True) -> torch.Tensor:
    """The kernels' multiplier of a kept element (Note [dropout keep rule]), in the opmath type."""
    if p >= 1.0:
        return torch.zeros((), dtype=_opmath(dtype))
    if not rescale:
        return torch.ones((), dtype=_opmath(dtype))
    return torch.tensor(1.0 / (1.0 - p), dtype=torch.float64) if dtype == torch.float64 else scale32(p)


def _keep(seed: int, decisions: int, p: float) -> torch.Tensor:
    """Keep decisions 0 .. decisions-1 of the stream (seed, offset 0): the reference Philox and threshold."""
    if decisions == 0:
        return torch.zeros(0, dtype=torch.bool)
    return torch.from_numpy(words(seed, decisions).astype(np.int64) >= threshold(p))


def _dropout_reference(x: torch.Tensor, seed: int, p: float, group: int = 1, rescale: bool = True) -> torch.Tensor:
    """x * multiplier(i // group) over the logical row-major index i, in the opmath type, rounded once."""
    flat = x.detach().reshape(-1).to(_opmath(x.dtype))
    keep = _keep(seed, flat.numel() // group, p).repeat_interleave(group)
    mult = torch.where(keep, _scale(p, x.dtype, rescale), torch.zeros((), dtype=flat.dtype))
    return (flat * mult).to(x.dtype).reshape(x.shape)


def _snapshot(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone() for t in ts]


def _copy_with_layout(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a copy of x with x's strides and storage offset, the copy's whole base)."""
    base = (x._base if x._base is not None else x).clone()
    return base.as_strided(x.shape, x.stride(), x.storage_offset()), base


def _refused(call: Callable[[], object], exc: type[BaseException] | tuple, match: str, *watched: torch.Tensor) -> None:
    """``call`` raises ``exc`` matching ``match`` and leaves ``watched`` (values) as they were."""
    before = _snapshot(*watched)
    with pytest.raises(exc, match=match):
        call()
    for a, b in zip(before, watched):
        assert torch.equal(a, b.detach()), "a refused call changed its input"


# ---------------------------------------------------------------- dropout

@given(shape=shapes(), dtype=st.sampled_from(FLOAT_DTYPES), p=probabilities, seed=seeds, inplace=st.booleans(),
       data=st.data())
def test_dropout_is_the_philox_reference(shape, dtype, p, seed, inplace, data) -> None:
    x = data.draw(tensors(shape, dtype))
    original = x.clone()
    work, base = _copy_with_layout(x) if inplace else (x, x)  # in place: into a view laid out like x
    base_before = base.clone()
    y = F.dropout(work, p, inplace=inplace, seed=seed)
    if p == 0.0 or x.numel() == 0:
        assert y is work and torch.equal(base, base_before)  # torch's convention: the input itself
        return
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y, _dropout_reference(original, seed, p))
    if inplace:
        assert y is work
        outside = torch.ones_like(base, dtype=torch.bool)
        outside.as_strided(x.shape, x.stride(), x.storage_offset()).fill_(False)
        assert torch.equal(base[outside], base_before[outside])  # nothing written outside the view
    else:
        assert y.is_contiguous() and torch.equal(x, original)  # the input is not touched


@given(shape=shapes(min_dims=2), dtype=st.sampled_from(FLOAT_DTYPES), p=probabilities, seed=seeds, data=st.data())
def test_dropout2d_drops_whole_channels(shape, dtype, p, seed, data) -> None:
    x = data.draw(tensors(shape, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warnings for inputs that are not 4-D (tested in test_dropout.py)
        y = F.dropout2d(x, p, seed=seed)
    if p == 0.0 or x.numel() == 0:
        assert y is x
        return
    group = x.numel() // (shape[0] * shape[1])
    assert torch.equal(y, _dropout_reference(x, seed, p, group))


@given(shape=shapes(min_dims=1), dtype=st.sampled_from(FLOAT_DTYPES), p=probabilities, seed=seeds,
       scale_by_keep=st.booleans(), data=st.data())
def test_drop_path_drops_whole_samples(shape, dtype, p, seed, scale_by_keep, data) -> None:
    x = data.draw(tensors(shape, dtype))
    y = F.drop_path(x, p, True, scale_by_keep, seed=seed)
    if p == 0.0 or x.numel() == 0:
        assert y is x
        return
    assert torch.equal(y, _dropout_reference(x, seed, p, x.numel() // shape[0], scale_by_keep))


@given(shape=shapes(min_dims=1), dtype=st.sampled_from(FLOAT_DTYPES), p=probabilities, seed=seeds, data=st.data())
def test_dropout_backward_is_the_same_mask(shape, dtype, p, seed, data) -> None:
    x = data.draw(tensors(shape, dtype)).requires_grad_()
    assume(x.numel() > 0 and p > 0.0)
    g = data.draw(tensors(shape, dtype))
    y = F.dropout(x, p, seed=seed)
    y.backward(g)
    assert torch.equal(x.grad, _dropout_reference(g, seed, p))


@given(shape=shapes(min_dims=1), dtype=st.sampled_from(FLOAT_DTYPES), p=probabilities, seed=seeds,
       training=st.booleans(), data=st.data())
def test_bias_dropout_add_is_the_reference(shape, dtype, p, seed, training, data) -> None:
    H = shape[-1]
    x = data.draw(tensors(shape, dtype)).requires_grad_()
    r = data.draw(tensors(shape, dtype)).requires_grad_()
    b = data.draw(tensors((H,), dtype)).requires_grad_()
    g = data.draw(tensors(shape, dtype))
    out = F.bias_dropout_add(x, b, r, p, training, seed=seed)
    p_eff = p if training else 0.0
    T = _opmath(dtype)
    # the multipliers in the opmath type: the scale where kept, 0 elsewhere (1 everywhere for p = 0)
    mult = torch.ones(shape, dtype=T) if p_eff == 0.0 else _dropout_reference(torch.ones(shape, dtype=T), seed, p_eff)
    # residual + (x + bias) * multiplier, each step rounded in the opmath type, the result rounded once
    ref = (r.detach().to(T) + (x.detach().to(T) + b.detach().to(T)) * mult).to(dtype)
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref)
    out.backward(g)
    grad_x = (g.to(T) * mult).to(dtype)
    assert torch.equal(x.grad, grad_x)
    assert torch.equal(r.grad, g)
    # the bias gradient: the sum over rows of grad_x as stored, accumulated in the opmath type (error within
    # rows * eps of the sum of magnitudes) and rounded once to dtype (half an ulp)
    assert b.grad.shape == (H,) and b.grad.dtype == dtype
    rows = grad_x.to(torch.float64).reshape(-1, H) if H else torch.zeros(0, 0, dtype=torch.float64)
    ref_gb = rows.sum(0)
    bound = torch.finfo(dtype).eps * ref_gb.abs() + rows.shape[0] * torch.finfo(T).eps * rows.abs().sum(0)
    got = b.grad.to(torch.float64)
    finite = torch.isfinite(ref_gb)  # float16 overflows to inf for scales near 1 / (1 - p) = 1e9: inf as torch
    assert bool(((got - ref_gb).abs()[finite] <= bound[finite] + torch.finfo(dtype).tiny).all())
    assert torch.equal(got[~finite].nan_to_num(), ref_gb[~finite].nan_to_num())


@given(dtype=st.sampled_from(FLOAT_DTYPES), data=st.data())
def test_refused_dropout_calls_change_nothing(dtype, data) -> None:
    shape = data.draw(_small_shapes(min_dims=1).filter(lambda s: math.prod(s) > 0))
    x = data.draw(tensors(shape, dtype))
    bad_p = data.draw(st.one_of(st.floats(allow_nan=True).filter(lambda v: not 0.0 <= v <= 1.0),
                                st.sampled_from([-1e-12, 1 + 1e-12, math.inf, -math.inf, math.nan])))
    for inplace in (False, True):
        _refused(lambda: F.dropout(x, bad_p, inplace=inplace, seed=1), ValueError, "between 0 and 1", x)
        _refused(lambda: fusedtrain._ops.dropout_(x, torch.tensor(1), 0, bad_p), RuntimeError, "between 0 and 1", x)
    bad_seed = data.draw(st.sampled_from([torch.tensor([1, 2]), torch.tensor(1.0), torch.tensor(1, dtype=torch.int32),
                                          torch.tensor(1, device="meta")]))
    _refused(lambda: F.dropout(x, 0.5, inplace=True, seed=bad_seed), ValueError, "one-element int64 tensor", x)
    if bad_seed.device.type == "cpu":
        _refused(lambda: fusedtrain._ops.dropout_(x, bad_seed, 0, 0.5), RuntimeError, "one-element int64 tensor", x)
    n = x.numel()
    bad_group = data.draw(st.one_of(st.integers(max_value=0), st.integers(1, 4 * n).filter(lambda k: n % k != 0)))
    _refused(lambda: fusedtrain._ops.dropout_(x, torch.tensor(1), 0, 0.5, bad_group), RuntimeError,
             "group", x)
    H = shape[-1]
    r = data.draw(tensors(shape, dtype))
    wrong_bias = torch.zeros(H + 1, dtype=dtype)
    _refused(lambda: F.bias_dropout_add(x, wrong_bias, r, 0.5, seed=1), RuntimeError, "bias must have shape", x, r)
    _refused(lambda: F.bias_dropout_add(x, torch.zeros(H, dtype=dtype), r, bad_p), ValueError, "between 0 and 1",
             x, r)


# ---------------------------------------------------------------- penalty

@given(shapes_=st.lists(shapes(), min_size=1, max_size=4), dtype=st.sampled_from(FLOAT_DTYPES),
       l1=st.one_of(st.just(0.0), st.floats(0.0, 10.0)), l2=st.one_of(st.just(0.0), st.floats(0.0, 10.0)),
       upstream=st.floats(-4.0, 4.0), data=st.data())
def test_penalty_is_the_float64_reference(shapes_, dtype, l1, l2, upstream, data) -> None:
    params = [data.draw(tensors(s, dtype)).requires_grad_() for s in shapes_]
    before = _snapshot(*params)
    value = fusedtrain.regularization.penalty(params, l1=l1, l2=l2)
    T = _opmath(dtype)
    assert value.dtype == T and value.shape == ()
    # the kernels take the coefficients in the accumulation type (a coefficient below float32's range is 0)
    c1, c2 = (float(torch.tensor(c, dtype=T)) for c in (l1, l2))
    wide = [p.detach().to(torch.float64).reshape(-1) for p in params]
    flat = torch.cat(wide)
    terms = c1 * float(flat.abs().sum()) + c2 * float(flat.square().sum())
    # accumulation of n terms in T: within (n + 4) eps of the sum of magnitudes (all terms are >= 0), and
    # gradual underflow near T's smallest normal
    bound = (flat.numel() + 4) * torch.finfo(T).eps * terms + torch.finfo(T).tiny
    assert abs(float(value.detach()) - terms) <= bound
    (value * upstream).backward()
    for p, w, b in zip(params, wide, before):
        assert torch.equal(p.detach(), b)  # the penalty reads, never writes
        # d/dtheta = l1 sign(theta) + 2 l2 theta: the two terms have the same sign, so each is computed to a
        # few ulps in T and the result rounded once to dtype
        grad = float(torch.tensor(upstream, dtype=T)) * (c1 * torch.sign(w) + 2 * c2 * w)
        torch.testing.assert_close(p.grad.reshape(-1).to(torch.float64), grad.to(dtype).to(torch.float64),
                                   rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(T).tiny)


@given(bad=st.one_of(st.floats(max_value=-1e-300), st.sampled_from([math.nan, math.inf, -math.inf])),
       which=st.sampled_from(["l1", "l2"]), data=st.data())
def test_refused_penalty_calls_change_nothing(bad, which, data) -> None:
    params = [data.draw(tensors(s, torch.float32)).requires_grad_() for s in [(3, 5), (7,)]]
    kw = {which: bad}
    _refused(lambda: fusedtrain.regularization.penalty(params, **kw), ValueError, f"Invalid {which} value", *params)
    assert all(p.grad is None for p in params)
    mixed = [params[0].detach(), params[1].detach().double()]
    _refused(lambda: fusedtrain._ops.penalty(mixed, 0.1, 0.1), RuntimeError, "differs from params", *mixed)
    ints = [torch.arange(5)]
    _refused(lambda: fusedtrain._ops.penalty(ints, 0.1, 0.1), RuntimeError, "only float32", *ints)


# ---------------------------------------------------------------- augment

@st.composite
def augment_cases(draw: st.DrawFn) -> dict:
    """A batch of 1-3 uint8 images of 1 x 1 to 23 x 23 pixels, 1 or 3 channels, in one of the layouts, with
    boxes anywhere inside (often on the border: the whole image, a corner, one row or column), flips and
    factors in [0, 2] (exactly 0 and 1 included)."""
    channels = draw(st.sampled_from([1, 3]))
    n = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    sizes = [(draw(st.integers(1, 23)), draw(st.integers(1, 23))) for _ in range(n)]
    images = [torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=gen) for h, w in sizes]
    boxes = []
    for h, w in sizes:
        kind = draw(st.sampled_from(["any", "whole", "bottom_right", "row", "column", "pixel"]))
        if kind == "whole":
            boxes.append([0, 0, h, w])
            continue
        bh = {"row": 1, "pixel": 1}.get(kind, draw(st.integers(1, h)))
        bw = {"column": 1, "pixel": 1}.get(kind, draw(st.integers(1, w)))
        top = h - bh if kind == "bottom_right" else draw(st.integers(0, h - bh))
        left = w - bw if kind == "bottom_right" else draw(st.integers(0, w - bw))
        boxes.append([top, left, bh, bw])
    factor = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 2.0, width=32))
    factors = [[draw(factor) for _ in range(3)] for _ in range(n)]
    flips = [draw(st.booleans()) for _ in range(n)]
    layout = draw(st.sampled_from(["NCHW", "NHWC", "list", "strided"]))
    return dict(images=images, boxes=boxes, factors=factors, flips=flips, size=draw(st.integers(1, 24)),
                antialias=draw(st.booleans()), layout=layout, channels=channels,
                normalize=draw(st.booleans()), out_dtype=draw(st.sampled_from([torch.float32, torch.float16,
                                                                               torch.bfloat16])))


def _as_layout(images: list[torch.Tensor], layout: str) -> tuple[object, str]:
    same = len({tuple(im.shape) for im in images}) == 1
    if layout == "NHWC" and same:
        return torch.stack(images).permute(0, 2, 3, 1).contiguous(), "NHWC"
    if layout == "strided":  # each image a view inside a larger one: row, column and channel offsets
        views = []
        for im in images:
            c, h, w = im.shape
            big = torch.zeros((c + 2, h + 3, w + 4), dtype=torch.uint8)
            big[1:1 + c, 2:2 + h, 3:3 + w] = im
            views.append(big[1:1 + c, 2:2 + h, 3:3 + w])
        return views, "NCHW"
    if layout == "NCHW" and same:
        return torch.stack(images), "NCHW"
    return list(images), "NCHW"


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@given(case=augment_cases())
def test_augment_is_torchvisions_float_chain(case: dict) -> None:
    c = case["channels"]
    mean, std = (MEAN[:c], STD[:c]) if case["normalize"] else (None, None)
    images, layout = _as_layout(case["images"], case["layout"])
    f = case["factors"]
    out = AF.augment(images, case["boxes"], case["flips"], [v[0] for v in f], [v[1] for v in f], [v[2] for v in f],
                     size=case["size"], mean=mean, std=std, out_dtype=torch.float32, antialias=case["antialias"],
                     layout=layout)
    n, size = len(case["images"]), case["size"]
    assert out.shape == (n, c, size, size) and out.dtype == torch.float32
    for i, img in enumerate(case["images"]):
        ref = _tv_chain(img, case["boxes"][i], case["flips"][i], f[i], size, to_float_first=True, mean=mean,
                        std=std, antialias=case["antialias"])
        atol = FLOAT_TOL / (min(std) if std else 1.0)
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=atol)
    if case["out_dtype"] != torch.float32:  # computed in float32 and rounded once
        half = AF.augment(images, case["boxes"], case["flips"], [v[0] for v in f], [v[1] for v in f],
                          [v[2] for v in f], size=size, mean=mean, std=std, out_dtype=case["out_dtype"],
                          antialias=case["antialias"], layout=layout)
        assert torch.equal(half, out.to(case["out_dtype"]))


@given(case=augment_cases(), data=st.data())
def test_augment_refuses_boxes_outside_and_changes_nothing(case: dict, data) -> None:
    """Boxes one pixel past the border, empty, negative or at int64's limits are refused with the box
    named; the images (and the other arguments) are left as they were."""
    images = case["images"]
    i = data.draw(st.integers(0, len(images) - 1))
    _, h, w = images[i].shape
    big = 2**63 - 1
    bad = data.draw(st.sampled_from([
        [0, 0, h + 1, w], [0, 0, h, w + 1], [h, 0, 1, 1], [0, w, 1, 1], [1, 0, h, w], [0, 1, h, w],
        [0, 0, 0, w], [0, 0, h, 0], [-1, 0, 1, 1], [0, -1, 1, 1], [1, 0, big, 1], [0, 1, 1, big],
        [big, 0, 1, 1], [0, big, 1, 1], [big, big, big, big], [-big - 1, 0, 1, 1]]))
    boxes = torch.tensor([b if k != i else bad for k, b in enumerate(case["boxes"])], dtype=torch.int64)
    flips = torch.tensor(case["flips"])
    factors = torch.tensor(case["factors"], dtype=torch.float32)
    watched = [*images, boxes, flips, factors]
    _refused(lambda: AF.augment(images, boxes, flips, factors[:, 0], factors[:, 1], factors[:, 2],
                                size=case["size"]), RuntimeError, rf"boxes\[{i}\].*does not lie inside", *watched)


@given(channels=st.sampled_from([2, 4]), data=st.data())
def test_augment_refuses_other_channel_counts(channels, data) -> None:
    h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    x = torch.randint(0, 256, (2, channels, h, w), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    state = gen.get_state()
    _refused(lambda: AF.augment(x, [[0, 0, h, w]] * 2, size=4), ValueError, f"{channels} channels", x)
    _refused(lambda: BatchAugment(4)(x, generator=gen), ValueError, f"{channels} channels", x)
    assert torch.equal(gen.get_state(), state)  # refused before drawing
    _refused(lambda: torch.ops.fusedtrain.augment(list(x), torch.tensor([[0, 0, h, w]] * 2),
                                                  torch.zeros(2, dtype=torch.bool), torch.ones(2, 3), 4,
                                                  [0.0] * channels, [1.0] * channels, torch.float32),
             RuntimeError, f"{channels} channels", x)


@given(size=st.integers(1, 20), n=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_batch_augment_boxes_lie_inside_and_match_the_functional(size, n, seed, data) -> None:
    """BatchAugment on tiny images (1 x 1 included): its boxes lie inside every image and its output is the
    functional's with the returned parameters."""
    sizes = [(data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))) for _ in range(n)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in sizes]
    aug = BatchAugment(size, brightness=0.5, contrast=0.5, saturation=0.5, hflip=0.5)
    out, params = aug(images, seed=seed, return_params=True)
    for (h, w), (top, left, bh, bw) in zip(sizes, params.boxes.tolist()):
        assert 0 <= top and 0 <= left and 1 <= bh <= h - top and 1 <= bw <= w - left
    ref = AF.augment(images, params.boxes, params.flips, params.brightness, params.contrast, params.saturation,
                     size=size)
    assert torch.equal(out, ref)
