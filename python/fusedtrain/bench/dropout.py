"""Dropout benchmark: fusedtrain's mask-free dropout vs ``torch.nn.functional.dropout`` (forward, forward +
backward, bytes kept for backward), fused bias-dropout-add vs torch's composite, and the fused penalty vs
torch's per-tensor sums. All implementations of a row are interleaved call by call (common.py).

Bytes moved (the floor): dropout forward reads x and writes y (8 B/element in float32, 4 in bf16); the
backward pass reads the gradient and writes grad_input (another 8 / 4): ours regenerates the mask, torch
reads its stored mask (1 B/element on CUDA, a full float tensor on the CPU) and wrote it in the forward.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as TF

from ..nn import functional as F
from ..regularization import penalty
from .common import Progress, Result, measure_interleaved, summarize
from .optim import _make, _numel, param_shapes

__all__ = ["run", "saved_bytes_per_element"]

P = 0.1  # dropout probability (a transformer's)


def saved_bytes_per_element(fn: Callable[[], torch.Tensor], numel: int) -> float:
    """Bytes autograd keeps for the backward pass of ``fn()`` per element, seen through saved-tensor hooks
    (tensors saved twice are counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()) / numel


def _rows(family_case: str, device: torch.device, fns: dict[str, tuple[Callable[[], Any], int]], reps: int,
          warmup: int, bandwidth: float, numel: int, torch_impl: str | None) -> list[Result]:
    times = measure_interleaved({k: f for k, (f, _) in fns.items()}, device, warmup, reps)
    rows = []
    for impl, ts in times.items():
        r = Result("dropout", family_case, impl, str(device), None, bytes_moved=numel * fns[impl][1])
        r.median_ms, r.p20_ms, r.p80_ms = summarize(ts)
        r.gbps = r.bytes_moved / r.median_ms / 1e6 if r.bytes_moved else None
        r.pct_bw = 100 * r.gbps / bandwidth if (bandwidth and r.gbps) else None
        rows.append(r)
    if torch_impl is not None:
        ref = next(r for r in rows if r.impl == torch_impl).median_ms
        for r in rows:
            if r.impl.startswith("fusedtrain"):
                r.vs_best_torch = ref / r.median_ms
    return rows


def _dropout_rows(device: torch.device, numel: int, dtype: torch.dtype, reps: int, warmup: int,
                  bandwidth: float) -> list[Result]:
    size = torch.finfo(dtype).bits // 8
    count = f"2^{numel.bit_length() - 1}" if numel & (numel - 1) == 0 else str(numel)
    label = f"{count} {str(dtype).replace('torch.', '')}"
    x = torch.randn(numel, device=device, dtype=dtype)
    xg = x.clone().requires_grad_()
    g = torch.randn(numel, device=device, dtype=dtype)
    results: list[Result] = []

    # forward
    fns: dict[str, tuple[Callable[[], Any], int]] = {
        "torch F.dropout": (lambda: TF.dropout(x, P), 0),
        "fusedtrain": (lambda: F.dropout(x, P), 2 * size),
    }
    if device.type == "cpu":
        fns["torch clone (copy floor)"] = (lambda: x.clone(), 2 * size)
    results += _rows(f"dropout forward, {label}", device, fns, reps, warmup, bandwidth, numel, "torch F.dropout")

    # forward + backward
    def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            xg.grad = None
            fn(xg).backward(g)
        return step

    fns = {
        "torch F.dropout": (fwd_bwd(lambda t: TF.dropout(t, P)), 0),
        "fusedtrain": (fwd_bwd(lambda t: F.dropout(t, P)), 4 * size),
    }
    rows = _rows(f"dropout forward+backward, {label}", device, fns, reps, warmup, bandwidth, numel,
                 "torch F.dropout")
    for r, fn in zip(rows, (lambda: TF.dropout(xg, P), lambda: F.dropout(xg, P))):
        kept = saved_bytes_per_element(fn, numel)
        r.extra["saved_bytes_per_element"] = kept
        r.note = f"keeps {kept:.2f} B/elem for backward"
    results += rows
    return results


