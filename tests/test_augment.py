"""fusedtrain.augment: the fused op against torchvision's v2 functional chain, layouts, determinism, the
law of the sampled parameters, cutout / mixup / cutmix, test-time augmentation, errors, opcheck, CUDA == CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch import nn

import fusedtrain
from fusedtrain import _build
from fusedtrain.augment import BatchAugment, cutmix, cutout, mixup, tta_predict
from fusedtrain.augment import functional as AF
from conftest import DEVICES

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ---------------------------------------------------------------- references

def _tv_chain(img: torch.Tensor, box: list[int], flip: bool, f: list[float], size: int | tuple[int, int], *,
              to_float_first: bool, mean: list[float] | None = None, std: list[float] | None = None,
              antialias: bool = False) -> torch.Tensor:
    """torchvision v2 functional: resized_crop (bilinear, antialias=False), horizontal_flip, brightness,
    contrast, saturation, to float in [0, 1], normalize. ``to_float_first`` converts the uint8 image to
    float before the chain; otherwise torchvision works on the image's dtype: a uint8 image is rounded after
    every step, a float image in [0, 1] runs the float chain. ``size``: an int (square) or (height, width)."""
    x = TF.to_dtype(img, torch.float32, scale=True) if to_float_first else img
    hw = [size, size] if isinstance(size, int) else list(size)
    x = TF.resized_crop(x, *box, hw, interpolation=T.InterpolationMode.BILINEAR, antialias=antialias)
    if flip:
        x = TF.horizontal_flip(x)
    x = TF.adjust_brightness(x, f[0])
    x = TF.adjust_contrast(x, f[1])
    x = TF.adjust_saturation(x, f[2])
    x = TF.to_dtype(x, torch.float32, scale=True)
    return x if mean is None else TF.normalize(x, mean, std)


def _uint8_chain_bound(f: list[float], channels: int) -> float:
    """Worst-case distance in levels (0..255) between the float chain and torchvision's uint8 chain.

    The uint8 chain's resize is torch's native uint8 bilinear kernel, which lands up to one level away
    from the exact float resize (measured: 1.0003 at most over 400 random crops; it is off by one even
    where the float result is an integer), then it truncates after brightness, contrast and saturation
    (each adds an error in (-1, 0]) and floors the grayscale that contrast averages and saturation
    blends with; every step scales the incoming error by its factor, and the blends also carry
    |1 - factor| times the error of the gray they mix in.
    """
    b, c, s = f
    e0 = 1.01
    e1 = b * e0 + 1
    e_mean = e1 + 1
    e2 = c * e1 + abs(1 - c) * e_mean + 1
    return s * e2 + abs(1 - s) * (e2 + 1) + 1 if channels == 3 else e2


def _random_case(gen: torch.Generator, channels: int) -> tuple[torch.Tensor, list[int], bool, list[float], int]:
    H, W = (int(v) for v in torch.randint(5, 70, (2,), generator=gen))
    img = torch.randint(0, 256, (channels, H, W), dtype=torch.uint8, generator=gen)
    box = AF.sample_crop_boxes([H], [W], generator=gen)[0].tolist()
    size = int(torch.randint(3, 45, (1,), generator=gen))
    flip = bool(torch.rand((), generator=gen) < 0.5)
    f = (0.5 + torch.rand(3, generator=gen)).tolist()
    for k in range(3):  # some factors exactly 1 (the op's skip paths)
        if torch.rand((), generator=gen) < 0.2:
            f[k] = 1.0
    return img, box, flip, f, size


def _ours(img: torch.Tensor, box: list[int], flip: bool, f: list[float], size: int, **kw) -> torch.Tensor:
    return AF.augment(img[None], [box], [flip], [f[0]], [f[1]], [f[2]], size=size, **kw)[0]


# ---------------------------------------------------------------- parity with torchvision

# torchvision on float input, compared in [0, 1]: one hundredth of a level. The two differ by float
# rounding only, mostly of the source coordinate scale * (x + 0.5) - 0.5, which torch's CPU kernel
# evidently computes with an FMA (emulating it reproduces torch's weights) and fusedtrain does not (so
# that CPU and CUDA round alike); an ulp of the coordinate moves a weight by ~1e-7 * size, a value by
# that times the step between two pixels.
FLOAT_TOL = 0.01 / 255


@pytest.mark.parametrize("channels", [3, 1])
def test_matches_torchvision_float_chain(channels: int) -> None:
    """Random images of odd sizes, random boxes, flips and factors: equal to torchvision on float input up
    to float rounding (far inside the required 1/255), before and after normalization."""
    gen = torch.Generator().manual_seed(10 + channels)
    worst = 0.0
    for _ in range(80):
        img, box, flip, f, size = _random_case(gen, channels)
        got = _ours(img, box, flip, f, size)
        ref = _tv_chain(img, box, flip, f, size, to_float_first=True)
        worst = max(worst, float((got - ref).abs().max()))
        torch.testing.assert_close(got, ref, rtol=0, atol=FLOAT_TOL)
        mean, std = MEAN[:channels], STD[:channels]
        got_n = _ours(img, box, flip, f, size, mean=mean, std=std)
        ref_n = _tv_chain(img, box, flip, f, size, to_float_first=True, mean=mean, std=std)
        torch.testing.assert_close(got_n, ref_n, rtol=1e-5, atol=FLOAT_TOL / min(std))
    assert worst < FLOAT_TOL


@pytest.mark.parametrize("channels", [3, 1])
def test_uint8_chain_within_its_rounding_bound(channels: int) -> None:
    """torchvision on a uint8 tensor rounds after every step: within the derived bound, biased low."""
    gen = torch.Generator().manual_seed(20 + channels)
    diffs = []
    for _ in range(60):
        img, box, flip, f, size = _random_case(gen, channels)
        got = _ours(img, box, flip, f, size) * 255
        ref = _tv_chain(img, box, flip, f, size, to_float_first=False) * 255
        d = got - ref
        assert float(d.abs().max()) <= _uint8_chain_bound(f, channels) + 1e-3
        diffs.append(d.flatten())
    d = torch.cat(diffs)
    # truncation toward zero makes torchvision's uint8 result lower on average, by under 2 levels
    assert 0 < float(d.mean()) < 2
    assert float(d.abs().mean()) < 2


def test_edge_boxes() -> None:
    """Whole image, 1 x 1 crop, a box in the bottom-right corner, a crop the size of the output (the copy
    path), upscaling and downscaling of a wide strip."""
    gen = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=gen)
    f = [1.3, 0.7, 1.2]
    for box, size in [([0, 0, 37, 53], 16), ([5, 9, 1, 1], 7), ([30, 46, 7, 7], 19), ([3, 4, 20, 20], 20),
                      ([0, 0, 2, 53], 31), ([10, 0, 20, 53], 5)]:
        for flip in (False, True):
            ref = _tv_chain(img, box, flip, f, size, to_float_first=True)
            torch.testing.assert_close(_ours(img, box, flip, f, size), ref, rtol=0, atol=FLOAT_TOL)


@pytest.mark.parametrize("channels", [3, 1])
def test_antialias_matches_torchvision(channels: int) -> None:
    """antialias=True: torchvision's antialiased resize on float input, from 25x downscaling (51 taps) to
    upscaling (where it differs from the two-tap bilinear at the borders only)."""
    gen = torch.Generator().manual_seed(30 + channels)
    cases = [_random_case(gen, channels) for _ in range(40)]
    big = torch.randint(0, 256, (channels, 611, 803), dtype=torch.uint8, generator=gen)
    cases += [(big, [0, 0, 611, 803], True, [1.2, 0.8, 1.3], 24), (big, [100, 7, 500, 61], False, [1.0, 1.0, 1.0], 40),
              (big, [3, 5, 7, 9], True, [0.9, 1.1, 1.0], 33)]
    for img, box, flip, f, size in cases:
        got = _ours(img, box, flip, f, size, antialias=True, mean=MEAN[:channels], std=STD[:channels])
        ref = _tv_chain(img, box, flip, f, size, to_float_first=True, antialias=True, mean=MEAN[:channels],
                        std=STD[:channels])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=FLOAT_TOL / min(STD))
    # NHWC reads the same pixels
    img, box, flip, f, size = cases[-3]
    nhwc = AF.augment(img.permute(1, 2, 0)[None], [box], [flip], [f[0]], [f[1]], [f[2]], size=size, antialias=True,
                      layout="NHWC")
    assert torch.equal(nhwc[0], _ours(img, box, flip, f, size, antialias=True))
    plain = _ours(img, box, flip, f, size)
    assert float((plain - nhwc[0]).abs().max()) > 0.05  # the option changes the result


def test_one_channel_ignores_saturation() -> None:
    img = torch.randint(0, 256, (1, 30, 40), dtype=torch.uint8)
    a = _ours(img, [2, 3, 20, 30], True, [1.2, 0.8, 0.3], 17)
    b = _ours(img, [2, 3, 20, 30], True, [1.2, 0.8, 1.0], 17)
    assert torch.equal(a, b)


def test_identity_parameters_give_the_plain_resize() -> None:
    img = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    out = _ours(img, [0, 0, 24, 24], False, [1.0, 1.0, 1.0], 24)
    torch.testing.assert_close(out, img.float() / 255, rtol=1.2e-7, atol=0)  # v * (1 / 255) vs v / 255


def test_half_outputs_are_the_rounded_float_output() -> None:
    x = torch.randint(0, 256, (4, 3, 40, 50), dtype=torch.uint8)
    boxes = AF.sample_crop_boxes([40] * 4, [50] * 4)
    kw = dict(brightness=[1.2] * 4, contrast=[0.8] * 4, saturation=[1.3] * 4, size=33, mean=MEAN, std=STD)
    ref = AF.augment(x, boxes, [True, False] * 2, **kw)
    for dt in (torch.float16, torch.bfloat16):
        got = AF.augment(x, boxes, [True, False] * 2, out_dtype=dt, **kw)
        assert got.dtype == dt and torch.equal(got, ref.to(dt))


# ---------------------------------------------------------------- float input, (height, width) output

def _random_float_case(gen: torch.Generator, channels: int) -> tuple[torch.Tensor, list[int], bool, list[float],
                                                                      tuple[int, int]]:
    """A _random_case with a float image in [0, 1] and a non-square output."""
    img, box, flip, f, size = _random_case(gen, channels)
    image = torch.rand(img.shape, generator=gen)
    image[:, :2, :2] = torch.tensor([0.0, 1.0])  # the ends of the range
    return image, box, flip, f, (size, int(torch.randint(3, 45, (1,), generator=gen)))


@pytest.mark.parametrize("channels", [3, 1])
def test_float_input_matches_torchvision_float_chain(channels: int) -> None:
    """Float images in [0, 1] (torchvision's float convention) with (height, width) outputs: torchvision's
    float chain, before and after normalization, with and without antialias."""
    gen = torch.Generator().manual_seed(40 + channels)
    mean, std = MEAN[:channels], STD[:channels]
    for k in range(60):
        img, box, flip, f, hw = _random_float_case(gen, channels)
        antialias = k % 3 == 0
        got = _ours(img, box, flip, f, hw, antialias=antialias)
        assert got.shape == (channels, *hw)
        ref = _tv_chain(img, box, flip, f, hw, to_float_first=False, antialias=antialias)
        torch.testing.assert_close(got, ref, rtol=0, atol=FLOAT_TOL)
        got_n = _ours(img, box, flip, f, hw, mean=mean, std=std, antialias=antialias)
        ref_n = _tv_chain(img, box, flip, f, hw, to_float_first=False, mean=mean, std=std, antialias=antialias)
        torch.testing.assert_close(got_n, ref_n, rtol=1e-5, atol=FLOAT_TOL / min(std))


def test_float_input_equals_the_same_image_as_uint8() -> None:
    """A uint8 image and the same image as float (u / 255) give the same output up to float rounding; float
    values outside [0, 1] are clamped as torchvision's adjust_brightness clamps them (even at factor 1)."""
    gen = torch.Generator().manual_seed(44)
    x = torch.randint(0, 256, (5, 3, 31, 43), dtype=torch.uint8, generator=gen)
    aug = BatchAugment((17, 29), brightness=0.4, contrast=0.4, saturation=0.4, mean=MEAN, std=STD)
    torch.testing.assert_close(aug(x.float() / 255, seed=2), aug(x, seed=2), rtol=1e-5, atol=1e-5)
    for dt in (torch.float64, torch.float16, torch.bfloat16):  # other float dtypes: read as float32
        xd = (x.float() / 255).to(dt)
        assert torch.equal(aug(xd, seed=2), aug(xd.float(), seed=2))
    wild = torch.randn(2, 3, 20, 20, generator=gen) * 2  # outside [0, 1]
    params = aug.sample_params(wild, seed=3)
    got = aug(wild, seed=3)
    for i in range(2):
        ref = _tv_chain(wild[i], params.boxes[i].tolist(), bool(params.flips[i]), params.factors[i].tolist(),
                        (17, 29), to_float_first=False, mean=MEAN, std=STD)
        torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=FLOAT_TOL / min(STD))


