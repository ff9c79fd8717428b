"""Timing, bandwidth and table helpers shared by the benchmark families."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["Result", "Progress", "measure", "measure_interleaved", "measure_bandwidth", "format_table", "sync",
           "shorten", "machine_load", "noise_warnings", "PROBE_EXPLANATION", "NOISY_SPREAD",
           "MAX_NOISY_LINES"]

# What the "% probe" column means, for --help, the header and the table's footnote.
PROBE_EXPLANATION = (
    "'% probe' is each row's GB/s (the bytes its step must read and write, divided by its median time) as a "
    "percentage of the bandwidth probe measured at the start: an in-place add a += b over two large arrays on a "
    "CPU (2 reads + 1 write per element), a device-to-device copy on a GPU (1 read + 1 write). The probe is a "
    "reference, not a ceiling: a row that reads more than it writes, or whose data stays in cache between "
    "calls, can move its bytes faster than the probe (above 100 %); on a busy machine the probe, measured "
    "once, may also have met a worse moment than the row.")
# A row whose p80 / p20 exceeds this is timed too noisily for its ratios to be trusted.
NOISY_SPREAD = 1.25
# More noisy rows than this are summed up in one warning line instead of one line each.
MAX_NOISY_LINES = 3


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

    def record(self, times: list[float], bandwidth: float) -> None:
        """Sets the median, p20 and p80 of ``times`` (ms), the GB/s they give ``bytes_moved`` and its
        percentage of the ``bandwidth`` probe (None without a probe)."""
        self.median_ms, self.p20_ms, self.p80_ms = summarize(times)
        self.gbps = self.bytes_moved / self.median_ms / 1e6
        self.pct_bw = 100 * self.gbps / bandwidth if bandwidth else None


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
        r.record(ts, bandwidth)
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
                         f"{elapsed:5.1f}s {shorten(label, 48):<48}")
        sys.stderr.flush()
        if self.done >= self.total:
            sys.stderr.write("\n")


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def shorten(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, cut at a word boundary and ended with "…" when cut (a single
    word longer than that is cut inside)."""
    if len(text) <= width:
        return text
    cut = text[:width - 1]
    space = cut.rfind(" ")
    if space > 0:
        cut = cut[:space]
    return cut.rstrip(" ,;:.") + "…"


def format_table(results: list[Result]) -> str:
    """The results as an aligned text table; a row above 100 % of the probe is marked with "*" and a
    footnote explains the column (:data:`PROBE_EXPLANATION`)."""
    header = ["family", "case", "impl", "median ms", "p20", "p80", "GB/s", "% probe", "vs best torch", "note"]
    rows = [header]
    above = False
    for r in results:
        pct = _fmt(r.pct_bw, ".0f")
        if r.pct_bw is not None and r.pct_bw > 100:
            pct, above = pct + "*", True
        rows.append([r.family, r.case, r.impl, _fmt(r.median_ms, ".3f"), _fmt(r.p20_ms, ".3f"),
                     _fmt(r.p80_ms, ".3f"), _fmt(r.gbps, ".1f"), pct,
                     "" if r.vs_best_torch is None else f"{r.vs_best_torch:.2f}x", r.note])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if above:
        lines.append("* above 100 % of the probe: " + PROBE_EXPLANATION)
    return "\n".join(lines)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_load() -> float | None:
    """The 1-minute load average (runnable processes), or None where the OS does not report it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def noise_warnings(results: list[Result], load_before: float | None, load_after: float | None,
                   threads: int) -> list[str]:
    """Warning lines for timings that are noise: rows whose spread p80 / p20 exceeds :data:`NOISY_SPREAD`,
    and a machine busy with other work (the load average before the run, or after it less the benchmark's
    own ``threads``, above half the CPUs: other processes then take turns with the timed calls)."""
    lines = []
    cpus = cpu_count()
    others = max([x for x in (load_before, None if load_after is None else load_after - threads) if x is not None],
                 default=None)
    if others is not None and others > 0.5 * cpus:
        lines.append(f"warning: the machine is busy: load average {others:.1f} from other processes on {cpus} "
                     f"CPUs; every timing may include their turns, so the times and ratios are noisy. Rerun when "
                     f"it is idle.")
    noisy = sorted((r.p80_ms / r.p20_ms, i, r) for i, r in enumerate(results)
                   if r.p20_ms and r.p80_ms and r.p80_ms / r.p20_ms > NOISY_SPREAD)
    if len(noisy) <= MAX_NOISY_LINES:  # one line per row, in table order
        for spread, _, r in sorted(noisy, key=lambda x: x[1]):
            lines.append(f"warning: noisy row ({r.family}, {shorten(r.case, 60)}, {r.impl}): p80 / p20 = "
                         f"{spread:.2f} > {NOISY_SPREAD}; its median is uncertain, rerun with more --reps")
    else:  # many: one line, naming the worst
        spread, _, r = noisy[-1]
        timed = sum(1 for x in results if x.p20_ms and x.p80_ms)
        lines.append(f"warning: {len(noisy)} of {timed} rows are noisy (p80 / p20 > {NOISY_SPREAD}; worst "
                     f"{spread:.2f}: {r.family}, {shorten(r.case, 60)}, {r.impl}); their medians and ratios are "
                     f"uncertain: rerun with more --reps, on an idle machine")
    return lines
