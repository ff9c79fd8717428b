"""8-bit blockwise-quantized optimizer states on the Python side: conversions between float states and
(codes, absmax), with the kernels' own tables and rounding (Note [8-bit optimizer states] in
``csrc/include/fusedtrain/quant.h``).

A state of a parameter is stored as codes of the parameter's shape (``torch.int8`` for signed states such as
``exp_avg``, ``torch.uint8`` for second moments such as ``exp_avg_sq``) plus float32 block scales
``<key>_absmax``: blocks of up to 256 consecutive elements within one dim-0 slice ("row") of the parameter,
absmax of shape ``[size(0), ceil(row / 256)]`` for >= 2 dims, ``[ceil(n / 256)]`` for 0 or 1 dims (Note [row
blocks] in ``csrc/include/fusedtrain/quant.h``; :func:`absmax_shape`). Element i of block b is
``map[code_i] * absmax_b`` (signed), or ``(map[code_i] * absmax_b) ** 2`` (unsigned: the codes hold the square
root of the state, Note [square-root states] in ``csrc/include/fusedtrain/rules_quant.h``). :func:`quantize`
reproduces the kernels' requantization bit for bit (same tables, same float arithmetic), so a converted state
is what the kernels would have written.

DTensors (FSDP2, tensor parallelism): blocks never cross a row, so the codes and absmax of a parameter
sharded along dim 0 (``Shard(0)``, ``Replicate``) are DTensors placed like it, and its local shard is
quantized as a tensor of its own (:func:`quantize` and :func:`dequantize` take and return DTensors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
from torch import Tensor

from .._build import library
from .._dtensor import from_local_like, is_dtensor, local

__all__ = [
    "ABSMAX_SUFFIX",
    "BLOCK",
    "absmax_shape",
    "dequantize",
    "is_codes",
    "maps",
    "num_blocks",
    "quantize",
    "to_torch_state_dict",
]

BLOCK = 256
ABSMAX_SUFFIX = "_absmax"


@cache
def _tables() -> dict[str, Any]:
    t = dict(library().quant_maps())
    assert t["block"] == BLOCK, "the Python and C++ block sizes disagree"
    return t


@cache
def _table(name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(_tables()[name], dtype=torch.float32).to(device=device, dtype=dtype)


def maps() -> dict[str, Tensor]:
    """The code maps as float32 tensors: ``unsigned`` (256 values, uint8 code c -> ``unsigned[c]``) and
    ``signed`` (256 values, int8 code c -> ``signed[c + 128]``)."""
    mags = _table("signed_value", torch.float32, torch.device("cpu"))
    neg = torch.cat([mags[127:128], mags[1:].flip(0)])  # codes -128 (decodes to -1), -127 .. -1
    return {"unsigned": _table("unsigned_value", torch.float32, torch.device("cpu")).clone(),
            "signed": torch.cat([-neg, mags])}


def num_blocks(numel: int) -> int:
    """Blocks of a row of ``numel`` elements."""
    return (numel + BLOCK - 1) // BLOCK


def _rows(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, elements per row) of a parameter of ``shape`` (Note [row blocks]): dim 0 and the product of the
    others for >= 2 dims, one row of every element otherwise."""
    if len(shape) >= 2:
        return int(shape[0]), math.prod(int(d) for d in shape[1:])
    return 1, math.prod(int(d) for d in shape)


