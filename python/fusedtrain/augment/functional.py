"""Functional form of the fused augmentation: explicit per-sample parameters in, pixels out.

The random draw (:func:`sample_params`, or its parts :func:`sample_crop_boxes`, :func:`sample_flips`,
:func:`sample_jitter_factors`) and the pixel work (:func:`augment`) are separate, so either can be tested
or replaced on its own. :class:`fusedtrain.augment.BatchAugment` is the two put together.

Note [jitter order and reference]:
The colour jitter runs brightness, then contrast, then saturation, always in that order (torchvision's
``ColorJitter`` draws a random order per call). A fixed order keeps the parameters three numbers per
sample, and puts the only step that needs a statistic of the whole image (contrast's mean gray level)
right after the only step before it (brightness), so one cheap reduction pass suffices and saturation
stays a per-pixel blend.

Inputs are uint8 images (0..255) or float32 images in [0, 1], torchvision's two conventions. A float
image runs torchvision's float chain step for step (clamps at 1, ``(v - mean) / std``). A uint8 image runs
the same chain on values in [0, 255] with no rounding between steps, which equals torchvision's v2
functional chain applied to the image converted to float first (``to_dtype(img,
torch.float32, scale=True)`` then ``resized_crop``, ``horizontal_flip``, ``adjust_brightness``,
``adjust_contrast``, ``adjust_saturation``, ``normalize``) up to float rounding: at most 0.005 / 255
observed on 256-pixel images, mostly from the source coordinate scale * (x + 0.5) - 0.5, which torch's
CPU kernel evidently computes with an FMA (emulating that reproduces its weights) and we do not, so the
bilinear weights differ by an ulp. That is the reference we hold to. torchvision's chain on a
uint8 tensor instead returns to uint8 after every step: its native uint8 resize lands up to one level
from the exact bilinear value, the blends truncate toward zero and the grayscale is floored, so it
drifts about half a level downward per step and differs from the float chain by a few levels (bounded
step by step in tests/test_augment.py, `_uint8_chain_bound`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from .. import _ops
from .._capture import stream_capturing

__all__ = ["AugmentParams", "augment", "sample_params", "sample_crop_boxes", "sample_flips",
           "sample_jitter_factors", "jitter_range", "as_image_list", "output_size"]

Images = Union[Tensor, Sequence[Tensor]]
FactorArg = Union[float, tuple[float, float], Sequence[float]]
SizeArg = Union[int, Sequence[int]]
# The input dtypes the op reads: uint8 in 0..255 and float32 in [0, 1] (other float dtypes are converted).
_IN_DTYPES = (torch.uint8, torch.float32)
_LAYOUTS = ("NCHW", "NHWC")
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample parameters of one augmentation call (all CPU tensors).

    Attributes:
        boxes: int64 (N, 4): crop (top, left, height, width) inside each image.
        flips: bool (N,): horizontal flip after the resize.
        factors: float32 (N, 3): brightness, contrast, saturation factors (1 = unchanged).
    """

    boxes: Tensor
    flips: Tensor
    factors: Tensor

    @property
    def brightness(self) -> Tensor:
        return self.factors[:, 0]

    @property
    def contrast(self) -> Tensor:
        return self.factors[:, 1]

    @property
    def saturation(self) -> Tensor:
        return self.factors[:, 2]

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def _refuse_capture(what: str, params: str = "crop boxes, flips and jitter factors") -> None:
    """Refuses a call made during CUDA graph capture, before it draws or changes anything.

    The per-sample parameters of the augmentations are drawn and read on the host by design (so a seed
    gives the same result on every device); a captured graph would replay the values of the capture on
    every replay, the same crops for every batch.

    Args:
        what: the refused function, for the message.
        params: what it draws on the host, for the message.

    Raises:
        RuntimeError: while CUDA graph capture is underway on the current stream.
    """
    if stream_capturing():
        raise RuntimeError(f"{what} cannot run inside a CUDA graph capture: its per-sample {params} are drawn and "
                           "read on the host, so every replay of the graph would repeat the captured ones. Run the "
                           "augmentation outside the captured region: augment the batch first, then copy it into "
                           "the graph's static input")


def _check_layout(layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'NCHW' (images as (C, H, W)) or 'NHWC' (images as (H, W, C)), "
                         f"got {layout!r}")


