"""fusedtrain: fused, fast, drop-in parts of a PyTorch training loop.

``fusedtrain.optim`` holds drop-in replacements for torch.optim's SGD, Adagrad, RMSprop, Adam and AdamW
that run one fused multi-tensor kernel per (device, dtype) group on CPU and CUDA; ``fusedtrain.ensemble``
holds snapshot ensembles, prediction ensembles and EMA / SWA weight averaging; ``fusedtrain.nn`` holds
mask-free dropout layers (Dropout, Dropout2d, DropPath, DropConnect, fused bias-dropout-add, MC dropout),
``fusedtrain.regularization`` the fused L1/L2 penalty, and ``fusedtrain.augment`` per-sample data
augmentation of a whole batch in one op, cutout, mixup, cutmix and test-time augmentation.
"""

from ._build import build_info, has_cuda_kernels
from . import augment, ensemble, optim, transfer
from . import nn, regularization
from .clip import clip_grad_norm_, get_total_norm

__version__ = "0.1.0"

__all__ = ["build_info", "has_cuda_kernels", "optim", "ensemble", "transfer", "augment", "nn", "regularization",
           "clip_grad_norm_", "get_total_norm", "__version__"]
