"""Command line of ``python -m fusedtrain.bench [--device cpu|cuda] [--family optim] [--quick] [--json PATH]
[--plot PATH] ...`` (also installed as the ``fusedtrain-bench`` console script)."""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone
from typing import Any

import torch

from .._build import build_info
from . import clip as clip_bench
from . import dropout as dropout_bench
from . import augment as augment_bench
from . import ema as ema_bench
from . import host as host_bench
from . import lowbit as lowbit_bench
from . import mixed as mixed_bench
from . import optim as optim_bench
from . import train as train_bench
from .common import PROBE_EXPLANATION, format_table, machine_load, measure_bandwidth, noise_warnings
from .plot import check_matplotlib, plot_breakdown, plot_ratios

FAMILIES = ["optim", "lowbit", "host", "ema", "clip", "mixed", "dropout", "augment", "train"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fusedtrain.bench",
        description="Benchmark fusedtrain against torch on this machine: each family times fusedtrain and torch's "
                    "implementations of the same work call by call (interleaved) and prints one row per "
                    "implementation: median, p20 and p80 in ms, GB/s, % probe, and torch's best time over ours.",
        epilog=PROBE_EXPLANATION + " Warnings follow the table when the numbers are noise: a row whose p80 / p20 "
               "spread is wide, or a machine busy with other work (load average above half the CPUs). --quick "
               "is a first look with few calls per row: on a busy machine every family takes several times "
               "longer than on an idle one.")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--family", action="append", choices=FAMILIES, help="benchmark family (repeatable; default all)")
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated parameter sets: {', '.join(optim_bench.PARAM_SETS)}")
    p.add_argument("--optimizers", default=None,
                   help=f"comma-separated optimizers: {', '.join(optim_bench.OPTIMIZERS)}")
    p.add_argument("--quick", action="store_true",
                   help="a first look: 5 timed calls per row after 1 warm-up, one parameter set (resnet50), "
                        f"the optimizers {', '.join(optim_bench.QUICK_OPTIMIZERS)} (unless --optimizers), fewer "
                        "host cases, smaller dropout tensors, tiny train models")
    p.add_argument("--full", action="store_true",
                   help="every parameter set of every family (on a CPU the default is one set per family)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per row")
    p.add_argument("--batch", type=int, default=None,
                   help="augment family: images per call (default 64 on CPU, 256 on CUDA)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results as JSON to this path")
    p.add_argument("--plot", dest="plot_path", default=None,
                   help="write a PNG bar chart of the speed-ups vs torch to this path (needs matplotlib)")
    p.add_argument("--compile", action="store_true",
                   help="train family: also the torch.compile variant of both sides (minutes of compiling on a CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _device(arg: str | None) -> torch.device:
    if arg is None:
        return torch.device("cuda" if torch.cuda.is_available() and build_info()["cuda"] else "cpu")
    try:
        dev = torch.device(arg)
    except RuntimeError as exc:
        raise SystemExit(f"fusedtrain.bench: unknown device {arg!r}: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"fusedtrain.bench: device {arg!r} is not supported; use cpu or cuda")
    if dev.type == "cuda" and not (torch.cuda.is_available() and build_info()["cuda"]):
        raise SystemExit("fusedtrain.bench: --device cuda needs a visible GPU and a build with CUDA kernels")
    return dev


def _split(arg: str | None, known: dict[str, Any], what: str) -> list[str] | None:
    if arg is None:
        return None
    items = [s.strip() for s in arg.split(",") if s.strip()]
    unknown = [s for s in items if s not in known]
    if unknown:
        raise SystemExit(f"fusedtrain.bench: unknown {what} {unknown}; choose from {list(known)}")
    return items


def _check_output(path: str | None, option: str) -> None:
    """Fails before the benchmark runs, not after it, when an output file cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"fusedtrain.bench: {option} {path!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise SystemExit(f"fusedtrain.bench: {option} {path!r} is a folder; give a file name")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = _device(args.device)
    sets = _split(args.sizes, optim_bench.PARAM_SETS, "parameter set")
    optimizers = _split(args.optimizers, optim_bench.OPTIMIZERS, "optimizer")
    if optimizers is None and args.quick:
        optimizers = list(optim_bench.QUICK_OPTIMIZERS)
    _check_output(args.json_path, "--json")
    _check_output(args.plot_path, "--plot")
    if args.plot_path:
        check_matplotlib()
    if args.quick and args.full:
        raise SystemExit("fusedtrain.bench: --quick and --full exclude each other")
    if sets is None and (args.quick or (device.type == "cpu" and not args.full)):
        sets = ["resnet50"]  # one realistic set per family; --full (or --sizes) for the rest
    reps = args.reps or (5 if args.quick or (device.type == "cpu" and not args.full) else
                         (20 if device.type == "cuda" else 10))
    info = build_info()
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "fusedtrain": info,
    }
    print(f"fusedtrain {info['version']} | torch {env['torch']} | {env['device']} | {env['date']}", flush=True)
    load_before = machine_load()
    bandwidth = measure_bandwidth(device, args.quick)
    env["bandwidth_gbps"] = bandwidth
    what = "device copy" if device.type == "cuda" else "in-place add"
    print(f"bandwidth probe ({what}, bytes read + written): {bandwidth:.0f} GB/s; the '% probe' column is each "
          "row's GB/s as a percentage of it (--help explains why a row may exceed 100 %)", flush=True)
    warmup = 1 if args.quick else 3  # untimed calls before each row (the first builds the state)
    results = []
    for family in args.family or FAMILIES:
        if family == "optim":
            results += optim_bench.run(device, sets, optimizers, reps, warmup=warmup, bandwidth=bandwidth,
                                       progress=not args.no_progress)
        elif family == "lowbit":
            results += lowbit_bench.run(device, sets, reps, warmup=warmup, bandwidth=bandwidth,
                                        progress=not args.no_progress)
        elif family == "host":
            counts = host_bench.COUNTS[:2] if args.quick else host_bench.COUNTS
            results += host_bench.run(device, reps, warmup=warmup, progress=not args.no_progress, counts=counts)
        elif family == "ema":
            results += ema_bench.run(device, sets, reps, warmup=warmup, bandwidth=bandwidth,
                                     progress=not args.no_progress)
        elif family == "clip":
            results += clip_bench.run(device, sets, reps, warmup=warmup, bandwidth=bandwidth,
                                      progress=not args.no_progress)
        elif family == "mixed":
            results += mixed_bench.run(device, sets, reps, warmup=warmup, bandwidth=bandwidth,
                                       progress=not args.no_progress)
        elif family == "dropout":
            results += dropout_bench.run(device, reps, warmup=max(1, warmup - 1), bandwidth=bandwidth,
                                         progress=not args.no_progress, quick=args.quick)
        elif family == "augment":
            results += augment_bench.run(device, reps, warmup=max(1, warmup - 1), bandwidth=bandwidth,
                                         progress=not args.no_progress, batch=args.batch,
                                         layouts=("NCHW", "NHWC"))
        elif family == "train":
            results += train_bench.run(device, args.reps, progress=not args.no_progress, quick=args.quick,
                                       compile=args.compile)
    print(format_table(results))
    warnings = noise_warnings(results, load_before, machine_load(), torch.get_num_threads())
    for line in warnings:
        print(line)
    env["warnings"] = warnings
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"env": env, "results": [r.as_dict() for r in results]}, f, indent=1)
        print(f"wrote {args.json_path}")
    if args.plot_path:
        plot_ratios(results, args.plot_path, f"fusedtrain {info['version']} vs torch {env['torch']}, {env['device']}"
                    f" ({env['threads']} threads), {env['date']}")
        print(f"wrote {args.plot_path}")
        if any(r.family == "train" for r in results):  # the per-phase picture next to it
            root, ext = os.path.splitext(args.plot_path)
            breakdown = f"{root}-breakdown{ext or '.png'}"
            threads = f"{env['threads']} thread{'s' * (env['threads'] != 1)}"
            plot_breakdown(results, breakdown, f"one training iteration: torch's parts vs fusedtrain's, "
                           f"{env['device']} ({threads}), torch {env['torch']}, {env['date']}")
            print(f"wrote {breakdown}")
    return 0