def output_size(size: SizeArg) -> tuple[int, int]:
    """The output's (height, width) from ``size`` as torchvision's ``RandomResizedCrop`` takes it: an int is a
    square, a sequence (h, w) a rectangle, a sequence of one value a square.

    Raises:
        ValueError: anything else, or a side < 1.
    """
    if isinstance(size, Tensor):
        size = size.tolist()
    sides = list(size) if isinstance(size, Sequence) and not isinstance(size, str) else [size]
    try:  # operator.index: ints and integer scalars (numpy, 0-dim tensors), never floats or bools
        values = [operator.index(v) for v in sides if not isinstance(v, bool)]
    except TypeError:
        values = []
    if len(values) != len(sides) or len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"size must be a positive int (a square output) or a (height, width) pair of positive ints, "
                         f"got {size!r}")
    return (values[0], values[-1])


def as_image_list(images: Images, layout: str = "NCHW") -> list[Tensor]:
    """The images as a list of (C, H, W) views (no copy for uint8 and float32), checked.

    Args:
        images: a batch (N, C, H, W) or (N, H, W, C) as ``layout`` says, or a sequence of images (C, H, W) or
            (H, W, C), sizes may differ; uint8 (0..255) or float in [0, 1] (torchvision's conventions). Float
            dtypes other than float32 are converted to float32 (a copy).
        layout: ``"NCHW"`` or ``"NHWC"``.

    Returns:
        A list of N tensors of shape (C, H, W), all uint8 or all float32.
    """
    _check_layout(layout)
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a 4-D batch ({'N, C, H, W' if layout == 'NCHW' else 'N, H, W, C'}) "
                             f"or a list of 3-D images, got a tensor of shape {tuple(images.shape)}")
        batch = images if layout == "NCHW" else images.permute(0, 3, 1, 2)
        views = list(batch.unbind(0))
    else:
        views = []
        for i, im in enumerate(images):
            if not isinstance(im, Tensor) or im.dim() != 3:
                raise ValueError(f"images[{i}] must be a 3-D tensor ({'C, H, W' if layout == 'NCHW' else 'H, W, C'}), "
                                 f"got {type(im).__name__} {tuple(getattr(im, 'shape', ()))}")
            views.append(im if layout == "NCHW" else im.permute(2, 0, 1))
    if len(views) == 0:
        raise ValueError("images is empty: an empty batch has nothing to augment; skip the call")
    for i, im in enumerate(views):
        if im.dtype not in _IN_DTYPES and not im.dtype.is_floating_point:
            raise TypeError(f"images[{i}] has dtype {im.dtype}; the fused augmentation reads uint8 images (0..255) "
                            "or float images in [0, 1] (torchvision's conventions)")
        if im.dtype.is_floating_point and im.dtype != torch.float32:
            views[i] = im = im.float()
        if im.dtype != views[0].dtype:
            raise TypeError(f"images[{i}] is {im.dtype} but images[0] is {views[0].dtype}; pass all images as uint8 "
                            "or all as float")
        if im.shape[0] not in (1, 3):
            looks_nhwc = layout == "NCHW" and im.shape[-1] in (1, 3)
            hint = " (is layout right? got NCHW but the data looks NHWC)" if looks_nhwc else ""
            raise ValueError(f"images[{i}] has {im.shape[0]} channels; only 1 or 3 are supported{hint}")
    return views


def _per_sample(value: Tensor | Sequence[float] | Sequence[bool] | None, n: int, name: str, dtype: torch.dtype,
                default: float | bool) -> Tensor:
    if value is None:
        return torch.full((n,), default, dtype=dtype)
    t = torch.as_tensor(value).detach().to("cpu", dtype)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name} must have one value per image ({n}), got shape {tuple(t.shape)}")
    return t.contiguous()


def _mean_std(mean: Sequence[float] | None, std: Sequence[float] | None,
              channels: int) -> tuple[list[float], list[float]]:
    m = [0.0] * channels if mean is None else [float(v) for v in mean]
    s = [1.0] * channels if std is None else [float(v) for v in std]
    for name, v in (("mean", m), ("std", s)):
        if len(v) != channels:
            raise ValueError(f"{name} has {len(v)} values but the images have {channels} channel(s); pass one value "
                             f"per channel (e.g. {name}={[round(x, 3) for x in (v * channels)[:channels]]})")
    if any(x == 0 for x in s):
        raise ValueError(f"std must be non-zero, got {s}")
    return m, s


