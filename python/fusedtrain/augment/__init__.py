"""Data augmentation: per-sample random resized crop, flip, colour jitter and normalization of a whole
uint8 or float batch in one fused op (CPU and CUDA), cutout, mixup, cutmix and test-time augmentation.

- :class:`BatchAugment` — torchvision's RandomResizedCrop + RandomHorizontalFlip + ColorJitter(b, c, s) +
  ToDtype + Normalize with independent parameters per sample, one op for the batch.
- :mod:`fusedtrain.augment.functional` — the same with explicit parameters (:func:`functional.augment`)
  and the samplers of the parameters.
- :func:`cutout`, :func:`mixup`, :func:`cutmix` — batch-level regularizers with per-sample draws.
- :func:`tta_predict` — averaged softmax over augmented views.
"""

from . import functional
from .batch import BatchAugment
from .functional import AugmentParams
from .mix import MixParams, cutmix, cutout, mixup
from .tta import hflip, tta_predict

__all__ = ["BatchAugment", "AugmentParams", "functional", "cutout", "mixup", "cutmix", "MixParams", "tta_predict",
           "hflip"]
