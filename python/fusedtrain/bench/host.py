"""Host-time benchmark: an Adam step over N one-element tensors, where the arithmetic is nothing and the
step's cost is what the host does per tensor (checks, grouping, argument conversion, launches).

Rows: fusedtrain (its cached C++ plan, Note [step plan] in csrc/plan.cpp) vs torch.optim.Adam fused,
foreach and for-loop, for 100, 2004 and 20000 tensors; on a GPU also fusedtrain's CapturedStep (the whole
step replayed from a CUDA graph). The note gives microseconds per tensor.

Two ways of timing, both side by side in one run:
- "interleaved" (the house rule): the implementations take turns call by call, so each step starts with
  caches the others' steps evicted, as a real step follows a forward and backward pass (cold);
- "back to back": each implementation's steps run consecutively, round after round, and only calls that
  follow a call of the same implementation are timed (warm caches: the pure host cost).
On a CPU the difference is the cost of the cache misses of the walk over many small objects (csrc/plan.cpp,
Note [cold step]).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from .. import optim as ft_optim
from .common import Progress, Result, measure, measure_interleaved, summarize

__all__ = ["run", "COUNTS"]

COUNTS = (100, 2004, 20000)


def _params(n: int, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    params = [torch.randn(1, generator=gen).to(device).requires_grad_() for _ in range(n)]
    for p in params:
        p.grad = torch.randn(1, generator=gen).to(device)
    return params


def _back_to_back(steps: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                  reps: int, run_length: int = 4) -> dict[str, list[float]]:
    """Rounds in which each implementation makes ``run_length`` consecutive calls; the first call of a run
    (cold, after the others') is not timed, the rest are: ``reps`` timed calls per implementation, with a
    noisy neighbour still spread over all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    rounds = -(-reps // (run_length - 1))
    for name, fn in steps.items():
        for _ in range(warmup):
            fn()
    for r in range(rounds):
        names = list(steps)
        for name in names[r % len(names):] + names[:r % len(names)]:
            measure(steps[name], device, 1, 0)  # the untimed first call of the run
            times[name] += measure(steps[name], device, 0, run_length - 1)
    return times


def run(device: torch.device, reps: int, warmup: int, progress: bool = True,
        counts: tuple[int, ...] = COUNTS) -> list[Result]:
    impls: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
        "fusedtrain": (ft_optim.Adam, {}),
        "torch fused": (torch.optim.Adam, dict(fused=True)),
        "torch foreach": (torch.optim.Adam, dict(foreach=True)),
        "torch for-loop": (torch.optim.Adam, dict(foreach=False)),
    }
    results: list[Result] = []
    bar = Progress(len(counts), progress)
    for n in counts:
        bar.begin(f"host time, {n} tensors")
        steps: dict[str, Callable[[], Any]] = {}
        rows: dict[str, Result] = {}
        for impl, (cls, kw) in impls.items():
            if impl == "torch for-loop" and n > 2004:
                continue  # about 30 us per tensor: seconds per step, and nothing to learn beyond 2004
            opt = cls(_params(n, device), lr=1e-3, **kw)
            opt.step()
            steps[impl] = opt.step
            rows[impl] = Result("host", f"Adam step, {n} one-element tensors", impl, str(device), None)
        if device.type == "cuda":
            opt = ft_optim.Adam(_params(n, device), lr=1e-3)
            captured = ft_optim.CapturedStep(opt, warmup=2)
            for _ in range(4):  # warm-up and capture outside the timed calls
                captured.step()
            steps["fusedtrain CapturedStep"] = captured.step
            rows["fusedtrain CapturedStep"] = Result("host", f"Adam step, {n} one-element tensors",
                                                     "fusedtrain CapturedStep", str(device), None)
        for timing, times in (("interleaved", measure_interleaved(steps, device, warmup, reps)),
                              ("back to back", _back_to_back(steps, device, warmup, reps))):
            timed: dict[str, Result] = {}
            for impl, ts in times.items():
                row = Result("host", f"{rows[impl].case}, {timing}", impl, str(device), None)
                row.median_ms, row.p20_ms, row.p80_ms = summarize(ts)
                row.note = f"{row.median_ms * 1e3 / n:.3f} us per tensor"
                row.extra.update(us_per_tensor=row.median_ms * 1e3 / n, timing=timing, tensors=n)
                timed[impl] = row
            torch_best = min(r.median_ms for k, r in timed.items() if k.startswith("torch") and r.median_ms)
            for k, r in timed.items():
                if k.startswith("fusedtrain") and r.median_ms:
                    r.vs_best_torch = torch_best / r.median_ms
            results += list(timed.values())
        steps.clear()
        gc.collect()
        bar.step(f"host time, {n} tensors")
    return results
