"""Grouping of tensors into one op call per (device, dtype), and complex tensors as real views."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Split", "real_view", "splits_for"]


def real_view(t: Tensor) -> Tensor:
    """Complex tensors are updated as pairs of reals, exactly as torch.optim does (view_as_real)."""
    return torch.view_as_real(t) if t.is_complex() else t


Split = tuple[list[int], bool]  # tensor indices of one (device, dtype) group, and whether any is complex


def splits_for(params: Sequence[Tensor]) -> list[Split]:
    """Indices of ``params`` per (device, real dtype) group: one op call per group."""
    groups: dict[tuple[torch.device, torch.dtype], Split] = {}
    for i, p in enumerate(params):
        cplx = p.is_complex()
        dtype = p.real.dtype if cplx else p.dtype
        idx, any_cplx = groups.get((p.device, dtype), ([], False))
        idx.append(i)
        groups[(p.device, dtype)] = (idx, any_cplx or cplx)
    return list(groups.values())
