"""Test-time augmentation: average the model's softmax over augmented views of the input."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import Tensor, nn

__all__ = ["tta_predict", "hflip"]

View = Callable[[Tensor], Tensor]


def hflip(images: Tensor) -> Tensor:
    """Horizontal flip of a (..., H, W) batch (the last dimension reversed)."""
    return images.flip(-1)


def _identity(images: Tensor) -> Tensor:
    return images


def tta_predict(model: nn.Module, images: Tensor, transforms: Union[str, Sequence[View]] = "flip", *,
                eval_mode: bool = True, dim: int = 1) -> Tensor:
    """Test-time augmentation: the mean of the model's softmax over views of the batch,

        p(y | x) = 1/V * sum_v softmax(model(t_v(x)))

    i.e. the prediction with the augmentation's randomness marginalized over the chosen views.

    Runs under ``torch.no_grad()``. With ``eval_mode`` the model is put in eval mode for the views, and
    every submodule's ``training`` flag is restored afterwards (also when the model raises), so
    mixed-mode models (e.g. frozen BatchNorm inside a training model) come back as they were.

    Args:
        model: maps a batch to logits (N, K, ...).
        images: the batch.
        transforms: ``"flip"`` (the batch and its horizontal flip), ``"none"`` (the batch only), or a
            non-empty sequence of callables batch -> batch (include an identity for the original view).
        eval_mode: evaluate in eval mode.
        dim: the class dimension of the logits.

    Returns:
        The averaged probabilities, float32 (or float64 for float64 logits), shape of the logits.
    """
    if isinstance(transforms, str):
        if transforms == "flip":
            views: list[View] = [_identity, hflip]
        elif transforms == "none":
            views = [_identity]
        else:
            raise ValueError(f"transforms must be 'flip', 'none' or a list of callables, got {transforms!r}")
    else:
        views = list(transforms)
        if not views or not all(callable(t) for t in views):
            raise ValueError("transforms must be a non-empty sequence of callables (batch -> batch)")
    modes = [(m, m.training) for m in model.modules()]
    try:
        if eval_mode:
            model.eval()
        with torch.no_grad():
            total: Tensor | None = None
            for view in views:
                logits = model(view(images))
                p = torch.softmax(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), dim=dim)
                total = p if total is None else total + p
        assert total is not None
        return total / len(views)
    finally:
        for m, training in modes:
            m.training = training