def test_size_height_width() -> None:
    """size=(h, w) as torchvision's RandomResizedCrop: uint8 and float input, lists of sizes, NHWC, one-value
    sequences as squares; BatchAugment keeps size as (h, w)."""
    gen = torch.Generator().manual_seed(45)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in
              [(20, 31), (64, 17), (9, 9), (50, 80)]]
    aug = BatchAugment((13, 26), brightness=0.5, contrast=0.5, saturation=0.5, hflip=0.5)
    assert aug.size == (13, 26) and "size=(13, 26)" in repr(aug)
    out, p = aug(images, seed=4, return_params=True)
    assert out.shape == (4, 3, 13, 26)
    for i, im in enumerate(images):
        ref = _tv_chain(im, p.boxes[i].tolist(), bool(p.flips[i]), p.factors[i].tolist(), (13, 26),
                        to_float_first=True)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=FLOAT_TOL)
    nhwc = [im.permute(1, 2, 0) for im in images]
    assert torch.equal(BatchAugment((13, 26), brightness=0.5, contrast=0.5, saturation=0.5, layout="NHWC")(
        nhwc, seed=4), out)
    assert BatchAugment([7]).size == (7, 7) and BatchAugment(torch.Size([5, 6])).size == (5, 6)
    batch = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8, generator=gen)
    boxes = [[0, 0, 20, 20], [2, 3, 9, 15]]
    assert torch.equal(AF.augment(batch, boxes, size=11), AF.augment(batch, boxes, size=(11, 11)))
    assert AF.augment(batch, boxes, size=(1, 40)).shape == (2, 3, 1, 40)


