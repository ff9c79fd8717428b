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

4-bit states (Adam and AdamW at ``state_bits=4``; Note [4-bit optimizer states] in
``csrc/include/fusedtrain/quant4.h``) are stored as ``ceil(n / 2)`` bytes of packed codes (one-dimensional;
``torch.int8`` for signed states, ``torch.uint8`` for second moments), a float32 ``<key>_absmax4`` of
``ceil(n / 128)`` block scales and ``<key>_shape4``, the parameter's shape as a tuple (the packed codes do not
carry it, and :func:`to_torch_state_dict` needs it); :func:`quantize4` and :func:`dequantize4` convert them.
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
    "ABSMAX4_SUFFIX",
    "ABSMAX_SUFFIX",
    "BLOCK",
    "BLOCK4",
    "SHAPE4_SUFFIX",
    "absmax_shape",
    "dequantize",
    "dequantize4",
    "is_codes",
    "maps",
    "maps4",
    "num_blocks",
    "num_blocks4",
    "quantize",
    "quantize4",
    "to_torch_state_dict",
]

BLOCK = 256
ABSMAX_SUFFIX = "_absmax"
BLOCK4 = 128
ABSMAX4_SUFFIX = "_absmax4"
SHAPE4_SUFFIX = "_shape4"


@cache
def _tables() -> dict[str, Any]:
    t = dict(library().quant_maps())
    assert t["block"] == BLOCK, "the Python and C++ block sizes disagree"
    return t


@cache
def _table(name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(_tables()[name], dtype=torch.float32).to(device=device, dtype=dtype)


@cache
def _tables4() -> dict[str, Any]:
    t = dict(library().quant4_maps())
    assert t["block"] == BLOCK4, "the Python and C++ 4-bit block sizes disagree"
    return t


@cache
def _table4(name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(_tables4()[name], dtype=torch.float32).to(device=device, dtype=dtype)


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
    """A state_dict of an 8-bit or 4-bit fusedtrain optimizer as torch.optim loads it: every quantized state
    (codes under the state's own key plus ``<key>_absmax``, or ``<key>_absmax4`` and ``<key>_shape4``) becomes a
    float tensor of ``dtype`` (torch's ``load_state_dict`` then casts it to its parameter's dtype); other entries
    are kept as they are (not copied). A state_dict without quantized states comes back equal.

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
            scale4 = entry.get(key + ABSMAX4_SUFFIX)
            if is_codes(value) and isinstance(scale, Tensor):
                new[key] = dequantize(value, scale, dtype)
                del new[key + ABSMAX_SUFFIX]
            elif is_codes(value) and isinstance(scale4, Tensor):
                new[key] = dequantize4(value, scale4, entry[key + SHAPE4_SUFFIX], dtype)
                del new[key + ABSMAX4_SUFFIX], new[key + SHAPE4_SUFFIX]
        states[pid] = new
    out["state"] = states
    return out


# ------------------------------------------------------------------------------------------- 4 bits
def maps4() -> dict[str, Tensor]:
    """The 4-bit code maps as float32 tensors of 16 values (code c -> ``map[c]``): ``signed`` (``exp_avg``)
    and ``unsigned`` (square roots of second moments), Note [4-bit optimizer states]."""
    return {"signed": _table4("signed_value", torch.float32, torch.device("cpu")).clone(),
            "unsigned": _table4("unsigned_value", torch.float32, torch.device("cpu")).clone()}


def num_blocks4(numel: int) -> int:
    """Block scales of a 4-bit state of ``numel`` elements."""
    return (numel + BLOCK4 - 1) // BLOCK4


def quantize4(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Quantizes a float state to 4 bits as the kernels do: y = x (signed) or sqrt(x) (unsigned), in x's
    opmath type; per block of 128 row-major elements, absmax = max|y| (rounded to float32), code = the number
    of the map's midpoints strictly below y * (1/absmax) (0 for a NaN); codes packed two per byte, element
    2k in the low nibble of byte k.

    Args:
        x: the state (any shape, any floating dtype).
        signed: codes on the signed map (``torch.int8`` bytes), else codes of sqrt(x) on the unsigned map
            (``torch.uint8`` bytes).

    Returns:
        ``(codes, absmax)``: codes of shape ``[ceil(n / 2)]``, float32 absmax of shape ``[ceil(n / 128)]``.
    """
    if signed is False and x.numel() > 0 and bool((x < 0).any()):
        raise ValueError("fusedtrain: a state with negative values cannot be stored with unsigned codes")
    op = _opmath(x.dtype)
    n = x.numel()
    blocks = num_blocks4(n)
    flat = x.detach().reshape(-1).to(op)
    if not signed:
        flat = flat.sqrt()
    padded = torch.zeros(blocks * BLOCK4, dtype=op, device=x.device)
    padded[:n] = flat
    mag = padded.abs().view(blocks, BLOCK4)
    bad = mag.isnan().any(dim=1)
    absmax = mag.amax(dim=1).to(torch.float32)
    absmax = torch.where(bad, torch.full_like(absmax, float("nan")), absmax)
    inv = torch.where(absmax > 0, 1.0 / absmax.to(op), torch.zeros((), dtype=op, device=x.device))
    xn = (padded.view(blocks, BLOCK4) * inv[:, None]).reshape(-1)[:n]
    mid = _table4("signed_mid" if signed else "unsigned_mid", op, x.device)
    c = torch.searchsorted(mid, xn.contiguous())  # midpoints strictly below x
    c = torch.where(xn.isnan(), torch.zeros_like(c), c)
    pairs = torch.zeros(2 * ((n + 1) // 2), dtype=torch.int64, device=x.device)
    pairs[:n] = c
    pairs = pairs.view(-1, 2)
    codes = (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)
    return (codes.view(torch.int8) if signed else codes), absmax


def dequantize4(codes: Tensor, absmax: Tensor, shape: tuple[int, ...] | torch.Size,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """The float state of 4-bit ``(codes, absmax)`` as the kernels read it (``map[code] * absmax``, squared
    for unsigned codes, in float32), of ``shape``, converted to ``dtype``; the codes' dtype says the map
    (int8 signed, uint8 unsigned)."""
    if not is_codes(codes) or codes.dim() != 1:
        raise TypeError(f"fusedtrain: 4-bit codes must be a one-dimensional int8 or uint8 tensor, got {codes.dtype} "
                        f"{tuple(codes.shape)}")
    n = math.prod(shape)
    if codes.numel() != (n + 1) // 2:
        raise ValueError(f"fusedtrain: {codes.numel()} bytes of 4-bit codes cannot hold a state of shape "
                         f"{tuple(shape)} ({(n + 1) // 2} bytes)")
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() != num_blocks4(n):
        raise ValueError(f"fusedtrain: absmax must be float32 of shape [{num_blocks4(n)}] for {n} elements, got "
                         f"{absmax.dtype} {tuple(absmax.shape)}")
    signed = codes.dtype == torch.int8
    table = _table4("signed_value" if signed else "unsigned_value", torch.float32, codes.device)
    b = codes.view(torch.uint8).long()
    idx = torch.stack([b & 15, b >> 4], dim=1).reshape(-1)[:n]
    value = table[idx] * absmax.repeat_interleave(BLOCK4)[:n]
    if not signed:
        value = value * value
    return value.view(tuple(shape)).to(dtype)
