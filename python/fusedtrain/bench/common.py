"""Timing, bandwidth and table helpers shared by the benchmark families."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["Result", "Progress", "measure", "measure_interleaved", "measure_bandwidth", "format_table", "sync"]


@dataclass
class Result:
    """One benchmark row: an implementation of a step on a parameter set."""

    family: str
    case: str
    impl: str
    device: str
    median_ms: float | None
    p20_ms: float | None = None
    p80_ms: float | None = None
    bytes_moved: int = 0
    gbps: float | None = None
    pct_bw: float | None = None
    vs_best_torch: float | None = None  # best torch median / ours (>1: we are faster)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], None], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls after ``warmup`` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_interleaved(fns: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                        reps: int) -> dict[str, list[float]]:
    """Like :func:`measure` for several implementations at once, taking turns call by call (the order
    rotates every round), so a noisy neighbour slows all of them alike and the ratios stay fair."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            times[name] += measure(fns[name], device, 0, 1)
    return times


def timed_rows(family: str, case: str, device: torch.device, numel: int, bandwidth: float,
               fns: dict[str, tuple[Callable[[], Any], int]], reps: int, warmup: int) -> list[Result]:
    """One row per implementation of ``case``, timed side by side; ``fns[impl] = (step, bytes per
    element moved)``."""
    times = measure_interleaved({k: f for k, (f, _) in fns.items()}, device, warmup, reps)
    rows = []
    for impl, ts in times.items():
        r = Result(family, case, impl, str(device), None, bytes_moved=numel * fns[impl][1])
        r.median_ms, r.p20_ms, r.p80_ms = summarize(ts)
        r.gbps = r.bytes_moved / r.median_ms / 1e6
        r.pct_bw = 100 * r.gbps / bandwidth if bandwidth else None
        rows.append(r)
    return rows


def summarize(times: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return statistics.median(times), qs[0], qs[3]


def measure_bandwidth(device: torch.device, quick: bool = False) -> float:
    """The machine's practical memory bandwidth in GB/s (bytes read + written).

    CPU: in-place ``a.add_(b)`` over two 400 MB arrays (what an optimizer step does: read several
    streams, write some back). CUDA: a 1 GB device-to-device copy.
    """
    if device.type == "cuda":
        n = (1 << 28) if not quick else (1 << 26)
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        ms = statistics.median(measure(lambda: dst.copy_(src), device, 3, 10))
        return 2 * n * 4 / ms / 1e6
    n = 100_000_000 if not quick else 25_000_000
    a = torch.randn(n)
    b = torch.randn(n)
    ms = statistics.median(measure(lambda: a.add_(b), device, 1, 5 if not quick else 3))
    return 3 * n * 4 / ms / 1e6


class Progress:
    """A one-line progress bar on stderr.

    ``begin(label)`` shows what is being measured now without counting it; ``step(label)`` counts one
    item as done (call it after the work, or before it when the work is short)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = max(total, 1), 0, enabled and sys.stderr is not None
        self.t0 = time.perf_counter()

    def begin(self, label: str) -> None:
        self._show(label)

    def step(self, label: str) -> None:
        self.done += 1
        self._show(label)

    def _show(self, label: str) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.t0
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:5.1f}s {label[:48]:<48}")
        sys.stderr.flush()
        if self.done >= self.total:
            sys.stderr.write("\n")


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def format_table(results: list[Result]) -> str:
    header = ["family", "case", "impl", "median ms", "p20", "p80", "GB/s", "% BW", "vs best torch", "note"]
    rows = [header]
    for r in results:
        rows.append([r.family, r.case, r.impl, _fmt(r.median_ms, ".3f"), _fmt(r.p20_ms, ".3f"),
                     _fmt(r.p80_ms, ".3f"), _fmt(r.gbps, ".1f"), _fmt(r.pct_bw, ".0f"),
                     "" if r.vs_best_torch is None else f"{r.vs_best_torch:.2f}x", r.note])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
