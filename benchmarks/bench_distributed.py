"""Optimizer step on an FSDP2-sharded model (DTensor parameters): fusedtrain vs torch.optim, 2 CPU ranks.

    python benchmarks/bench_distributed.py [--layers 8] [--width 512] [--reps 40] [--json out.json]

Spawns 2 processes (gloo, one thread each), shards an MLP with ``fully_shard`` per layer, fills the
gradients with one backward pass, and times ``opt.step()`` of each implementation, interleaved call by
call with an untimed barrier before each (each keeps its own state; they share the parameters, with a
tiny lr). ``+clip`` rows include the
gradient norm across the shards: fusedtrain's ``max_grad_norm=`` against ``torch.nn.utils.clip_grad_norm_``
then ``step()``. Rank 0 prints the table. Not a ``python -m fusedtrain.bench`` family: it needs a process
group, which the CLI's in-process families do not set up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedtrain
from fusedtrain.bench.common import summarize


def _interleaved_in_lockstep(fns: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, list[float]]:
    """measure_interleaved's rotation, with an untimed barrier before each call: the ranks start every
    call together, so a collective inside one (the norm's all-reduce) waits for the other rank's share of
    that call only, not for whatever that rank was still finishing."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            dist.barrier()
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model(torch.randn(4, args.width)).square().mean().backward()
    params = list(model.parameters())
    local = sum(p.to_local().numel() for p in params)
    lr, max_norm = 1e-7, 1e-3
    opts: dict[str, Any] = {
        "fusedtrain": fusedtrain.optim.Adam(params, lr=lr),
        "torch foreach": torch.optim.Adam(params, lr=lr, foreach=True),
        "torch for-loop": torch.optim.Adam(params, lr=lr, foreach=False),
        "torch fused": torch.optim.Adam(params, lr=lr, fused=True),
        "fusedtrain +clip": fusedtrain.optim.Adam(params, lr=lr, max_grad_norm=max_norm),
    }
    grads = [p.grad.clone() for p in params]

    def torch_clip_step(opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
            for p, g in zip(params, grads):  # clipping rewrote the gradients: restore them (timed, small)
                p.grad.to_local().copy_(g.to_local())
        return run

    fns = {name: opt.step for name, opt in opts.items()}
    fns["torch foreach +clip"] = torch_clip_step(torch.optim.Adam(params, lr=lr, foreach=True))
    fns["torch fused +clip"] = torch_clip_step(torch.optim.Adam(params, lr=lr, fused=True))
    times = _interleaved_in_lockstep(fns, warmup=3, reps=args.reps)
    if rank == 0:
        rows = []
        for name, ts in times.items():
            med, p20, p80 = summarize(ts)
            rows.append({"impl": name, "median_ms": med, "p20_ms": p20, "p80_ms": p80})
        base = {r["impl"]: r["median_ms"] for r in rows}
        print(f"FSDP2 2 ranks (gloo, 1 thread each), {args.layers} x Linear({args.width}): "
              f"{len(params)} DTensors, {local} local elements per rank, torch {torch.__version__}")
        print(f"{'impl':22s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'torch fused / this':>19s}")
        for r in rows:
            ref = base["torch fused +clip" if "clip" in r["impl"] else "torch fused"]
            print(f"{r['impl']:22s} {r['median_ms']:10.3f} {r['p20_ms']:8.3f} {r['p80_ms']:8.3f} "
                  f"{ref / r['median_ms']:19.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"layers": args.layers, "width": args.width, "local_numel": local,
                           "torch": torch.__version__, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(args, port), nprocs=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
