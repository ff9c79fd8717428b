"""Per-tensor sums of DTensor (FSDP2) parameters added across their shards (Note [sums across shards] in
csrc/include/fusedtrain/work.h).

The rules that reduce each tensor before they update it (LAMB's and LARS's trust ratios, the caution mask's
mean of LAMB and Lion) see the local shard of a DTensor parameter only, so their sums are partial. The step plan
hands such a segment's sums to the callable made here, between the rule's passes: one float64 tensor of rows
(sum0, sum1, numel) for the segment's non-empty local shards, in place. It adds every sharded parameter's row
across the mesh dimensions its elements are split over, with one ``all_reduce`` of one vector per mesh (and
sharded dimension) and reduction pass: replicated parameters are whole on every rank and keep their rows. The
vector has one row per parameter of the segment, empty shards included, so every rank reduces the same shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._dtensor import is_dtensor, shard_mesh_dims
from ._base import where

__all__ = ["Reducer", "across_shards", "refuse_traced", "refuse_unplaced"]

Reducer = Callable[[Tensor, list[int]], None]


def across_shards(opt_name: str, group_index: int, positions: Sequence[int], params: Sequence[Tensor],
                  refuse_partial: bool = True) -> Reducer | None:
    """The reducer of one segment (``params``, at ``positions`` of param group ``group_index``), or None when no
    parameter is sharded. It keeps the meshes and sharded dimensions, never the parameters (the step plan must
    hold no reference to a parameter's tensor: Note [step plan] in csrc/plan.cpp). A parameter placed neither
    Shard nor Replicate (Partial) is refused, or with ``refuse_partial=False`` (a rule that reduces nothing with
    this group's options) left out."""
    meshes: list[tuple[Any, tuple[int, ...], list[int]]] = []
    for i, (pos, p) in enumerate(zip(positions, params)):
        if not is_dtensor(p):
            continue
        dims = shard_mesh_dims(p)
        if dims is None and not refuse_partial:
            continue
        if dims is None:
            raise RuntimeError(
                f"fusedtrain.optim.{opt_name}: {where(group_index, pos)} is a DTensor placed {tuple(p.placements)}; "
                "its per-tensor norms need Shard or Replicate placements (a Partial tensor holds pending sums, not "
                "its elements). Redistribute it first.")
        if not dims:
            continue
        for mesh, d, rows in meshes:
            if mesh is p.device_mesh and d == dims:
                rows.append(i)
                break
        else:
            meshes.append((p.device_mesh, dims, [i]))
    if not meshes:
        return None
    n = len(params)
    plan = [(rows, [mesh.get_group(d) for d in dims]) for mesh, dims, rows in meshes]
    index_cache: dict[tuple[str, tuple[int, ...]], Tensor] = {}

    def index(device: torch.device, values: Sequence[int]) -> Tensor:
        # cached: a step captured in a CUDA graph may not copy from the host (the eager warm-up steps fill it)
        key = (str(device), tuple(values))
        found = index_cache.get(key)
        if found is None:
            found = index_cache[key] = torch.tensor(list(values), dtype=torch.long, device=device)
        return found

    def reduce(sums: Tensor, ordinals: list[int]) -> None:
        full = sums.new_zeros(n, sums.shape[1])
        ordinal_index = index(sums.device, ordinals)
        full.index_copy_(0, ordinal_index, sums)
        for rows, groups in plan:
            part = full if len(rows) == n else full.index_select(0, index(sums.device, rows))
            for group in groups:
                torch.distributed.all_reduce(part, group=group)
            if part is not full:
                full.index_copy_(0, index(sums.device, rows), part)
        sums.copy_(full.index_select(0, ordinal_index))

    return reduce


def refuse_unplaced(opt_name: str, param_groups: Sequence[dict[str, Any]], fused: Sequence[Sequence[int]],
                    reduces: Callable[[dict[str, Any]], bool]) -> None:
    """Refuse, before anything is written (the step's checks), a DTensor parameter placed neither Shard nor
    Replicate in a group whose rule reduces per tensor: its local tensor is not a piece of the tensor."""
    for gi, positions in enumerate(fused):
        group = param_groups[gi]
        if not reduces(group):
            continue
        for pos in positions:
            p = group["params"][pos]
            if is_dtensor(p) and shard_mesh_dims(p) is None:
                raise RuntimeError(
                    f"fusedtrain.optim.{opt_name}: {where(gi, pos)} is a DTensor placed {tuple(p.placements)}; its "
                    "per-tensor norms need Shard or Replicate placements (a Partial tensor holds pending sums, not its "
                    "elements). Redistribute it first.")


def refuse_traced(opt_name: str, param_groups: Sequence[dict[str, Any]], reduces: Callable[[dict[str, Any]], bool]) \
        -> None:
    """The traced step (torch.compile: one ``step_`` op per segment) has no way to reduce sums across shards:
    refuse sharded parameters in the groups whose rule ``reduces`` per tensor, before anything is written."""
    for gi, group in enumerate(param_groups):
        if not reduces(group):
            continue
        for pos, p in enumerate(group["params"]):
            if p.grad is not None and is_dtensor(p) and shard_mesh_dims(p) != ():
                raise RuntimeError(
                    f"fusedtrain.optim.{opt_name}: {where(gi, pos)} is a sharded DTensor, whose per-tensor norms "
                    "need a reduction across its shards that the step under torch.compile cannot make; run "
                    "optimizer.step() outside the compiled region (torch.compiler.disable).")