# ---------------------------------------------------------------- layouts, threads, ISAs

def test_layouts_and_lists_agree() -> None:
    gen = torch.Generator().manual_seed(5)
    nchw = torch.randint(0, 256, (6, 3, 41, 59), dtype=torch.uint8, generator=gen)
    nhwc = nchw.permute(0, 2, 3, 1).contiguous()
    big = torch.randint(0, 256, (6, 5, 50, 70), dtype=torch.uint8, generator=gen)
    big[:, 1:4, 3:44, 2:61] = nchw  # a strided view: channel, row and column offsets
    view = big[:, 1:4, 3:44, 2:61]
    transposed = nchw.transpose(2, 3).contiguous().transpose(2, 3)  # column stride != 1
    aug = BatchAugment(29, brightness=0.4, contrast=0.4, saturation=0.4, mean=MEAN, std=STD)
    params = aug.sample_params(nchw, seed=1)
    args = (params.boxes, params.flips, params.brightness, params.contrast, params.saturation)
    ref = AF.augment(nchw, *args, size=29, mean=MEAN, std=STD)
    for images, layout in [(nhwc, "NHWC"), (list(nchw), "NCHW"), (list(nhwc), "NHWC"), (view, "NCHW"),
                           (transposed, "NCHW")]:
        assert torch.equal(AF.augment(images, *args, size=29, mean=MEAN, std=STD, layout=layout), ref)
    nhwc_aug = BatchAugment(29, brightness=0.4, contrast=0.4, saturation=0.4, mean=MEAN, std=STD, layout="NHWC")
    assert torch.equal(nhwc_aug(nhwc, seed=1), aug(nchw, seed=1))


