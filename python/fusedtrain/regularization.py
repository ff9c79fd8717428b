"""Regularization terms for the loss: L1, L2 and elastic net as one fused multi-tensor reduction.

Note [penalty convention]:
    ``penalty(params, l1, l2) = l1 * sum|theta| + l2 * sum theta^2`` over every element of every tensor, with
    gradient ``l1 * sign(theta) + 2 * l2 * theta`` (``sign(0) = 0``). Mind the factor 2: SGD's
    ``weight_decay=lam`` adds ``lam * theta`` to the gradient, which is this penalty with ``l2 = lam / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from . import _ops

__all__ = ["penalty"]


def _check_coefficient(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"Invalid {name} value: {value}")
    return value


def penalty(params: Iterable[Tensor], l1: float = 0.0, l2: float = 0.0) -> Tensor:
    r"""The elastic-net penalty :math:`l_1 \sum_i |\theta_i| + l_2 \sum_i \theta_i^2`, differentiable.

    Add it to the loss: ``loss = criterion(out, y) + penalty(model.parameters(), l1=1e-5, l2=1e-4)``.
    One fused reduction per (device, dtype) group reads every element once; the sums are accumulated in
    float32 (float64 for float64 parameters) with a split that does not depend on the thread count, so
    the value is reproducible. The backward pass writes
    :math:`\partial/\partial\theta = l_1\,\mathrm{sign}(\theta) + 2 l_2 \theta` (times the incoming
    gradient) in one fused pass. ``weight_decay=lam`` of SGD equals ``l2 = lam / 2``.

    Args:
        params: tensors (e.g. ``model.parameters()``): float32, float64, float16 or bfloat16, any shape,
            layout or device; empty tensors contribute 0.
        l1: coefficient of the L1 term (>= 0).
        l2: coefficient of the squared-L2 term (>= 0).

    Returns:
        A 0-dim tensor on the first tensor's device, float64 if any tensor is float64 else float32
        (a CPU float32 zero when ``params`` is empty).

    Raises:
        ValueError: a negative or non-finite coefficient.
    """
    l1 = _check_coefficient("l1", l1)
    l2 = _check_coefficient("l2", l2)
    tensors = list(params)
    if not tensors:
        return torch.zeros(())
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    device = tensors[0].device
    total: Tensor | None = None
    for group in groups.values():
        value = _ops.penalty(group, l1, l2).to(device)
        total = value if total is None else total + value
    assert total is not None
    return total
