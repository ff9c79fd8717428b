"""fusedtrain.optim.Lion vs DeepSpeed's DeepSpeedCPULion (its C++ AVX kernel, JIT-built with g++) and timm's Lion,
on the CPU, interleaved (issue 16's "also against DeepSpeedCPULion if it builds here": measured, not a gate).

Usage: python benchmarks/deepspeed_cpu_lion.py [--sets resnet50,small-2004] [--reps 10] [--warmup 3]

DeepSpeedCPULion updates float32 parameters with float32 states in one fused loop per tensor (OpenMP inside each
tensor, one Python call per step); its step has no maximize / caution / l1 options. The rows use Lion's
bench settings (lr=1e-4, weight_decay=0.1, betas=(0.9, 0.99)). Before timing, one step of each from the same
values is compared with timm's (foreach=False): the printed max |difference| says whether the rows compute the same
update (a sign flip where the interpolated momentum is ~0 moves an element by 2*lr).
"""

from __future__ import annotations

import argparse
import time

import torch

import fusedtrain
from fusedtrain.bench.common import measure_interleaved, summarize
from fusedtrain.bench.optim import _make, param_shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="resnet50,small-2004")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    import timm.optim
    t0 = time.time()
    from deepspeed.ops.lion import DeepSpeedCPULion
    kw = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
    probe = [torch.zeros(4, requires_grad=True)]
    DeepSpeedCPULion(probe, **kw)  # the JIT build of the cpu_lion op (cached under ~/.cache/torch_extensions)
    print(f"# DeepSpeedCPULion ready in {time.time() - t0:.1f} s; torch threads: {torch.get_num_threads()}")
    device = torch.device("cpu")
    for name in args.sets.split(","):
        shapes = param_shapes(name)
        numel = sum(torch.Size(s).numel() for s in shapes)
        runs = {}
        for impl, make in (("timm for-loop", lambda p: timm.optim.Lion(p, **kw, foreach=False)),
                           ("timm foreach", lambda p: timm.optim.Lion(p, **kw, foreach=True)),
                           ("deepspeed cpu", lambda p: DeepSpeedCPULion(p, **kw)),
                           ("fusedtrain", lambda p: fusedtrain.optim.Lion(p, **kw))):
            params = _make(shapes, device)
            runs[impl] = (params, make(params))
        # same values, one step each: agreement with timm's for-loop
        ref = runs["timm for-loop"][0]
        for params, opt in runs.values():
            opt.step()
        for impl, (params, _) in runs.items():
            diff = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(params, ref))
            print(f"# {name}: {impl} max |p - timm for-loop| after one step = {diff:.3g} (lr = {kw['lr']})")
        times = measure_interleaved({impl: opt.step for impl, (_, opt) in runs.items()}, device, args.warmup,
                                    args.reps)
        best_ref = min(summarize(times[i])[0] for i in ("timm for-loop", "timm foreach"))
        ds = summarize(times["deepspeed cpu"])[0]
        for impl, ts in times.items():
            med, p20, p80 = summarize(ts)
            gbps = numel * 20 / med / 1e6  # Lion: read p, g, m; write p, m (float32)
            print(f"{name:12s} {impl:14s} median {med:9.3f} ms  p20 {p20:9.3f}  p80 {p80:9.3f}  {gbps:5.1f} GB/s  "
                  f"vs best timm {best_ref / med:5.2f}x  vs deepspeed {ds / med:5.2f}x")
        del runs


if __name__ == "__main__":
    main()
