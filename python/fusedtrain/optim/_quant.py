"""8-bit blockwise-quantized optimizer states on the Python side: conversions between float states and
(codes, absmax), with the kernels' own tables and rounding (Note [8-bit optimizer states] in
``csrc/include/fusedtrain/quant.h``).

A state of a parameter with n elements is stored as codes of the parameter's shape (``torch.int8`` for
signed states such as ``exp_avg``, ``torch.uint8`` for second moments such as ``exp_avg_sq``) plus a
float32 vector ``<key>_absmax`` of ``ceil(n / 256)`` block scales: element i of block b (row-major order)
is ``map[code_i] * absmax_b`` (signed), or ``(map[code_i] * absmax_b) ** 2`` (unsigned: the codes hold the
square root of the state, Note [square-root states] in csrc/include/fusedtrain/rules_quant.h). :func:`quantize` reproduces the kernels' requantization bit for bit (same
tables, same float arithmetic), so a converted state is what the kernels would have written.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import Tensor

from .._build import library

__all__ = [
    "ABSMAX_SUFFIX",
    "BLOCK",
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
    """Block scales of a state of ``numel`` elements."""
    return (numel + BLOCK - 1) // BLOCK


def is_codes(t: Any) -> bool:
    """Whether ``t`` is a tensor of 8-bit codes (int8 signed, uint8 unsigned)."""
    return isinstance(t, Tensor) and t.dtype in (torch.int8, torch.uint8)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Quantizes a float state as the kernels do: y = x (signed) or sqrt(x) (unsigned), in x's opmath type
    (float64 for float64 states, float32 otherwise); per block of 256 row-major elements, absmax = max|y|
    (rounded to float32), code = nearest map entry of y * (1/absmax).

    Args:
        x: the state (any shape, any floating dtype).
        signed: int8 codes on the signed map (states that can be negative), else uint8 codes of sqrt(x) on the
            unsigned map (non-negative second moments).

    Returns:
        ``(codes, absmax)``: codes of x's shape, float32 absmax of shape ``[ceil(x.numel() / 256)]``.
    """
    if signed is False and x.numel() > 0 and bool((x < 0).any()):
        raise ValueError("fusedtrain: a state with negative values cannot be stored with unsigned codes")
    op = _opmath(x.dtype)
    n = x.numel()
    blocks = num_blocks(n)
    flat = x.detach().reshape(-1).to(op)
    if not signed:
        flat = flat.sqrt()
    padded = torch.zeros(blocks * BLOCK, dtype=op, device=x.device)
    padded[:n] = flat
    mag = padded.abs().view(blocks, BLOCK)
    bad = mag.isnan().any(dim=1)
    absmax = mag.amax(dim=1).to(torch.float32)
    absmax = torch.where(bad, torch.full_like(absmax, float("nan")), absmax)
    inv = torch.where(absmax > 0, 1.0 / absmax.to(op), torch.zeros((), dtype=op, device=x.device))
    xn = (padded.view(blocks, BLOCK) * inv[:, None]).reshape(-1)[:n]
    if signed:
        mid = _table("signed_mid", op, x.device)
        c = torch.searchsorted(mid, xn.abs().contiguous())  # midpoints strictly below |x|
        c = torch.where(xn < 0, -c, c).to(torch.int8)
    else:
        mid = _table("unsigned_mid", op, x.device)
        c = torch.searchsorted(mid, xn.contiguous()).to(torch.uint8)
    return c.view(x.shape), absmax


def dequantize(codes: Tensor, absmax: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float state of ``(codes, absmax)`` as the kernels read it (``map[code] * absmax``, squared for
    unsigned codes, in float32), converted to ``dtype``; codes' dtype says the map (int8 signed, uint8
    unsigned)."""
    if not is_codes(codes):
        raise TypeError(f"fusedtrain: codes must be int8 or uint8, got {codes.dtype}")
    n = codes.numel()
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() != num_blocks(n):
        raise ValueError(f"fusedtrain: absmax must be float32 of shape [{num_blocks(n)}] for {n} codes, got "
                         f"{absmax.dtype} {tuple(absmax.shape)}")
    table = maps()["signed" if codes.dtype == torch.int8 else "unsigned"].to(codes.device)
    idx = codes.reshape(-1).long() + (128 if codes.dtype == torch.int8 else 0)
    scale = absmax.repeat_interleave(BLOCK)[:n]
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
