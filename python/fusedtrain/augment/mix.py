"""Cutout, mixup and cutmix on a batch, with per-sample random parameters (plain torch ops, any device).

Each draw happens on the CPU (torch's default CPU generator, or ``generator=``), so a seed gives the same
boxes, λ and partners on every device; the pixel work runs where the images are. For the same reason these
refuse to run inside a CUDA graph capture (a replay would repeat the captured draws): run them outside the
captured region.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnF
from torch import Tensor

from .functional import _refuse_capture

__all__ = ["MixParams", "cutout", "mixup", "cutmix"]


@dataclass(frozen=True)
class MixParams:
    """What a cutout / mixup / cutmix call drew (CPU tensors).

    Attributes:
        lam: float32 (N,): weight of each sample's own image in its targets (mixup: the Beta draw; cutmix:
            1 - pasted area / image area; cutout: 1 - cut area / image area, informational).
        perm: int64 (N,): partner of each sample (mixup, cutmix), or None (cutout).
        boxes: int64 (N, 4): (top, left, height, width) of the cut / pasted box after clipping, height or
            width 0 where nothing was cut; None for mixup.
    """

    lam: Tensor
    perm: Tensor | None
    boxes: Tensor | None


def _check_batch(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"{name} must be a (N, C, H, W) tensor, got {type(images).__name__} "
                         f"{tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch; there is nothing to mix")


def _beta(alpha: float, n: int, generator: torch.Generator | None) -> Tensor:
    """n draws of Beta(alpha, alpha) in float64 from a CPU generator."""
    if not alpha > 0:
        raise ValueError(f"alpha must be positive (λ ~ Beta(alpha, alpha)), got {alpha}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    dist = torch.distributions.Beta(torch.tensor(float(alpha), dtype=torch.float64),
                                    torch.tensor(float(alpha), dtype=torch.float64))
    if generator is None:
        return dist.sample((n,))
    # torch's gamma sampler has no generator argument: run it on the default CPU generator, seeded from
    # `generator`, and put the default generator's state back afterwards.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return dist.sample((n,))


def _boxes(n: int, height: int, width: int, box_h: Tensor, box_w: Tensor, generator: torch.Generator | None) -> Tensor:
    """Boxes of (box_h, box_w) centred uniformly on a pixel, clipped to the image: (top, left, h, w)."""
    cy = torch.randint(0, height, (n,), generator=generator)
    cx = torch.randint(0, width, (n,), generator=generator)
    y0 = cy - torch.div(box_h, 2, rounding_mode="floor")
    x0 = cx - torch.div(box_w, 2, rounding_mode="floor")
    top, left = y0.clamp(0, height), x0.clamp(0, width)
    bottom, right = (y0 + box_h).clamp(0, height), (x0 + box_w).clamp(0, width)
    return torch.stack([top, left, bottom - top, right - left], 1).to(torch.int64)


def _box_mask(boxes: Tensor, height: int, width: int, device: torch.device) -> Tensor:
    """(N, 1, H, W) bool mask of the boxes."""
    b = boxes.to(device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= b[:, :1]) & (rows < b[:, :1] + b[:, 2:3])
    in_cols = (cols >= b[:, 1:2]) & (cols < b[:, 1:2] + b[:, 3:4])
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def cutout(images: Tensor, size: int, p: float = 1.0, fill: float = 0.0, *, generator: torch.Generator | None = None,
           return_params: bool = False) -> Tensor | tuple[Tensor, MixParams]:
    """Cutout (DeVries & Taylor 2017): with probability p, one size x size square per sample set to ``fill``.

    The square's centre is a pixel drawn uniformly over the image; the square is clipped at the border
    (so near an edge less than size^2 pixels are cut). Rows [cy - size // 2, cy - size // 2 + size) and
    likewise for columns: exactly ``size`` wide away from the border (the reference code cuts
    2 * (size // 2), one less for odd sizes).

    Args:
        images: (N, C, H, W) batch, any dtype and device.
        size: side of the square (>= 0; larger than the image is clipped).
        p: probability that a sample gets a square.
        fill: value written into the square.
        generator: CPU generator for the draws.
        return_params: also return the boxes (as :class:`MixParams`).

    Returns:
        A new tensor (the input is not modified), and with ``return_params`` the :class:`MixParams`
        (``boxes`` with zero height for samples left intact).
    """
    _refuse_capture("fusedtrain.augment.cutout", "boxes")
    _check_batch(images)
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative int (side of the square), got {size!r}")
    if not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    n, _, height, width = images.shape
    apply = torch.rand(n, generator=generator) < p
    side = torch.full((n,), size, dtype=torch.int64)
    boxes = _boxes(n, height, width, side, side, generator)
    boxes[~apply, 2:] = 0
    out = images.masked_fill(_box_mask(boxes, height, width, images.device), fill)
    if not return_params:
        return out
    lam = 1 - (boxes[:, 2] * boxes[:, 3]).to(torch.float64) / (height * width)
    return out, MixParams(lam.to(torch.float32), None, boxes)


def _soft_targets(targets: Tensor, n: int, num_classes: int | None, dtype: torch.dtype) -> Tensor:
    if targets.shape[0] != n:
        raise ValueError(f"targets has {targets.shape[0]} rows but images has {n} samples")
    if targets.dtype.is_floating_point:
        if targets.dim() != 2:
            raise ValueError(f"float targets must be (N, classes) probabilities, got shape {tuple(targets.shape)}")
        if num_classes is not None and targets.shape[1] != num_classes:
            raise ValueError(f"targets has {targets.shape[1]} classes but num_classes is {num_classes}")
        return targets.to(dtype)
    if targets.dim() != 1:
        raise ValueError(f"integer targets must be (N,) class indices, got shape {tuple(targets.shape)}")
    if num_classes is None:
        raise ValueError("num_classes is needed to turn class indices into soft targets; pass num_classes=K")
    return nnF.one_hot(targets.long(), num_classes).to(dtype)


def _mix_targets(y: Tensor, lam: Tensor, perm: Tensor) -> Tensor:
    w = lam.to(y.device, y.dtype)[:, None]
    return w * y + (1 - w) * y[perm.to(y.device)]


def mixup(images: Tensor, targets: Tensor, alpha: float = 1.0, num_classes: int | None = None, *,
          generator: torch.Generator | None = None,
          return_params: bool = False) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, MixParams]:
    """mixup (Zhang et al. 2018) with one λ per sample.

    For each sample i, λ_i ~ Beta(alpha, alpha) and a partner j = perm[i] (a random permutation of the
    batch)::

        x_i' = λ_i x_i + (1 - λ_i) x_j        y_i' = λ_i y_i + (1 - λ_i) y_j

    Args:
        images: (N, ...) floating-point batch, any device.
        targets: (N,) class indices (then ``num_classes`` is required) or (N, K) probabilities.
        alpha: Beta parameter (> 0; 1 gives λ uniform, small values keep images nearly intact).
        num_classes: K, for class-index targets.
        generator: CPU generator for λ and the permutation.
        return_params: also return λ and the permutation.

    Returns:
        (mixed images, soft targets (N, K) in the images' dtype) and, with ``return_params``, the
        :class:`MixParams`.
    """
    _refuse_capture("fusedtrain.augment.mixup", "mixing weights and partners")
    if not isinstance(images, Tensor) or images.dim() < 1 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty (N, ...) batch")
    if not images.dtype.is_floating_point:
        raise TypeError(f"mixup blends pixel values and needs floating-point images, got {images.dtype}; "
                        "convert first (e.g. images.float() / 255)")
    n = images.shape[0]
    y = _soft_targets(targets, n, num_classes, images.dtype)
    lam = _beta(alpha, n, generator)
    perm = torch.randperm(n, generator=generator)
    w = lam.to(images.device, images.dtype).reshape((n,) + (1,) * (images.dim() - 1))
    mixed = w * images + (1 - w) * images[perm.to(images.device)]
    soft = _mix_targets(y, lam, perm)
    if return_params:
        return mixed, soft, MixParams(lam.to(torch.float32), perm, None)
    return mixed, soft


def cutmix(images: Tensor, targets: Tensor, alpha: float = 1.0, num_classes: int | None = None, *,
           generator: torch.Generator | None = None,
           return_params: bool = False) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, MixParams]:
    """CutMix (Yun et al. 2019) with one λ and one box per sample.

    For each sample i: λ ~ Beta(alpha, alpha), a box of side (floor(H sqrt(1 - λ)), floor(W sqrt(1 - λ)))
    centred on a uniform pixel and clipped at the border, and a partner j = perm[i]; the box of x_i is
    replaced by the same box of x_j. λ is then corrected to the area actually pasted,
    λ_i = 1 - box area / (H W), and the targets are y_i' = λ_i y_i + (1 - λ_i) y_j.

    Args:
        images: (N, C, H, W) batch, any dtype and device.
        targets: (N,) class indices (then ``num_classes`` is required) or (N, K) probabilities.
        alpha: Beta parameter (> 0).
        num_classes: K, for class-index targets.
        generator: CPU generator for λ, the boxes and the permutation.
        return_params: also return the corrected λ, the permutation and the boxes.

    Returns:
        (mixed images, soft targets (N, K)) and, with ``return_params``, the :class:`MixParams`. Soft targets
        are in the images' dtype when that is floating point, else float32.
    """
    _refuse_capture("fusedtrain.augment.cutmix", "mixing weights, boxes and partners")
    _check_batch(images)
    n, _, height, width = images.shape
    y = _soft_targets(targets, n, num_classes, images.dtype if images.dtype.is_floating_point else torch.float32)
    lam = _beta(alpha, n, generator)
    perm = torch.randperm(n, generator=generator)
    cut = torch.sqrt(1 - lam)
    box_h = torch.floor(height * cut).to(torch.int64)
    box_w = torch.floor(width * cut).to(torch.int64)
    boxes = _boxes(n, height, width, box_h, box_w, generator)
    mask = _box_mask(boxes, height, width, images.device)
    mixed = torch.where(mask, images[perm.to(images.device)], images)
    lam = 1 - (boxes[:, 2] * boxes[:, 3]).to(torch.float64) / (height * width)
    soft = _mix_targets(y, lam, perm)
    if return_params:
        return mixed, soft, MixParams(lam.to(torch.float32), perm, boxes)
    return mixed, soft
