"""Monte Carlo dropout (Gal & Ghahramani 2016): predictive mean and variance from stochastic forward passes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .modules import DropConnect, DropPath

__all__ = ["mc_dropout_predict", "is_dropout_module"]


def _dropout_types(extra: Sequence[type]) -> tuple[type, ...]:
    types: list[type] = [nn.modules.dropout._DropoutNd, DropPath, DropConnect, *extra]
    timm_layers = sys.modules.get("timm.layers")  # timm's DropPath, when timm is in use
    if timm_layers is not None and isinstance(getattr(timm_layers, "DropPath", None), type):
        types.append(timm_layers.DropPath)
    return tuple(types)


def is_dropout_module(module: nn.Module, extra_types: Sequence[type] = ()) -> bool:
    """Whether :func:`mc_dropout_predict` keeps ``module`` in train mode: torch's dropout modules
    (Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout and subclasses such as fusedtrain's),
    fusedtrain's DropPath and DropConnect, timm's DropPath (if timm is imported) and ``extra_types``."""
    return isinstance(module, _dropout_types(extra_types))


@torch.no_grad()
def mc_dropout_predict(model: nn.Module, x: Tensor, samples: int = 20, *, softmax: bool = False,
                       dropout_types: Sequence[type] = ()) -> tuple[Tensor, Tensor]:
    r"""Monte Carlo dropout prediction: ``samples`` forward passes with dropout active.

    Every dropout module (:func:`is_dropout_module`) is put in train mode and every other module in eval
    mode (BatchNorm uses its running statistics and does not update them), under ``torch.no_grad()``. With
    :math:`y_t` the model's output of pass :math:`t` (or ``softmax(y_t, dim=-1)`` with ``softmax=True``):

    .. math:: \mu = \frac{1}{T}\sum_t y_t, \qquad \sigma^2 = \frac{1}{T}\sum_t (y_t - \mu)^2

    (the population variance, accumulated with Welford's update in the output's dtype). Each pass draws
    new masks from the seed stream, so ``torch.manual_seed`` makes the result reproducible. The mode of
    every module is restored afterwards, also when a pass raises.

    Args:
        model: the network (any output tensor shape).
        x: the input batch, passed as ``model(x)``.
        samples: number of stochastic passes ``T`` (>= 1).
        softmax: average probabilities ``softmax(output, dim=-1)`` instead of raw outputs.
        dropout_types: further module classes to treat as dropout.

    Returns:
        ``(mean, variance)``, each of the output's shape.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"mc_dropout_predict: samples must be an int >= 1, got {samples!r}")
    types = _dropout_types(dropout_types)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in model.modules():
            if isinstance(m, types):
                m.training = True  # this module only: a DropConnect's wrapped layer stays in eval mode
        mean: Tensor | None = None
        m2: Tensor | None = None
        for t in range(samples):
            y = model(x)
            if softmax:
                y = torch.softmax(y, dim=-1)
            if mean is None or m2 is None:
                mean = y.clone()
                m2 = torch.zeros_like(y)
            else:
                delta = y - mean
                mean += delta / (t + 1)
                m2 += delta * (y - mean)
        assert mean is not None and m2 is not None
        return mean, m2 / samples
    finally:
        for m, mode in modes:
            m.training = mode
