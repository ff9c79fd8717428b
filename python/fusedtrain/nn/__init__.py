"""Regularization layers with mask-free, fused kernels.

``Dropout`` and ``Dropout2d`` are drop-ins for torch's (and subclasses of them), ``DropPath`` for timm's
stochastic depth, ``DropConnect`` masks a wrapped layer's weights; ``functional`` holds ``dropout``,
``dropout2d``, ``drop_path`` and the fused ``bias_dropout_add``; ``mc_dropout_predict`` runs Monte Carlo
dropout. The masks come from counter-based Philox keyed by a seed drawn from torch's CPU generator, so
``torch.manual_seed`` governs them, the same seed gives the same mask on CPU and CUDA, and the backward pass
recomputes the mask instead of storing it.

``CrossEntropyLoss`` (and ``functional.cross_entropy``) is a fused softmax cross-entropy with label smoothing:
the loss and the gradient of the logits in one pass, the backward pass a scale.
"""

from . import functional
from .mc import is_dropout_module, mc_dropout_predict
from .modules import CrossEntropyLoss, DropConnect, Dropout, Dropout2d, DropPath

__all__ = ["Dropout", "Dropout2d", "DropPath", "DropConnect", "CrossEntropyLoss", "mc_dropout_predict",
           "is_dropout_module", "functional"]
