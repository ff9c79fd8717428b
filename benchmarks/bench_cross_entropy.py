"""The fused cross-entropy against torch's F.cross_entropy: forward + backward of one loss, interleaved.

``python benchmarks/bench_cross_entropy.py [--rows 1024] [--classes 8192] [--threads 1,2] [--reps 21]
[--smoothing 0.0] [--dtype float32] [--device cpu]``. Each repetition runs torch's and fusedtrain's loss once each
(the order flips every repetition), ``x.grad = None`` before each, so every backward allocates its gradient as in
training. Prints median (p20-p80) milliseconds of forward + backward and of the forward alone, and the ratio of the
medians, per thread count. The defaults are the logits of the train family's CPU transformer (8 x 128 tokens,
vocabulary 8192).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as TF
from fusedtrain.nn import functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=5) if len(xs) > 1 else [xs[0]] * 4
    return statistics.median(xs), q[0], q[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=8192)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--smoothing", type=float, default=0.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(args.rows, args.classes, generator=gen) * 2).to(dtype).to(device).requires_grad_(True)
    t = torch.randint(0, args.classes, (args.rows,), generator=gen).to(device)
    impls: dict[str, Callable[..., torch.Tensor]] = {"torch": TF.cross_entropy, "fusedtrain": F.cross_entropy}

    def fwd_bwd(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            fn(x, t, label_smoothing=args.smoothing).backward()
        return run

    def fwd(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            fn(x, t, label_smoothing=args.smoothing)
        return run

    print(f"cross-entropy [{args.rows}, {args.classes}] {args.dtype} on {device}, label_smoothing={args.smoothing}, "
          f"{args.reps} interleaved repetitions; ms median (p20-p80)")
    for threads in (int(s) for s in args.threads.split(",")):
        torch.set_num_threads(threads)
        for what, make in (("forward+backward", fwd_bwd), ("forward", fwd)):
            times: dict[str, list[float]] = {name: [] for name in impls}
            for name, fn in impls.items():  # warm-up
                for _ in range(2):
                    make(fn)()
            for rep in range(args.reps):
                order = list(impls.items()) if rep % 2 == 0 else list(impls.items())[::-1]
                for name, fn in order:
                    times[name].append(_time(make(fn), device))
            med = {name: _quantiles(ts) for name, ts in times.items()}
            cells = "  ".join(f"{name} {m:7.2f} ({lo:.2f}-{hi:.2f})" for name, (m, lo, hi) in med.items())
            print(f"threads={threads} {what:17s} {cells}  torch/fusedtrain {med['torch'][0] / med['fusedtrain'][0]:.2f}x")


if __name__ == "__main__":
    main()
