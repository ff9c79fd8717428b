"""Dropout-family modules: drop-in replacements for torch.nn.Dropout / Dropout2d, timm's DropPath, and a
DropConnect wrapper, all running fusedtrain's mask-free kernels (see :mod:`fusedtrain.nn.functional`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as F

__all__ = ["Dropout", "Dropout2d", "DropPath", "DropConnect", "CrossEntropyLoss"]


class Dropout(nn.Dropout):
    r"""Inverted dropout, a drop-in for :class:`torch.nn.Dropout` (and an instance of it).

    During training each element is zeroed with probability ``p`` and the others are scaled by
    ``1 / (1 - p)``; in eval mode the module is the identity. The mask comes from counter-based Philox
    and is not stored: the backward pass recomputes it (0 bytes per element kept for backward, against
    torch's 1 on CUDA and 4 in float32 on the CPU). Seeds follow ``torch.manual_seed``
    (:mod:`fusedtrain.nn.functional`, Note [seeds]).

    Args:
        p: probability of an element to be zeroed. Default: 0.5
        inplace: do the operation in place. Default: False
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)


class Dropout2d(nn.Dropout2d):
    r"""Channel dropout, a drop-in for :class:`torch.nn.Dropout2d` (and an instance of it).

    One keep decision per ``(n, c)`` for an ``(N, C, H, W)`` input, broadcast over ``H, W``; a 3-D input is
    read as ``(N, C, L)`` exactly as torch does (with its warning). See
    :func:`fusedtrain.nn.functional.dropout2d`.

    Args:
        p: probability of a channel to be zeroed. Default: 0.5
        inplace: do the operation in place. Default: False
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout2d(input, self.p, self.training, self.inplace)


class DropPath(nn.Module):
    r"""Stochastic depth per sample (Huang et al. 2016), a drop-in for ``timm.layers.DropPath``.

    In training, each sample of the batch (index along dimension 0) is zeroed with probability
    ``drop_prob`` and kept ones are scaled by ``1 / (1 - drop_prob)`` (if ``scale_by_keep``); put it on
    the residual branch: ``x + drop_path(block(x))``. Identity in eval mode.

    Args:
        drop_prob: probability of a sample's path to be dropped, in [0, 1]. Default: 0
        scale_by_keep: scale kept samples by ``1 / (1 - drop_prob)``. Default: True
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = F._check_p(drop_prob, "drop_prob")
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return F.drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class DropConnect(nn.Module):
    r"""DropConnect (Wan et al. 2013): dropout on a layer's **weights** instead of its activations.

    Wraps ``module``; in training mode each forward draws one mask per named parameter (the same for the
    whole batch) and calls ``module`` with the masked weight through :func:`torch.func.functional_call`:

    .. math:: y = f(x;\ W \odot Z / (1 - p)), \qquad Z_{ij} \sim \mathrm{Bernoulli}(1 - p)

    The gradient reaches ``W`` through the mask (``Z / (1 - p) * dL/dW_masked``), recomputed from the seed.
    In eval mode ``module`` runs with its own weights (inverted scaling makes that the mean weight; the
    paper's Gaussian moment-matching inference is not implemented).

    Args:
        module: the layer to wrap (e.g. ``nn.Linear``).
        p: probability of a weight to be zeroed, in [0, 1]. Default: 0.5
        names: the parameters of ``module`` to mask (dotted names allowed). Default: ``("weight",)``

    Raises:
        ValueError: ``p`` outside [0, 1].
        AttributeError: a name that is not a parameter of ``module``.
    """

    def __init__(self, module: nn.Module, p: float = 0.5, names: Sequence[str] = ("weight",)) -> None:
        super().__init__()
        self.p = F._check_p(p)
        self.names = tuple(names)
        for name in self.names:
            module.get_parameter(name)  # raises AttributeError naming the missing parameter
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training or self.p == 0.0:
            return self.module(*args, **kwargs)
        masked = {name: F.dropout(self.module.get_parameter(name), self.p, True) for name in self.names}
        return torch.func.functional_call(self.module, masked, args, kwargs)

    def extra_repr(self) -> str:
        return f"p={self.p}, names={self.names}"


class CrossEntropyLoss(nn.CrossEntropyLoss):
    r"""Fused softmax cross-entropy with label smoothing, a drop-in for :class:`torch.nn.CrossEntropyLoss` (and an
    instance of it) for class-index targets: :func:`fusedtrain.nn.functional.cross_entropy` computes the loss and
    the gradient of the logits in one pass over each row, and the backward pass only scales that gradient.

    Args:
        weight: must be None (per-class weights are not supported; a clear error otherwise).
        size_average, reduce: deprecated, as in torch (folded into ``reduction``).
        ignore_index: a target value whose rows contribute nothing. Default: -100
        reduction: ``"mean"``, ``"sum"`` or ``"none"``. Default: ``"mean"``
        label_smoothing: in [0, 1]. Default: 0.0
    """

    def __init__(self, weight: Tensor | None = None, size_average: bool | None = None, ignore_index: int = -100,
                 reduce: bool | None = None, reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        if weight is not None:
            raise NotImplementedError("fusedtrain.nn.CrossEntropyLoss: weight= (per-class weights) is not "
                                      "supported; use torch.nn.CrossEntropyLoss for class weights")
        super().__init__(None, size_average, ignore_index, reduce, reduction, label_smoothing)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                               label_smoothing=self.label_smoothing)