def test_list_of_different_sizes_matches_per_image_calls() -> None:
    gen = torch.Generator().manual_seed(6)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in
              [(20, 31), (64, 17), (9, 9), (50, 80), (33, 33)]]
    aug = BatchAugment(21, brightness=0.5, contrast=0.5, saturation=0.5)
    out, p = aug(images, seed=4, return_params=True)
    assert out.shape == (5, 3, 21, 21)
    for i, im in enumerate(images):
        assert p.boxes[i, 0] + p.boxes[i, 2] <= im.shape[1] and p.boxes[i, 1] + p.boxes[i, 3] <= im.shape[2]
        ref = _tv_chain(im, p.boxes[i].tolist(), bool(p.flips[i]), p.factors[i].tolist(), 21, to_float_first=True)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=FLOAT_TOL)


def test_threads_batch_split_and_isa_do_not_change_bits() -> None:
    """Few samples split their rows between threads, many samples go whole to a thread; every SIMD copy
    computes the same float operations in the same order (no FMA contraction)."""
    x = torch.randint(0, 256, (12, 3, 45, 38), dtype=torch.uint8)
    size = 160  # large enough that two samples' rows are split between two threads
    aug = BatchAugment(size, brightness=0.4, contrast=0.4, saturation=0.4, mean=MEAN, std=STD)
    p = aug.sample_params(x, seed=2)
    args = (p.boxes, p.flips, p.brightness, p.contrast, p.saturation)
    lib = _build.library()
    order = ["baseline", "avx2", "avx512"]
    usable = order[: order.index(lib.cpu_isa_detected()) + 1]
    original, threads = lib.cpu_isa(), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        lib.set_cpu_isa("baseline")
        ref = AF.augment(x, *args, size=size, mean=MEAN, std=STD)
        ref_aa = AF.augment(x, *args, size=24, antialias=True)
        for isa in usable:
            lib.set_cpu_isa(isa)
            for n in (1, 2):
                torch.set_num_threads(n)
                assert torch.equal(AF.augment(x, *args, size=size, mean=MEAN, std=STD), ref)
                pair = AF.augment(x[:2], *(a[:2] for a in args), size=size, mean=MEAN, std=STD)
                assert torch.equal(pair, ref[:2])
                assert torch.equal(AF.augment(x, *args, size=24, antialias=True), ref_aa)
    finally:
        lib.set_cpu_isa(original)
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- the random draw

def test_seed_generator_and_manual_seed_reproduce() -> None:
    x = torch.randint(0, 256, (5, 3, 30, 40), dtype=torch.uint8)
    aug = BatchAugment(16, brightness=0.4, contrast=0.4, saturation=0.4)
    a, pa = aug(x, seed=7, return_params=True)
    b, pb = aug(x, generator=torch.Generator().manual_seed(7), return_params=True)
    assert torch.equal(a, b) and torch.equal(pa.boxes, pb.boxes) and torch.equal(pa.factors, pb.factors)
    c = aug(x, seed=8)
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    d = aug(x)
    torch.manual_seed(3)
    assert torch.equal(aug(x), d)
    assert not torch.equal(aug(x), d)  # the default generator moved on


def _torchvision_loop(heights, widths, scale, ratio, u, pos) -> torch.Tensor:
    """RandomResizedCrop.get_params's loop, written out, fed with given uniforms."""
    out = []
    for n, (height, width) in enumerate(zip(heights, widths)):
        area = height * width
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for k in range(u.shape[1]):
            target_area = area * (scale[0] + (scale[1] - scale[0]) * float(u[n, k, 0]))
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(u[n, k, 1]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = min(math.floor(float(pos[n, 0]) * (height - h + 1)), height - h)
                j = min(math.floor(float(pos[n, 1]) * (width - w + 1)), width - w)
                out.append((i, j, h, w))
                break
        else:
            in_ratio = float(width) / float(height)
            if in_ratio < min(ratio):
                w = width
                h = int(round(w / min(ratio)))
            elif in_ratio > max(ratio):
                h = height
                w = int(round(h * max(ratio)))
            else:
                w, h = width, height
            out.append(((height - h) // 2, (width - w) // 2, h, w))
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.5), (0.2, 5.0)),
                                         ((0.9, 1.0), (2.0, 3.0))])
def test_crop_boxes_are_torchvisions_loop_vectorized(scale, ratio) -> None:
    gen = torch.Generator().manual_seed(11)
    heights = torch.randint(1, 300, (400,), generator=gen).tolist()
    widths = torch.randint(1, 300, (400,), generator=gen).tolist()
    state = gen.get_state()
    boxes = AF.sample_crop_boxes(heights, widths, scale, ratio, generator=gen)
    gen.set_state(state)
    u = torch.rand((400, 10, 2), generator=gen, dtype=torch.float64)
    pos = torch.rand((400, 2), generator=gen, dtype=torch.float64)
    assert torch.equal(boxes, _torchvision_loop(heights, widths, scale, ratio, u, pos))


def test_fallback_is_torchvisions_central_crop() -> None:
    """With an area above the image's every try fails: the central crop, as torchvision computes it."""
    for h, w, ratio in [(10, 1000, (3 / 4, 4 / 3)), (1000, 10, (3 / 4, 4 / 3)), (50, 60, (3 / 4, 4 / 3)),
                        (7, 300, (1.0, 2.0))]:
        ours = AF.sample_crop_boxes([h], [w], (2.0, 3.0), ratio)[0].tolist()
        theirs = list(T.RandomResizedCrop.get_params(torch.empty(1, h, w), [2.0, 3.0], list(ratio)))
        assert ours == theirs


