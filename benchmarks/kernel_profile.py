"""Split a CUDA optimizer step into device kernel time and host overhead (torch.profiler).

For each optimizer on the gpt2-medium parameter set, runs a few steps of fusedtrain and of torch's
fastest implementation under the profiler and prints, per step: wall time between CUDA events, the sum
of the kernels' device time, and the kernels' bandwidth as a % of the measured device copy.

    python benchmarks/kernel_profile.py [--sizes gpt2-medium] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

import fusedtrain
from fusedtrain.bench.common import measure, measure_bandwidth
from fusedtrain.bench.optim import OPTIMIZERS, _make, _numel, param_shapes

STEPS = 5


def kernel_ms_per_step(step, device: torch.device) -> float:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize(device)
    total_us = 0.0
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            total_us += evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
    return total_us / 1e3 / STEPS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="gpt2-medium,resnet50")
    ap.add_argument("--optimizers", default="Adam,SGD momentum,Adagrad,RMSprop")
    ap.add_argument("--impls", default="fusedtrain,torch fused,torch foreach")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    bw = measure_bandwidth(device)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | copy bandwidth {bw:.0f} GB/s | "
          f"fusedtrain {fusedtrain.build_info()}")
    rows = []
    for set_name in args.sizes.split(","):
        shapes = param_shapes(set_name)
        numel = _numel(shapes)
        for name in args.optimizers.split(","):
            cls_name, kw, bpp = OPTIMIZERS[name]
            for impl in args.impls.split(","):
                params = _make(shapes, device)
                try:
                    if impl == "fusedtrain":
                        opt = getattr(fusedtrain.optim, cls_name)(params, **kw)
                    else:
                        flag = {"fused": True} if impl == "torch fused" else {"foreach": True}
                        opt = getattr(torch.optim, cls_name)(params, **kw, **flag)
                    wall = statistics.median(measure(opt.step, device, 3, 10))
                    kern = kernel_ms_per_step(opt.step, device)
                except (RuntimeError, TypeError, ValueError):
                    continue
                floor = numel * bpp / bw / 1e6
                row = dict(set=set_name, optimizer=name, impl=impl, wall_ms=wall, kernel_ms=kern,
                           host_ms=wall - kern, floor_ms=floor, kernel_pct_bw=100 * floor / kern,
                           wall_pct_bw=100 * floor / wall)
                rows.append(row)
                print(f"{set_name:12s} {name:13s} {impl:14s} wall {wall:7.3f} ms  kernels {kern:7.3f} ms  "
                      f"floor {floor:6.3f} ms  kernels at {row['kernel_pct_bw']:5.1f}% BW, step at "
                      f"{row['wall_pct_bw']:5.1f}%", flush=True)
                del params, opt
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth_gbps": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
