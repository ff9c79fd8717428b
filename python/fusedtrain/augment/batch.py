"""BatchAugment: per-sample random resized crop, flip, colour jitter and normalize in one fused op."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import functional as F
from .functional import AugmentParams, FactorArg, Images, SizeArg

__all__ = ["BatchAugment"]


class BatchAugment(nn.Module):
    """torchvision's ``RandomResizedCrop(size, scale, ratio, antialias)``, ``RandomHorizontalFlip(hflip)``,
    ``ColorJitter(brightness, contrast, saturation)``, ``ToDtype(float32, scale=True)`` and
    ``Normalize(mean, std)`` with independent parameters per sample, as one op over the whole batch.

    Each sample gets its own crop (torchvision's ``RandomResizedCrop.get_params`` law: area fraction
    U(scale), log aspect ratio U(log ratio), 10 tries, central-crop fallback), flip (probability
    ``hflip``) and jitter factors (uniform in [max(0, 1 - v), 1 + v] as ColorJitter, or a given
    (min, max)). The jitter runs brightness, contrast, saturation in that fixed order (see
    :mod:`fusedtrain.augment.functional`, Note [jitter order and reference]); saturation leaves
    one-channel images unchanged, as torchvision does. The output is::

        out[n] = normalize(saturation(contrast(brightness(flip(resize(crop(img[n])))))))

    computed in float32 with no intermediate rounding, from uint8 images (0..255) or float images in [0, 1]
    (torchvision's two conventions; a float image goes through torchvision's float chain step for step);
    see :func:`fusedtrain.augment.functional.augment` for the formulas.

    Parameters are drawn on the CPU (torch's default CPU generator, which ``torch.manual_seed``
    seeds, or ``generator=`` / ``seed=`` per call), so a seed gives the same augmentation on CPU and
    CUDA. The pixel work runs on the images' device. For the same reason the module refuses to run
    inside a CUDA graph capture (every replay would repeat the captured crops): augment the batch
    outside the captured region and copy it into the graph's static input. Like torchvision's
    transforms the module is random in eval mode too; for a fixed evaluation transform call
    :func:`fusedtrain.augment.functional.augment` with fixed boxes (e.g. a central crop).

    Args:
        size: the output's (height, width), or an int for a square (as torchvision's ``size``).
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height).
        hflip: probability of a horizontal flip.
        brightness, contrast, saturation: jitter strength v (factor range [max(0, 1 - v), 1 + v]) or a
            (min, max) range; 0 disables the step.
        mean, std: per-channel normalization (C values each); None: no normalization (output in [0, 1]).
        out_dtype: torch.float32, torch.float16 or torch.bfloat16.
        layout: ``"NCHW"`` or ``"NHWC"``: how the input holds its channels (batches and list items).
        generator: default CPU generator for the draws (per-call ``generator=`` / ``seed=`` override it).
        antialias: antialiased resize (torchvision's ``antialias=True``, its v2 default); the default False
            is the two-tap bilinear (``antialias=False``), cheaper when crops are downscaled a lot.

    Returns (forward):
        The (N, C, height, width) batch, and with ``return_params=True`` also the :class:`AugmentParams`.
    """

    def __init__(self, size: SizeArg, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, brightness: FactorArg = 0.0,
                 contrast: FactorArg = 0.0, saturation: FactorArg = 0.0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, out_dtype: torch.dtype = torch.float32, layout: str = "NCHW",
                 generator: torch.Generator | None = None, antialias: bool = False) -> None:
        super().__init__()
        hw = F.output_size(size)
        if not (0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must satisfy 0 < min <= max, got {tuple(scale)}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            F.jitter_range(v, name)  # validates
        if out_dtype not in F._OUT_DTYPES:
            raise ValueError(f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
        F._check_layout(layout)
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std (one value per channel) or neither")
        if mean is not None and std is not None and len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} values but std has {len(std)}; pass one value per channel for both")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        #: the output's (height, width), as torchvision's RandomResizedCrop keeps it
        self.size: tuple[int, int] = hw
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        self.out_dtype = out_dtype
        self.layout = layout
        self.generator = generator
        self.antialias = bool(antialias)

    def extra_repr(self) -> str:
        return (f"size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
                f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
                f"mean={self.mean}, std={self.std}, out_dtype={self.out_dtype}, layout={self.layout!r}, "
                f"antialias={self.antialias}")

    def _generator(self, generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
        if seed is not None:
            if generator is not None:
                raise ValueError("pass seed or generator, not both")
            return torch.Generator().manual_seed(int(seed))
        return generator if generator is not None else self.generator

    def sample_params(self, images: Images, *, generator: torch.Generator | None = None,
                      seed: int | None = None) -> AugmentParams:
        """Draws the per-sample parameters for ``images`` without touching the pixels.

        Args:
            images: as for forward (only the sizes are used).
            generator, seed: the random source (default: this module's generator or torch's default).

        Returns:
            :class:`AugmentParams` (CPU tensors).
        """
        views = F.as_image_list(images, self.layout)
        heights = [int(v.shape[1]) for v in views]
        widths = [int(v.shape[2]) for v in views]
        return F.sample_params(heights, widths, scale=self.scale, ratio=self.ratio, hflip=self.hflip,
                               brightness=self.brightness, contrast=self.contrast, saturation=self.saturation,
                               generator=self._generator(generator, seed))

    def forward(self, images: Images, *, generator: torch.Generator | None = None, seed: int | None = None,
                return_params: bool = False) -> Tensor | tuple[Tensor, AugmentParams]:
        """Augments the batch with fresh per-sample parameters.

        Args:
            images: (N, C, H, W) / (N, H, W, C) batch or a sequence of images of any sizes, uint8 (0..255) or
                float (0..1).
            generator: CPU generator for this call's draws.
            seed: seed of a fresh generator for this call (reproducible output).
            return_params: also return the parameters that were drawn.

        Returns:
            The (N, C, height, width) output, or (output, params).

        Raises:
            RuntimeError: during CUDA graph capture, before anything is drawn (the parameters are drawn and
                read on the host: every replay would repeat them); augment outside the captured region.
        """
        F._refuse_capture("BatchAugment")
        views = F.as_image_list(images, self.layout)
        channels = int(views[0].shape[0])
        if self.mean is not None and len(self.mean) != channels:
            raise ValueError(f"mean/std have {len(self.mean)} values but the images have {channels} channel(s); "
                             "pass one value per channel")
        params = F.sample_params([int(v.shape[1]) for v in views], [int(v.shape[2]) for v in views],
                                 scale=self.scale, ratio=self.ratio, hflip=self.hflip, brightness=self.brightness,
                                 contrast=self.contrast, saturation=self.saturation,
                                 generator=self._generator(generator, seed))
        out = F.augment(views, params.boxes, params.flips, params.brightness, params.contrast, params.saturation,
                        size=self.size, mean=self.mean, std=self.std, out_dtype=self.out_dtype,
                        antialias=self.antialias)
        return (out, params) if return_params else out