def augment(images: Images, boxes: Tensor | Sequence[Sequence[int]], flips: Tensor | Sequence[bool] | None = None,
            brightness: Tensor | Sequence[float] | None = None, contrast: Tensor | Sequence[float] | None = None,
            saturation: Tensor | Sequence[float] | None = None, *, size: SizeArg, mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None, out_dtype: torch.dtype = torch.float32,
            layout: str = "NCHW", antialias: bool = False) -> Tensor:
    """Resized crop, horizontal flip, colour jitter and normalization of a batch in one pass.

    For sample n with box (t, l, h, w), flip f and factors (b, c, s), every output pixel is (Note
    [augment pipeline] in csrc/include/fusedtrain/augment.h, Note [jitter order and reference] above)::

        v = bilinear(img[:, t:t+h, l:l+w] -> out_h x out_w, align_corners=False, antialias)  # in [0, M]
        v = flip(v) if f
        v = clamp(b * v, 0, M)
        v = clamp(c * v + (1 - c) * mean(gray(v)), 0, M)         # mean over the sample's output
        v = clamp(s * v + (1 - s) * gray(v), 0, M)               # 3 channels; 1 channel: unchanged
        out = (v / M - mean[k]) / std[k]

    with gray = 0.2989 R + 0.587 G + 0.114 B and M = 255 for uint8 images, 1 for float images (whose values
    outside [0, 1] the brightness step clamps, even at factor 1). This equals
    torchvision.transforms.v2.functional's ``resized_crop(antialias=antialias)``, ``horizontal_flip``,
    ``adjust_brightness``, ``adjust_contrast``, ``adjust_saturation``, ``normalize`` on the image as float
    in [0, 1], up to float rounding.

    Args:
        images: batch (N, C, H, W) / (N, H, W, C) or a sequence of images of any sizes, on CPU or CUDA; C is
            1 or 3; uint8 (0..255) or float (0..1; float32 is read in place, other float dtypes converted).
        boxes: (N, 4) integers (top, left, height, width), each box inside its image.
        flips: (N,) booleans, or None for no flips.
        brightness, contrast, saturation: (N,) non-negative factors, or None for 1 (unchanged).
        size: the output's (height, width), or one int for a square (torchvision's ``size``).
        mean, std: C values each, or None (0 and 1: output in [0, 1]).
        out_dtype: torch.float32, torch.float16 or torch.bfloat16 (computed in float32 either way).
        layout: ``"NCHW"`` or ``"NHWC"``: how ``images`` hold their channels.
        antialias: resize as torchvision's ``resized_crop(..., antialias=True)`` (a triangle filter as wide as
            the downscaling factor, so every source pixel counts; costlier for large downscaling factors)
            instead of the two-tap bilinear.

    Returns:
        A new contiguous (N, C, height, width) tensor of ``out_dtype`` on the images' device.

    Raises:
        RuntimeError: during CUDA graph capture (the parameters are host data: every replay would repeat
            them); run it outside the captured region.
    """
    _refuse_capture("fusedtrain.augment")
    views = as_image_list(images, layout)
    n = len(views)
    hw = output_size(size)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
    b = torch.as_tensor(boxes).detach().to("cpu", torch.int64)
    if b.shape != (n, 4):
        raise ValueError(f"boxes must have shape ({n}, 4) = (top, left, height, width) per image, got {tuple(b.shape)}")
    f = _per_sample(flips, n, "flips", torch.bool, False)
    factors = torch.stack([_per_sample(v, n, name, torch.float32, 1.0) for v, name in
                           ((brightness, "brightness"), (contrast, "contrast"), (saturation, "saturation"))], 1)
    m, s = _mean_std(mean, std, int(views[0].shape[0]))
    return _ops.augment(views, b, f, factors.contiguous(), size=hw, mean=m, std=s, out_dtype=out_dtype,
                        antialias=bool(antialias))


