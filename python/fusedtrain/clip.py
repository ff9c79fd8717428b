"""Gradient-norm clipping on one fused multi-tensor reduction (Pascanu et al., 2013).

:func:`clip_grad_norm_` is a drop-in for :func:`torch.nn.utils.clip_grad_norm_`: the same arguments, result
and errors. The norm of all gradients is computed by one kernel per (device, dtype) group instead of one
norm per tensor; the gradients are then scaled by :math:`\\min(1, \\text{max\\_norm} / (\\lVert g\\rVert +
10^{-6}))` as torch does, without a host synchronisation. The fusedtrain optimizers take
``max_grad_norm=`` to fold that scale into the update itself (no pass over the gradients to scale them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch import Tensor

from . import _ops
from ._dtensor import DTensor, Replicate, is_dtensor, local, shard_mesh_dims

__all__ = ["clip_grad_norm_", "get_total_norm", "grads_norm", "clip_coefficient"]


def _fused_norm_ok(t: Tensor, norm_type: float) -> bool:
    return (t.device.type in ("cpu", "cuda") and t.layout == torch.strided and not t.is_sparse
            and (t.is_floating_point() or (t.is_complex() and norm_type == 2.0)))


def _real_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


def _acc_dtype(tensors: list[Tensor]) -> torch.dtype:
    """float32, or float64 when a tensor is float64: the dtype every partial norm is kept in."""
    return torch.float64 if any(_real_dtype(t) == torch.float64 for t in tensors) else torch.float32


def _check_norm_inputs(tensors: list[Tensor], norm_type: float) -> None:
    if math.isinf(norm_type) and any(t.numel() == 0 for t in tensors):
        raise RuntimeError(
            f"fusedtrain.get_total_norm: cannot compute the {'' if norm_type > 0 else '-'}inf norm of a list with an "
            "empty tensor (the maximum of no elements has no identity); torch raises here too. Leave the empty "
            "tensors out.")


@torch.no_grad()
def get_total_norm(tensors: Tensor | Iterable[Tensor], norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach: bool | None = None) -> Tensor:
    r"""The ``norm_type``-norm of all ``tensors`` together, as :func:`torch.nn.utils.get_total_norm` computes it.

    .. math:: \lVert (t_1, \dots, t_n) \rVert_p = \Big(\sum_i \sum_j |t_{ij}|^p\Big)^{1/p}
              \quad(\max_{ij} |t_{ij}| \text{ for } p = \infty)

    Args:
        tensors: a tensor or an iterable of tensors (e.g. gradients).
        norm_type: p > 0 or ``inf`` run on the fused kernel; other orders (0, -inf) follow torch's definition
            (the norm of the per-tensor norms).
        error_if_nonfinite: raise when the norm is nan or inf (this reads the norm on the host).
        foreach: accepted for compatibility with torch and ignored.

    Returns:
        A 0-dim tensor on the first tensor's device, in the tensors' (promoted) dtype, as torch returns it;
        ``tensor(0.)`` for no tensors. The reduction itself runs in float32 (float64 for float64 tensors) and
        is rounded to that dtype once, at the end: a float16 result that overflows is ``inf`` exactly where
        torch's is (use :func:`grads_norm` for the float32 value).

    Raises:
        RuntimeError: the infinity norm of a list holding an empty tensor (as torch).
    """
    del foreach
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    norm_type = float(norm_type)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    dtype = functools.reduce(torch.promote_types, [_real_dtype(t) for t in tensors])
    total = _total_norm(tensors, norm_type).to(dtype)
    if error_if_nonfinite and torch.logical_or(local(total).isnan(), local(total).isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot "
            "be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    return total


@torch.no_grad()
def grads_norm(tensors: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """The joint norm of ``tensors`` (DTensors reduced across their shards) in float32, or float64 when a
    tensor is float64: never narrowed to the tensors' dtype, so the norm of float16 gradients scaled by
    GradScaler (up to 2^24) stays finite until it is divided by the scale. What ``max_grad_norm`` clips by."""
    return _total_norm(list(tensors), float(norm_type))


def _total_norm(tensors: list[Tensor], norm_type: float) -> Tensor:
    """The norm in the accumulation dtype (float32 / float64), DTensor-aware."""
    _check_norm_inputs(tensors, norm_type)
    if any(is_dtensor(t) for t in tensors):
        return _sharded_total_norm(tensors, norm_type)
    return _local_total_norm(tensors, norm_type, _acc_dtype(tensors))


def _local_total_norm(tensors: list[Tensor], norm_type: float, acc: torch.dtype) -> Tensor:
    """The norm of a non-empty list of plain tensors, in ``acc``: one fused kernel per (device, dtype); torch's
    per-tensor norms for the orders and tensors the kernel does not take, computed in ``acc`` too."""
    first_device = tensors[0].device
    fused_ok = norm_type > 0 and not math.isnan(norm_type)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    norms: list[Tensor] = []
    for t in tensors:
        if fused_ok and _fused_norm_ok(t, norm_type):
            groups.setdefault((t.device, t.dtype), []).append(torch.view_as_real(t) if t.is_complex() else t)
        elif t.is_complex():
            norms.append(torch.linalg.vector_norm(t, norm_type).to(acc))
        else:
            norms.append(torch.linalg.vector_norm(t, norm_type, dtype=acc))
    for group in groups.values():
        norms.append(_ops.total_norm(group, norm_type).to(acc))
    if len(norms) == 1 and fused_ok:
        return norms[0].to(first_device)
    # the norm of the per-tensor (per-group) norms: for p > 0 the same value; for 0 / -inf torch's definition
    return torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)


def _sharded_total_norm(tensors: list[Tensor], norm_type: float) -> Tensor:
    r"""The norm of tensors of which some are DTensors, equal to torch's for DTensor gradients.

    Note [norm across shards]: the elements of a DTensor with ``Shard`` placements are split over the
    ranks of those mesh dimensions, so its global :math:`\lVert g\rVert_p^p` is the sum of the local
    ones (the maximum of the local ones for :math:`p = \infty`). Per mesh, the local norms of all its
    DTensors come from the fused kernel, their p-th powers are all-reduced (SUM, or MAX for inf) over the
    sharded mesh dimensions only (a replicated dimension holds the same elements on each rank: summing
    over it would count them twice), and the root is taken. The reduction runs in float32 at least
    (float64 for float64 tensors). Every rank runs the same collectives in the same order because the
    tensors come in the same order on every rank. Orders other than p > 0 / inf, and DTensors with a
    ``Partial`` placement, are left to torch's DTensor implementation.

    Returns, in the accumulation dtype, a replicated DTensor on the mesh when all tensors are DTensors of one
    mesh (as torch does), else a plain tensor (the same value on every rank).
    """
    fused_ok = norm_type > 0 and not math.isnan(norm_type)
    by_mesh: dict[tuple[object, tuple[int, ...]], list[Tensor]] = {}
    plain: list[Tensor] = []
    meshes = []
    all_dtensors = True
    acc = _acc_dtype(tensors)
    for t in tensors:
        if not is_dtensor(t):
            plain.append(t)
            all_dtensors = False
            continue
        meshes.append(t.device_mesh)
        dims = shard_mesh_dims(t)
        if not fused_ok or dims is None:  # DTensor's own norm; full_tensor() is then the global value
            plain.append(torch.linalg.vector_norm(t, norm_type).full_tensor())
            continue
        by_mesh.setdefault((t.device_mesh, dims), []).append(local(t))
    inf = math.isinf(norm_type)
    norms: list[Tensor] = []
    for (mesh, dims), group in by_mesh.items():
        value = _local_total_norm(group, norm_type, acc)
        if not inf:
            value = value.pow(norm_type)
        op = torch.distributed.ReduceOp.MAX if inf else torch.distributed.ReduceOp.SUM
        for d in dims:
            torch.distributed.all_reduce(value, op=op, group=mesh.get_group(d))  # type: ignore[attr-defined]
        norms.append(value if inf else value.pow(1.0 / norm_type))
    if plain:
        norms.append(_local_total_norm(plain, norm_type, acc))
    device = norms[0].device
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(
        torch.stack([n.to(device) for n in norms]), norm_type)
    if all_dtensors and all(m == meshes[0] for m in meshes):
        mesh = meshes[0]
        return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return total


def clip_coefficient(total_norm: Tensor, max_norm: float | Tensor) -> Tensor:
    r""":math:`\min(1, \text{max\_norm} / (\lVert g\rVert + 10^{-6}))`, computed as torch does (on the device)."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


@torch.no_grad()
def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float | Tensor, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> Tensor:
    r"""Clips the gradients of ``parameters`` in place so that their joint norm is at most ``max_norm``.

    A drop-in for :func:`torch.nn.utils.clip_grad_norm_`:
    :math:`g \leftarrow g \cdot \min(1, \text{max\_norm} / (\lVert g\rVert_p + 10^{-6}))`.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_norm: the largest allowed norm.
        norm_type: the order p of the norm (``inf`` for the max norm).
        error_if_nonfinite: raise when the total norm is nan or inf.
        foreach: accepted for compatibility and ignored (the scaling is torch's ``_foreach_mul_``).

    Returns:
        The total norm of the gradients before clipping (a 0-dim tensor).
    """
    parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = get_total_norm(grads, norm_type, error_if_nonfinite)
    if not grads:
        return total
    coef = clip_coefficient(local(total), max_norm)
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:  # DTensor gradients: their shards are scaled by the same (replicated) coefficient
        g = local(g)
        by_device.setdefault(g.device, []).append(g)
    for device, device_grads in by_device.items():
        torch._foreach_mul_(device_grads, coef.to(device))
    return total