def _bias_dropout_add_rows(device: torch.device, rows_: int, hidden: int, dtype: torch.dtype, reps: int, warmup: int,
                           bandwidth: float) -> list[Result]:
    size = torch.finfo(dtype).bits // 8
    numel = rows_ * hidden
    x = torch.randn(rows_, hidden, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(hidden, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(rows_, hidden, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(rows_, hidden, device=device, dtype=dtype)

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run_() -> None:
            x.grad = b.grad = r.grad = None
            fn().backward(g)
        return run_

    fns: dict[str, tuple[Callable[[], Any], int]] = {
        "torch r + F.dropout(x + b)": (step(lambda: r + TF.dropout(x + b, P)), 0),
        # forward reads x, r and writes out; backward reads g, writes grad_x (grad_r is g itself)
        "fusedtrain bias_dropout_add": (step(lambda: F.bias_dropout_add(x, b, r, P)), 5 * size),
    }
    label = f"bias-dropout-add forward+backward, {rows_}x{hidden} {str(dtype).replace('torch.', '')}"
    return _rows(label, device, fns, reps, warmup, bandwidth, numel, "torch r + F.dropout(x + b)")


def _penalty_rows(device: torch.device, set_name: str, reps: int, warmup: int, bandwidth: float) -> list[Result]:
    shapes = param_shapes(set_name)
    numel = _numel(shapes)
    params = [p.detach().requires_grad_() for p in _make(shapes, device)]

    def theirs() -> None:
        for p in params:
            p.grad = None
        total = sum(1e-5 * p.abs().sum() + 1e-4 * p.square().sum() for p in params)
        total.backward()

    def ours() -> None:
        for p in params:
            p.grad = None
        penalty(params, l1=1e-5, l2=1e-4).backward()

    fns: dict[str, tuple[Callable[[], Any], int]] = {
        "torch sum(l1*|p|.sum() + l2*(p*p).sum())": (theirs, 0),
        "fusedtrain penalty": (ours, 12),  # forward reads p (4 B); backward reads p, writes grad (8 B)
    }
    label = f"L1+L2 penalty forward+backward, {set_name} ({numel / 1e6:.1f} M, {len(shapes)} tensors)"
    return _rows(label, device, fns, reps, warmup, bandwidth, numel, "torch sum(l1*|p|.sum() + l2*(p*p).sum())")


def run(device: torch.device, reps: int, warmup: int, bandwidth: float, progress: bool = True,
        quick: bool = False) -> list[Result]:
    """The dropout family's rows: CPU 2^24 float32 elements (2^22 with ``quick``); CUDA 2^27 in float32 and
    bfloat16 (2^25 with ``quick``)."""
    if device.type == "cuda":
        numel = 1 << (25 if quick else 27)
        dtypes = [torch.float32, torch.bfloat16]
        bda = (8192 if quick else 32768, 1024)
    else:
        numel = 1 << (22 if quick else 24)
        dtypes = [torch.float32]
        bda = (4096 if quick else 16384, 1024)
    bar = Progress(2 * len(dtypes) + 1 + (0 if quick else 1), progress)
    results: list[Result] = []
    for dtype in dtypes:
        bar.step(f"dropout {dtype}")
        results += _dropout_rows(device, numel, dtype, reps, warmup, bandwidth)
        bar.step(f"bias-dropout-add {dtype}")
        results += _bias_dropout_add_rows(device, bda[0], bda[1], dtype, reps, warmup, bandwidth)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.step("penalty resnet50")
    results += _penalty_rows(device, "resnet50", reps, warmup, bandwidth)
    if not quick:
        bar.step("penalty small-2004")
        results += _penalty_rows(device, "small-2004", reps, warmup, bandwidth)
    return results
