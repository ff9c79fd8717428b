"""Distributed training: DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism) and ZeRO partitions.

Note [DTensor parameters]: a :class:`torch.distributed.tensor.DTensor` is a global tensor whose rank-local
piece is ``t._local_tensor``. An element-wise update (an optimizer step, an EMA step) of a sharded
tensor is the same update of every local shard, so fusedtrain hands the kernels the local tensors and
never goes through DTensor's dispatcher (which would cost a Python dispatch per tensor). The optimizer
state mirrors torch.optim: it is made with ``zeros_like(p)`` and so is a DTensor sharded like ``p``
(what ``torch.distributed.checkpoint`` saves and reshards); its local tensor has the shard's shape.
Reductions across shards (the gradient norm) are the only place that needs a collective; see
:func:`fusedtrain.get_total_norm`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["DTensor", "Replicate", "is_dtensor", "local", "local_list", "shard_mesh_dims", "rows_kept_whole",
           "from_local_like", "is_fsdp_module", "check_local_pair", "refuse_partitioned_extras"]

DTensor: Any = None
_Shard: Any = None
Replicate: Any = None
_FSDPModule: Any = None
if torch.distributed.is_available():
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard as _Shard
    except ImportError:  # pragma: no cover - torch < 2.5 spelled it _tensor
        from torch.distributed._tensor import DTensor, Replicate, Shard as _Shard  # type: ignore
    try:
        from torch.distributed.fsdp import FSDPModule as _FSDPModule
    except ImportError:  # pragma: no cover - torch 2.6 keeps FSDP2 under _composable
        try:
            from torch.distributed._composable.fsdp import FSDPModule as _FSDPModule  # type: ignore
        except ImportError:
            _FSDPModule = None


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (False when torch has no distributed support)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank-local tensor of a DTensor (a view of its storage: in-place updates reach the DTensor);
    any other tensor unchanged."""
    return t._local_tensor if DTensor is not None and isinstance(t, DTensor) else t


def local_list(tensors: Sequence[Tensor]) -> Sequence[Tensor]:
    """``tensors`` with every DTensor replaced by its local tensor (the same sequence when there is none)."""
    if DTensor is None or not any(isinstance(t, DTensor) for t in tensors):
        return tensors
    return [t._local_tensor if isinstance(t, DTensor) else t for t in tensors]


def shard_mesh_dims(t: Tensor) -> tuple[int, ...] | None:
    """The mesh dimensions over which a DTensor's elements are split (its ``Shard`` placements; empty when
    it is replicated), or None when a placement is neither Shard nor Replicate (e.g. ``Partial``: its
    local tensors are pending sums, not pieces of the tensor)."""
    dims = []
    for d, placement in enumerate(t.placements):
        if isinstance(placement, _Shard):  # includes _StridedShard
            dims.append(d)
        elif not isinstance(placement, Replicate):
            return None
    return tuple(dims)


def rows_kept_whole(t: Any) -> bool:
    """Whether every dim-0 slice ("row") of a DTensor lies whole on one rank: it has >= 2 dims and each
    placement is ``Replicate`` or ``Shard(0)`` (FSDP2's, and tensor parallelism's row-wise sharding), or it is
    replicated. Then the 8-bit states' row blocks of its local tensor are blocks of the global tensor (Note
    [row blocks] in csrc/include/fusedtrain/quant.h). ``_StridedShard`` (FSDP2 over tensor parallelism) and
    ``Shard(d)`` for d > 0 cut rows, ``Partial`` holds no rows at all."""
    rowwise = t.dim() >= 2
    for placement in t.placements:
        if isinstance(placement, Replicate):
            continue
        if not (rowwise and type(placement) is _Shard and placement.dim == 0):
            return False
    return True


def from_local_like(local_tensor: Tensor, like: Any, shape: Sequence[int]) -> Tensor:
    """A DTensor of global ``shape`` (contiguous) with ``like``'s mesh and placements whose rank-local piece is
    ``local_tensor`` (no communication: the shape is given)."""
    stride = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        stride[d] = stride[d + 1] * max(int(shape[d + 1]), 1)
    return DTensor.from_local(local_tensor, like.device_mesh, like.placements, run_check=False,
                              shape=torch.Size(shape), stride=tuple(stride))


def is_fsdp_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` or one of its submodules is managed by FSDP2 (``fully_shard``)."""
    return _FSDPModule is not None and any(isinstance(m, _FSDPModule) for m in module.modules())


def check_local_pair(opt_name: str, p: Tensor, grad: Tensor) -> None:
    """Refuse a gradient whose local tensor is not the gradient of the parameter's local shard: a plain
    gradient of a DTensor parameter (or the reverse), or a DTensor gradient placed differently, e.g.
    ``Partial`` (pending sums across ranks) where torch.optim would redistribute it."""
    p_dt, g_dt = is_dtensor(p), is_dtensor(grad)
    if not p_dt and not g_dt:
        return
    if p_dt != g_dt or grad.device_mesh != p.device_mesh or tuple(grad.placements) != tuple(p.placements):
        where = (f"{type(grad).__name__} {getattr(grad, 'placements', '')}".strip() + " for a "
                 + f"{type(p).__name__} {getattr(p, 'placements', '')}".strip())
        raise RuntimeError(
            f"fusedtrain.optim.{opt_name} updates DTensor parameters shard by shard, so a gradient must be a "
            f"DTensor on the parameter's mesh with its placements; got a gradient {where} parameter. "
            "Redistribute it first: p.grad = p.grad.redistribute(p.device_mesh, p.placements)")


def refuse_partitioned_extras(param_groups: Sequence[Mapping[str, Any]]) -> None:
    """``max_grad_norm`` and ``ema`` are optimizer-wide: one in a param group is a mistake, or was put
    there by ZeroRedundancyOptimizer (it forwards its keyword arguments to the optimizer of each rank's
    partition AND records them in every group), where the norm and the EMA would see only this rank's
    partition of the parameters."""
    for key in ("max_grad_norm", "ema"):
        if any(group.get(key) is not None for group in param_groups):
            raise ValueError(
                f"{key}= is not a param-group option of the fusedtrain optimizers. Under "
                "torch.distributed.optim.ZeroRedundancyOptimizer each rank's optimizer holds a partition of the "
                "parameters, so it would see only that partition: instead call "
                "fusedtrain.clip_grad_norm_(model.parameters(), max_norm) before zero.step() (every rank holds "
                "all gradients) and ema.update() after it (zero.step() gathers every updated parameter).")