def absmax_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the block scales of a state of a parameter of ``shape`` (Note [row blocks]):
    ``(shape[0], ceil(row / 256))`` with ``row = prod(shape[1:])`` for >= 2 dims, ``(ceil(numel / 256),)``
    for 0 or 1 dims."""
    rows, row = _rows(shape)
    return (rows, num_blocks(row)) if len(shape) >= 2 else (num_blocks(row),)


def is_codes(t: Any) -> bool:
    """Whether ``t`` is a tensor of 8-bit codes (int8 signed, uint8 unsigned)."""
    return isinstance(t, Tensor) and t.dtype in (torch.int8, torch.uint8)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Quantizes a float state as the kernels do: y = x (signed) or sqrt(x) (unsigned), in x's opmath type
    (float64 for float64 states, float32 otherwise); per block (up to 256 consecutive elements of one row,
    Note [row blocks]), absmax = max|y| (rounded to float32), code = nearest map entry of y * (1/absmax).

    Args:
        x: the state (any shape, any floating dtype), or a DTensor state of a parameter whose rows are whole
            on each rank (``Shard(0)`` / ``Replicate`` placements): its local tensor is quantized.
        signed: int8 codes on the signed map (states that can be negative), else uint8 codes of sqrt(x) on the
            unsigned map (non-negative second moments).

    Returns:
        ``(codes, absmax)``: codes of x's shape, float32 absmax of shape ``absmax_shape(x.shape)``; DTensors
        placed like ``x`` when it is one.
    """
    if is_dtensor(x):
        codes, absmax = quantize(local(x), signed)
        return from_local_like(codes, x, x.shape), from_local_like(absmax, x, absmax_shape(x.shape))
    if signed is False and x.numel() > 0 and bool((x < 0).any()):
        raise ValueError("fusedtrain: a state with negative values cannot be stored with unsigned codes")
    op = _opmath(x.dtype)
    rows, row = _rows(x.shape)
    per_row = num_blocks(row)
    y = x.detach().to(op).reshape(rows, row)
    if not signed:
        y = y.sqrt()
    padded = torch.zeros(rows, per_row * BLOCK, dtype=op, device=x.device)
    padded[:, :row] = y
    mag = padded.abs().view(rows, per_row, BLOCK)
    bad = mag.isnan().any(dim=2)
    absmax = mag.amax(dim=2)
    absmax = torch.where(bad, torch.full_like(absmax, float("nan")), absmax).to(torch.float32)
    inv = torch.where(absmax > 0, 1.0 / absmax.to(op), torch.zeros((), dtype=op, device=x.device))
    xn = (padded.view(rows, per_row, BLOCK) * inv[..., None]).view(rows, per_row * BLOCK)[:, :row].reshape(-1)
    if signed:
        mid = _table("signed_mid", op, x.device)
        c = torch.searchsorted(mid, xn.abs().contiguous())  # midpoints strictly below |x|
        c = torch.where(xn < 0, -c, c).to(torch.int8)
    else:
        mid = _table("unsigned_mid", op, x.device)
        c = torch.searchsorted(mid, xn.contiguous()).to(torch.uint8)
    return c.view(x.shape), absmax.view(absmax_shape(x.shape))


def dequantize(codes: Tensor, absmax: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float state of ``(codes, absmax)`` as the kernels read it (``map[code] * absmax``, squared for
    unsigned codes, in float32), converted to ``dtype``; codes' dtype says the map (int8 signed, uint8
    unsigned). DTensor codes and absmax (placed alike) give a DTensor placed like them."""
    if not is_codes(codes):
        raise TypeError(f"fusedtrain: codes must be int8 or uint8, got {codes.dtype}")
    if is_dtensor(codes) or is_dtensor(absmax):
        dc: Any = codes
        da: Any = absmax
        if not (is_dtensor(dc) and is_dtensor(da) and dc.device_mesh == da.device_mesh
                and tuple(dc.placements) == tuple(da.placements)):
            raise ValueError("fusedtrain: DTensor codes need DTensor absmax on the same mesh with the same "
                             "placements (as the optimizer's state_dict holds them)")
        return from_local_like(dequantize(local(codes), local(absmax), dtype), codes, codes.shape)
    want = absmax_shape(codes.shape)
    if absmax.dtype != torch.float32 or tuple(absmax.shape) != want:
        raise ValueError(f"fusedtrain: absmax must be float32 of shape {list(want)} for codes of shape "
                         f"{list(codes.shape)} (Note [row blocks]), got {absmax.dtype} {list(absmax.shape)}")
    rows, row = _rows(codes.shape)
    table = maps()["signed" if codes.dtype == torch.int8 else "unsigned"].to(codes.device)
    idx = codes.reshape(rows, row).long() + (128 if codes.dtype == torch.int8 else 0)
    scale = absmax.reshape(rows, num_blocks(row)).repeat_interleave(BLOCK, dim=1)[:, :row]
    value = table[idx] * scale
    if codes.dtype == torch.uint8:
        value = value * value
    return value.view(codes.shape).to(dtype)


def to_torch_state_dict(state_dict: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A state_dict of an 8-bit fusedtrain optimizer as torch.optim loads it: every quantized state
    (codes under the state's own key plus ``<key>_absmax``) becomes a float tensor of ``dtype`` (torch's
    ``load_state_dict`` then casts it to its parameter's dtype); other entries are kept as they are (not
    copied). A state_dict without quantized states comes back equal.

    Args:
        state_dict: what ``optimizer.state_dict()`` returned.
        dtype: the dtype of the dequantized states.

    Returns:
        A new dict (param_groups and unquantized states shared with the input).
    """
    out: dict[str, Any] = dict(state_dict)
    states: dict[Any, Any] = {}
    for pid, entry in state_dict["state"].items():
        new = dict(entry)
        for key, value in entry.items():
            scale = entry.get(key + ABSMAX_SUFFIX)
            if is_codes(value) and isinstance(scale, Tensor):
                new[key] = dequantize(value, scale, dtype)
                del new[key + ABSMAX_SUFFIX]
        states[pid] = new
    out["state"] = states
    return out