def test_sampled_parameters_follow_the_requested_law() -> None:
    n = 20_000
    gen = torch.Generator().manual_seed(12)
    H, W = 256, 320
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    p = AF.sample_params([H] * n, [W] * n, scale=scale, ratio=ratio, hflip=0.3, brightness=0.4, contrast=(0.2, 0.9),
                         saturation=0.0, generator=gen)
    t, l, h, w = p.boxes.double().unbind(1)
    assert bool(((t >= 0) & (l >= 0) & (t + h <= H) & (l + w <= W) & (h >= 1) & (w >= 1)).all())
    # area fraction within scale and log aspect ratio within log ratio, up to the rounding of h and w
    frac = h * w / (H * W)
    slack = (h + w + 1) / (H * W)
    assert bool((frac >= scale[0] - slack).all() and (frac <= scale[1] + slack).all())
    log_ar = torch.log(w / h)
    r_slack = 0.5 / h + 0.5 / w
    assert bool((log_ar >= math.log(ratio[0]) - r_slack).all() and (log_ar <= math.log(ratio[1]) + r_slack).all())
    # same law as torchvision's get_params (two-sample Kolmogorov-Smirnov on area and aspect)
    tv = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(1, H, W), list(scale), list(ratio))
                       for _ in range(3000)], dtype=torch.float64)
    for ours, theirs in [(frac, tv[:, 2] * tv[:, 3] / (H * W)), (log_ar, torch.log(tv[:, 3] / tv[:, 2]))]:
        grid = torch.cat([ours, theirs]).sort().values
        cdf_a = torch.searchsorted(ours.sort().values, grid, right=True) / len(ours)
        cdf_b = torch.searchsorted(theirs.sort().values, grid, right=True) / len(theirs)
        ks = float((cdf_a - cdf_b).abs().max())
        assert ks < 1.95 * math.sqrt((len(ours) + len(theirs)) / (len(ours) * len(theirs)))  # alpha = 0.001
    # positions uniform: the box centre covers the image symmetrically
    assert abs(float((t + h / 2).mean()) - H / 2) < 3 and abs(float((l + w / 2).mean()) - W / 2) < 3
    # flips and factors
    assert abs(float(p.flips.double().mean()) - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    b, c, s = p.factors.double().unbind(1)
    assert float(b.min()) >= 0.6 and float(b.max()) <= 1.4 and abs(float(b.mean()) - 1.0) < 0.01
    assert float(c.min()) >= 0.2 and float(c.max()) <= 0.9 and abs(float(c.mean()) - 0.55) < 0.01
    assert abs(float(b.std()) - 0.8 / math.sqrt(12)) < 0.01
    assert bool((s == 1).all())


# ---------------------------------------------------------------- errors

def test_bad_input_is_refused_clearly() -> None:
    x = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    aug = BatchAugment(8)
    with pytest.raises(TypeError, match=r"dtype torch.int32.*uint8 images \(0..255\) or float images in \[0, 1\]"):
        aug(x.int())
    with pytest.raises(TypeError, match=r"images\[1\] is torch.float32 but images\[0\] is torch.uint8"):
        aug([x[0], x[1].float()])
    with pytest.raises(ValueError, match="empty"):
        aug(x[:0])
    with pytest.raises(ValueError, match="empty"):
        aug([])
    with pytest.raises(ValueError, match="layout must be 'NCHW'.*or 'NHWC'"):
        BatchAugment(8, layout="CHW")
    with pytest.raises(ValueError, match="mean/std have 3 values but the images have 1 channel"):
        BatchAugment(8, mean=MEAN, std=STD)(x[:, :1])
    with pytest.raises(ValueError, match="only 1 or 3 are supported.*layout"):
        aug(x.permute(0, 2, 3, 1))  # NHWC data with the default layout
    with pytest.raises(ValueError, match="pass both mean and std"):
        BatchAugment(8, mean=MEAN)
    for size in (0, (8, 0), (8, 8, 8), 8.0, (8.5, 8), (True, 8), "8", ()):
        with pytest.raises(ValueError, match=r"size must be a positive int .* or a \(height, width\) pair"):
            BatchAugment(size)
        with pytest.raises(ValueError, match=r"size must be a positive int"):
            AF.augment(x, [[0, 0, 4, 4]] * 2, size=size)
    with pytest.raises(ValueError, match="scale must satisfy"):
        BatchAugment(8, scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="brightness must be non-negative"):
        BatchAugment(8, brightness=-0.1)
    boxes = torch.tensor([[0, 0, 20, 20], [5, 5, 16, 10]])
    with pytest.raises(RuntimeError, match=r"boxes\[1\].*does not lie inside image 1 \(20 x 20\).*clip the box"):
        AF.augment(x, boxes, size=8)
    with pytest.raises(RuntimeError, match=r"boxes\[0\].*does not lie inside"):
        AF.augment(x, torch.tensor([[0, 0, 0, 5], [0, 0, 4, 4]]), size=8)
    with pytest.raises(ValueError, match=r"boxes must have shape \(2, 4\)"):
        AF.augment(x, boxes[:1], size=8)
    with pytest.raises(ValueError, match="std has 2 values"):
        AF.augment(x, boxes[:1].expand(2, 4), size=8, std=[1.0, 1.0])
    with pytest.raises(RuntimeError, match="must be finite and non-negative"):
        AF.augment(x, torch.tensor([[0, 0, 4, 4]] * 2), brightness=[1.0, -1.0], size=8)
    with pytest.raises(ValueError, match="out_dtype"):
        AF.augment(x, torch.tensor([[0, 0, 4, 4]] * 2), size=8, out_dtype=torch.float64)
    # the op itself checks what the Python layer would catch
    ops = torch.ops.fusedtrain.augment
    ok = dict(boxes=torch.tensor([[0, 0, 4, 4]] * 2), flips=torch.zeros(2, dtype=torch.bool), factors=torch.ones(2, 3))
    with pytest.raises(RuntimeError, match=r"images\[0\] has dtype Double.*uint8 images \(0..255\) or float32"):
        ops(list(x.double()), *ok.values(), 8, [0.0] * 3, [1.0] * 3, torch.float32)
    with pytest.raises(RuntimeError, match=r"images\[1\] has dtype Float but images\[0\] has Byte"):
        ops([x[0], x[1].float()], *ok.values(), 8, [0.0] * 3, [1.0] * 3, torch.float32)
    with pytest.raises(RuntimeError, match=r"size must be \(height, width\)"):
        ops(list(x), *ok.values(), [8, 8, 8], [0.0] * 3, [1.0] * 3, torch.float32)
    with pytest.raises(RuntimeError, match="mean and std need one value per channel"):
        ops(list(x), *ok.values(), 8, [0.0], [1.0], torch.float32)
    with pytest.raises(RuntimeError, match="images is empty"):
        ops([], ok["boxes"][:0], ok["flips"][:0], ok["factors"][:0], 8, [], [], torch.float32)
    with pytest.raises(RuntimeError, match="2 channels"):
        ops(list(x[:, :2]), *ok.values(), 8, [0.0] * 2, [1.0] * 2, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_boxes_whose_end_overflows_are_refused(device: str) -> None:
    """Issue 13: top + height (or left + width) past int64 used to wrap to a negative sum that passed the
    bounds check, and the crop was read outside the image (heap-buffer-overflow under ASan). Every such
    box is refused, by the functional and by the op, before anything is read."""
    img = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8).to(device)
    big = 2**63 - 1
    for box in ([1, 0, big, 1], [0, 1, 1, big], [big, 0, 1, 1], [0, big, 1, 1], [big, big, big, big],
                [2, 0, big - 1, 1], [-1, 0, 2, 2], [0, -big - 1, 1, 1]):
        with pytest.raises(RuntimeError, match=r"boxes\[0\].*does not lie inside image 0 \(4 x 4\)"):
            AF.augment(img, [box], size=4)
        with pytest.raises(RuntimeError, match="does not lie inside"):
            torch.ops.fusedtrain.augment([img[0]], torch.tensor([box]), torch.zeros(1, dtype=torch.bool),
                                         torch.ones(1, 3), 4, [0.0] * 3, [1.0] * 3, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_boxes_beyond_int32_are_refused_not_narrowed(device: str) -> None:
    """The kernels index crops in int32: a box inside a view whose logical size exceeds that (an expanded,
    stride-0 image costs no memory) used to be narrowed to a negative height or width; now it is refused.
    A box inside the same view that fits is still augmented (a constant image stays constant)."""
    tall = torch.full((1, 1, 1), 200, dtype=torch.uint8).to(device).expand(1, 2**31 + 5, 1)
    wide = torch.full((3, 1, 1), 200, dtype=torch.uint8).to(device).expand(3, 1, 2**31 + 5)
    for images, box in [(tall, [0, 0, 2**31 + 2, 1]), (tall, [2**31, 0, 1, 1]), (tall, [2**31 - 1, 0, 1, 1]),
                        (wide, [0, 0, 1, 2**29 + 1]), (wide, [0, 2**31 - 2, 1, 2])]:
        with pytest.raises(RuntimeError, match=r"boxes\[0\].*too large.*int32"):
            AF.augment([images], [box], size=3)
    for images, box in [(tall, [2**31 - 2, 0, 1, 1]), (wide, [0, 2**31 - 3, 1, 2])]:
        out = AF.augment([images], [box], size=3).cpu()
        torch.testing.assert_close(out, torch.full_like(out, 200 / 255), rtol=0, atol=1e-6)


def test_refused_during_cuda_graph_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-sample parameters are drawn and read on the host, so a captured call would replay the same
    crops forever: while torch reports a capture every augmentation refuses, naming the fix, before it
    draws anything (no generator advanced) or touches the images."""
    x = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    xf = x.float() / 255
    targets = torch.arange(4)
    gen = torch.Generator().manual_seed(5)
    module = BatchAugment(8, generator=gen)
    snapshot = (x.clone(), xf.clone(), torch.get_rng_state(), gen.get_state())
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    calls = [lambda: AF.augment(x, [[0, 0, 8, 8]] * 4, size=8), lambda: module(x), lambda: module(x, seed=1),
             lambda: cutout(xf, 4), lambda: mixup(xf, targets, num_classes=4),
             lambda: cutmix(xf, targets, num_classes=4)]
    for call in calls:
        with pytest.raises(RuntimeError, match="cannot run inside a CUDA graph capture.*outside the captured region"):
            call()
    assert torch.equal(x, snapshot[0]) and torch.equal(xf, snapshot[1])
    assert torch.equal(torch.get_rng_state(), snapshot[2]) and torch.equal(gen.get_state(), snapshot[3])
    monkeypatch.undo()  # outside a capture the same calls run
    for call in calls:
        call()


# ---------------------------------------------------------------- op checks

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen).to(device)
            for h, w in [(20, 30), (17, 9), (40, 40)]]
    boxes = torch.tensor([[0, 0, 20, 30], [2, 1, 10, 7], [5, 6, 30, 21]])
    flips = torch.tensor([True, False, True])
    factors = torch.tensor([[1.2, 0.8, 1.1], [1.0, 1.0, 1.0], [0.7, 1.3, 0.6]])
    op = torch.ops.fusedtrain.augment.default
    torch.library.opcheck(op, (imgs, boxes, flips, factors, 13, MEAN, STD, torch.float32))
    torch.library.opcheck(op, (imgs, boxes, flips, factors, 7, MEAN, STD, torch.bfloat16))
    gray = [im[:1] for im in imgs]
    torch.library.opcheck(op, (gray, boxes, flips, factors, 5, [0.5], [0.25], torch.float16))
    nhwc = [im.permute(1, 2, 0).contiguous().permute(2, 0, 1) for im in imgs]
    torch.library.opcheck(op, (nhwc, boxes, flips, factors, 11, MEAN, STD, torch.float32))
    torch.library.opcheck(op, (imgs, boxes, flips, factors, 6, MEAN, STD, torch.float32, True))
    floats = [im.float() / 255 for im in imgs]
    torch.library.opcheck(op, (floats, boxes, flips, factors, [9, 14], MEAN, STD, torch.float32))
    torch.library.opcheck(op, (floats, boxes, flips, factors, [15, 4], MEAN, STD, torch.bfloat16, True))


@pytest.mark.parametrize("device", DEVICES)
def test_device_matches_cpu(device: str) -> None:
    """Same parameters on the device and on the CPU: equal up to the order of the contrast mean's sum."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randint(0, 256, (150, 3, 47, 61), dtype=torch.uint8, generator=gen)  # > 128: two CUDA launches
    aug = BatchAugment(37, brightness=0.4, contrast=0.4, saturation=0.4, mean=MEAN, std=STD)
    out_cpu, p = aug(x, seed=3, return_params=True)
    out_dev = aug(x.to(device), seed=3)
    assert out_dev.device.type == device
    torch.testing.assert_close(out_dev.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
    nhwc = BatchAugment(37, brightness=0.4, contrast=0.4, saturation=0.4, mean=MEAN, std=STD, layout="NHWC")
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1).contiguous().to(device), seed=3).cpu(), out_cpu,
                               rtol=1e-5, atol=1e-5)
    gray = x[:20, :1].to(device)
    args = (p.boxes[:20], p.flips[:20], p.brightness[:20], p.contrast[:20], p.saturation[:20])
    for dt in (torch.float32, torch.bfloat16):
        torch.testing.assert_close(AF.augment(gray, *args, size=23, out_dtype=dt).cpu(),
                                   AF.augment(gray.cpu(), *args, size=23, out_dtype=dt), rtol=1e-5, atol=1e-5)
    for size in (11, 70):  # antialias: downscaling and upscaling
        for images in (x[:20], gray):
            torch.testing.assert_close(AF.augment(images.to(device), *args, size=size, antialias=True).cpu(),
                                       AF.augment(images, *args, size=size, antialias=True), rtol=1e-5, atol=1e-5)
    # float input and (height, width) outputs, plain and antialiased, RGB and gray, NCHW and NHWC
    xf = x.float() / 255
    rect = BatchAugment((19, 53), brightness=0.4, contrast=0.4, saturation=0.4, mean=MEAN, std=STD)
    torch.testing.assert_close(rect(xf.to(device), seed=5).cpu(), rect(xf, seed=5), rtol=1e-5, atol=1e-5)
    for hw in ((9, 30), (80, 33)):
        for images, layout in ((xf[:20], "NCHW"), (xf[:20, :1], "NCHW"), (xf[:20].permute(0, 2, 3, 1), "NHWC")):
            for antialias in (False, True):
                kw = dict(size=hw, antialias=antialias, layout=layout)
                torch.testing.assert_close(AF.augment(images.to(device), *args, **kw).cpu(),
                                           AF.augment(images, *args, **kw), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- cutout, mixup, cutmix

@pytest.mark.parametrize("device", DEVICES)
def test_cutout(device: str) -> None:
    x = torch.rand(64, 3, 23, 31, device=device) + 0.5  # no zeros
    out, prm = cutout(x, 9, p=0.5, fill=-1.0, generator=torch.Generator().manual_seed(1), return_params=True)
    assert not torch.equal(out, x) and torch.equal(x.min() > 0, torch.tensor(True, device=device))  # input intact
    for i in range(64):
        t, l, h, w = prm.boxes[i].tolist()
        expected = x[i].clone()
        expected[:, t:t + h, l:l + w] = -1.0
        assert torch.equal(out[i], expected)
        assert h <= 9 and w <= 9
        if h and 4 <= t and t + 9 <= 23:  # centre at least size // 2 from the border: the full side
            assert h == 9
    applied = (prm.boxes[:, 2] > 0).double().mean()
    assert 0.25 < float(applied) < 0.75
    assert torch.equal(cutout(x, 9, p=0.0), x)
    torch.testing.assert_close(prm.lam, 1 - (prm.boxes[:, 2] * prm.boxes[:, 3]).float() / (23 * 31))
    full = cutout(x, 100)  # larger than the image: clipped, the whole image is cut
    assert bool((full == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_mixup(device: str) -> None:
    n, k = 40, 7
    x = torch.randn(n, 3, 8, 9, device=device)
    y = torch.randint(0, k, (n,), device=device)
    state = torch.get_rng_state()
    mixed, soft, prm = mixup(x, y, alpha=0.4, num_classes=k, generator=torch.Generator().manual_seed(2),
                             return_params=True)
    assert torch.equal(torch.get_rng_state(), state)  # an explicit generator leaves torch's default alone
    assert sorted(prm.perm.tolist()) == list(range(n))
    lam = prm.lam.to(device)
    torch.testing.assert_close(mixed, lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[prm.perm])
    onehot = torch.nn.functional.one_hot(y, k).float()
    torch.testing.assert_close(soft, lam[:, None] * onehot + (1 - lam[:, None]) * onehot[prm.perm])
    torch.testing.assert_close(soft.sum(1), torch.ones(n, device=device))
    assert bool(((prm.lam >= 0) & (prm.lam <= 1)).all()) and len(set(prm.lam.tolist())) == n  # one λ per sample
    again = mixup(x, y, alpha=0.4, num_classes=k, generator=torch.Generator().manual_seed(2), return_params=True)
    assert torch.equal(again[0], mixed) and torch.equal(again[2].perm, prm.perm)
    # soft targets in, and the law of λ: Beta(1, 1) is uniform (mean 1/2, variance 1/12)
    lam_u = mixup(x, onehot, alpha=1.0, return_params=True)[2].lam
    big = mixup(torch.zeros(20_000, 1), torch.zeros(20_000, 2), alpha=1.0, return_params=True)[2].lam.double()
    assert abs(float(big.mean()) - 0.5) < 0.01 and abs(float(big.var()) - 1 / 12) < 0.005 and lam_u.shape == (n,)
    with pytest.raises(ValueError, match="num_classes"):
        mixup(x, y)
    with pytest.raises(TypeError, match="floating-point"):
        mixup(x.to(torch.uint8), y, num_classes=k)
    with pytest.raises(ValueError, match="alpha must be positive"):
        mixup(x, y, alpha=0.0, num_classes=k)


@pytest.mark.parametrize("device", DEVICES)
def test_cutmix(device: str) -> None:
    n, k, H, W = 50, 5, 19, 26
    x = torch.rand(n, 3, H, W, device=device)
    y = torch.randint(0, k, (n,), device=device)
    mixed, soft, prm = cutmix(x, y, alpha=1.0, num_classes=k, generator=torch.Generator().manual_seed(4),
                              return_params=True)
    for i in range(n):
        t, l, h, w = prm.boxes[i].tolist()
        expected = x[i].clone()
        expected[:, t:t + h, l:l + w] = x[int(prm.perm[i]), :, t:t + h, l:l + w]
        assert torch.equal(mixed[i], expected)
    lam = 1 - (prm.boxes[:, 2] * prm.boxes[:, 3]).double() / (H * W)
    torch.testing.assert_close(prm.lam, lam.float())
    onehot = torch.nn.functional.one_hot(y, k).float()
    lam_d = prm.lam.to(device)[:, None]
    torch.testing.assert_close(soft, lam_d * onehot + (1 - lam_d) * onehot[prm.perm], atol=1e-6, rtol=1e-6)
    assert float((prm.boxes[:, 2] * prm.boxes[:, 3]).float().mean()) > 0  # something was pasted
    u8 = (x * 255).to(torch.uint8)  # pasting works on any dtype
    m8, s8 = cutmix(u8, y, num_classes=k, generator=torch.Generator().manual_seed(4))
    assert m8.dtype == torch.uint8 and s8.dtype == torch.float32


# ---------------------------------------------------------------- test-time augmentation

class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.bn(self.conv(x)).mean((2, 3))))


def test_tta_predict() -> None:
    torch.manual_seed(0)
    net = _Net()
    net.train()
    net.bn.eval()  # a mixed-mode model: must come back exactly so
    x = torch.randn(5, 3, 12, 14)
    p = tta_predict(net, x)
    assert net.training and not net.bn.training and net.drop.training
    net.eval()
    with torch.no_grad():
        manual = (net(x).softmax(1) + net(x.flip(-1)).softmax(1)) / 2
        crop = (net(x).softmax(1) + net(x[..., 1:-1, 1:-1]).softmax(1) + net(x.flip(-1)).softmax(1)) / 3
    net.train()
    net.bn.eval()
    torch.testing.assert_close(p, manual)
    assert not p.requires_grad
    torch.testing.assert_close(p.sum(1), torch.ones(5))
    views = [lambda t: t, lambda t: t[..., 1:-1, 1:-1], lambda t: t.flip(-1)]
    torch.testing.assert_close(tta_predict(net, x, views), crop)
    with torch.no_grad():
        plain = net.eval()(x).softmax(1)
    torch.testing.assert_close(tta_predict(net, x, "none"), plain)
    with pytest.raises(ValueError, match="transforms must be"):
        tta_predict(net, x, "rotate")
    with pytest.raises(ValueError, match="non-empty"):
        tta_predict(net, x, [])

    class Boom(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    boom = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        tta_predict(boom, x)
    assert boom.training


def test_exported_api() -> None:
    assert {"BatchAugment", "cutout", "mixup", "cutmix", "tta_predict", "functional"} <= set(fusedtrain.augment.__all__)
    assert "augment" in fusedtrain.__all__


def test_benchmark_family_rows(tmp_path) -> None:
    """The augment benchmark family runs and reports images/s for every implementation (not a timing test)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "aug.json"
    proc = subprocess.run([sys.executable, "-m", "fusedtrain.bench", "--device", "cpu", "--quick", "--reps", "1",
                           "--family", "augment", "--batch", "3", "--json", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert {"torchvision v2 per-sample loop (antialias=False)", "torchvision v2 whole batch (one parameter set)",
            "fusedtrain BatchAugment (per-sample)", "fusedtrain BatchAugment (per-sample), NHWC input"} <= set(rows)
    for r in rows.values():
        assert r["median_ms"] > 0 and r["extra"]["images_per_s"] > 0 and r["extra"]["batch"] == 3
        assert r["bytes_moved"] == 3 * (3 * 224 * 224 * 4 + 3 * 256 * 256)
    assert rows["fusedtrain BatchAugment (per-sample)"]["vs_best_torch"] > 0
