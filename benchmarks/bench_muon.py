"""Muon step on a transformer's matrices (24 x 768x768 + 6 x 768x3072 + 6 x 3072x768): fusedtrain vs
torch.optim.Muon on the CPU.

torch.optim.Muon runs Newton-Schulz in bfloat16, which on a CPU without bfloat16 instructions (AVX2) is a
slow fallback GEMM: one torch step on the full set takes many minutes. torch orthogonalizes one matrix
after another, so its time for the set is the sum over matrices: it is measured on one matrix of each
shape and multiplied by the counts ("torch (per-shape x count)"). fusedtrain is measured on the full set
(its batching is part of what is measured) and, for a like-for-like check, on the same one matrix of
each shape. Runs alternate between the implementations (interleaved); medians are reported.

    python benchmarks/bench_muon.py --reps 3 [--torch-reps 1] [--out results.txt]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import fusedtrain

SET = [((768, 768), 24), ((768, 3072), 6), ((3072, 768), 6)]


def _params(shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    ps = [torch.randn(s).requires_grad_() for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--torch-reps", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    full = [s for s, n in SET for _ in range(n)]
    ours_full = fusedtrain.optim.Muon(_params(full), lr=0.02)
    ours_one = {s: fusedtrain.optim.Muon(_params([s]), lr=0.02) for s, _ in SET}
    theirs_one = {s: torch.optim.Muon(_params([s]), lr=0.02) for s, _ in SET}
    ours_full.step()  # warm-up (allocations, MKL's first call)
    times: dict[str, list[float]] = {"fusedtrain full": []}
    times.update({f"fusedtrain {s}": [] for s, _ in SET})
    times.update({f"torch {s}": [] for s, _ in SET})
    for rep in range(max(args.reps, args.torch_reps)):
        for s, _ in SET:
            if rep < args.torch_reps:
                times[f"torch {s}"].append(_timed(theirs_one[s].step))
            times[f"fusedtrain {s}"].append(_timed(ours_one[s].step))
        if rep < args.reps:
            times["fusedtrain full"].append(_timed(ours_full.step))
    med = {k: statistics.median(v) for k, v in times.items()}
    torch_total = sum(med[f"torch {s}"] * n for s, n in SET)
    ours_per_shape = sum(med[f"fusedtrain {s}"] * n for s, n in SET)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
             f"{torch.backends.cpu.get_cpu_capability()}"]
    for k, v in times.items():
        lines.append(f"{k:28s} median {med[k]:10.1f} ms   runs {', '.join(f'{x:.1f}' for x in v)}")
    lines.append(f"torch total (per-shape x count)      {torch_total / 1e3:10.2f} s")
    lines.append(f"fusedtrain total (per-shape x count) {ours_per_shape / 1e3:10.2f} s")
    lines.append(f"fusedtrain full set (batched)        {med['fusedtrain full'] / 1e3:10.2f} s")
    lines.append(f"speed-up vs torch: {torch_total / med['fusedtrain full']:.1f}x (batched full set), "
                 f"{torch_total / ours_per_shape:.1f}x (per shape)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