def jitter_range(value: FactorArg, name: str) -> tuple[float, float]:
    """ColorJitter's factor range: a number v >= 0 gives [max(0, 1 - v), 1 + v]; a pair is (min, max).

    Args:
        value: v or (min, max) with 0 <= min <= max.
        name: the argument's name, for the error message.

    Returns:
        (min, max) of the uniform factor.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must be non-negative (factor range [max(0, 1 - {name}), 1 + {name}]), "
                             f"got {value}")
        return max(0.0, 1.0 - float(value)), 1.0 + float(value)
    lo, hi = (float(v) for v in value)
    if not 0 <= lo <= hi:
        raise ValueError(f"{name} as a range must satisfy 0 <= min <= max, got ({lo}, {hi})")
    return lo, hi


def sample_crop_boxes(heights: Tensor | Sequence[int], widths: Tensor | Sequence[int],
                      scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3), *,
                      generator: torch.Generator | None = None, attempts: int = 10) -> Tensor:
    """torchvision's ``RandomResizedCrop.get_params``, vectorized over the batch.

    Per sample: up to ``attempts`` tries of area = H W U(scale), log aspect = U(log ratio), crop
    w = round(sqrt(area aspect)), h = round(sqrt(area / aspect)); the first try with 0 < w <= W and
    0 < h <= H wins and is placed uniformly (top in [0, H - h], left in [0, W - w]); if none fits, the
    central crop clipped to the ratio range. All tries are drawn at once (2 x attempts uniforms per
    sample, then 2 for the position), so the random stream differs from torchvision's, not the law.

    Args:
        heights, widths: (N,) image sizes.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio width / height.
        generator: a CPU generator (default: torch's default CPU generator).
        attempts: tries before the fallback (torchvision: 10).

    Returns:
        int64 (N, 4): (top, left, height, width).
    """
    if not (0 < scale[0] <= scale[1]):
        raise ValueError(f"scale must satisfy 0 < min <= max, got {tuple(scale)}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
    H = torch.as_tensor(heights, dtype=torch.float64).reshape(-1)
    W = torch.as_tensor(widths, dtype=torch.float64).reshape(-1)
    n = H.shape[0]
    u = torch.rand((n, attempts, 2), generator=generator, dtype=torch.float64)
    pos = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    area = (H * W)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    ok = (cw > 0) & (cw <= W[:, None]) & (ch > 0) & (ch <= H[:, None])
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits (argmax returns the first)
    found = ok.any(1)
    cw = cw.gather(1, first).squeeze(1)
    ch = ch.gather(1, first).squeeze(1)
    top = torch.minimum(torch.floor(pos[:, 0] * (H - ch + 1)), H - ch)
    left = torch.minimum(torch.floor(pos[:, 1] * (W - cw + 1)), W - cw)
    # Fallback: the central crop, clipped to the ratio range.
    in_ratio = W / H
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, torch.round(H * max(ratio)), W)
    fh = torch.where(narrow, torch.round(W / min(ratio)), H)
    ftop = torch.div(H - fh, 2, rounding_mode="floor")
    fleft = torch.div(W - fw, 2, rounding_mode="floor")
    out = torch.stack([torch.where(found, top, ftop), torch.where(found, left, fleft),
                       torch.where(found, ch, fh), torch.where(found, cw, fw)], 1)
    return out.to(torch.int64)


def sample_flips(n: int, p: float = 0.5, *, generator: torch.Generator | None = None) -> Tensor:
    """(n,) booleans, each True with probability p (RandomHorizontalFlip)."""
    if not 0 <= p <= 1:
        raise ValueError(f"hflip must be a probability in [0, 1], got {p}")
    return torch.rand(n, generator=generator) < p


def sample_jitter_factors(n: int, brightness: FactorArg = 0.0, contrast: FactorArg = 0.0, saturation: FactorArg = 0.0,
                          *, generator: torch.Generator | None = None) -> Tensor:
    """float32 (n, 3) factors uniform in each :func:`jitter_range` (a range (1, 1) gives exactly 1)."""
    ranges = torch.tensor([jitter_range(brightness, "brightness"), jitter_range(contrast, "contrast"),
                           jitter_range(saturation, "saturation")], dtype=torch.float64)
    u = torch.rand((n, 3), generator=generator, dtype=torch.float64)
    return (ranges[:, 0] + (ranges[:, 1] - ranges[:, 0]) * u).to(torch.float32)


def sample_params(heights: Tensor | Sequence[int], widths: Tensor | Sequence[int], *,
                  scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                  hflip: float = 0.5, brightness: FactorArg = 0.0, contrast: FactorArg = 0.0,
                  saturation: FactorArg = 0.0, generator: torch.Generator | None = None) -> AugmentParams:
    """Independent parameters for every sample: crop boxes, then flips, then jitter factors (in that order
    from ``generator``, so a seeded generator reproduces them).

    Args:
        heights, widths: (N,) image sizes.
        scale, ratio: see :func:`sample_crop_boxes`.
        hflip: flip probability.
        brightness, contrast, saturation: see :func:`jitter_range` (0: factor 1).
        generator: a CPU generator (default: torch's default CPU generator).

    Returns:
        :class:`AugmentParams` with CPU tensors.
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (parameters are drawn on the CPU and read "
                         f"by the op's host code), got one on {generator.device}")
    boxes = sample_crop_boxes(heights, widths, scale, ratio, generator=generator)
    n = boxes.shape[0]
    flips = sample_flips(n, hflip, generator=generator)
    factors = sample_jitter_factors(n, brightness, contrast, saturation, generator=generator)
    return AugmentParams(boxes, flips, factors)
