"""8-bit and 4-bit optimizer states (state_bits=8, 4): state memory per parameter and step time against float32
states, measured interleaved in one run (benchmarks/NOTES.md, "8-bit optimizer states", "4-bit optimizer
states").

    PYTHONPATH=python python benchmarks/bench_8bit.py --sizes resnet50 --reps 15

bitsandbytes' AdamW8bit joins the table when it is importable (its CPU build runs its own CPU kernels).
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

import fusedtrain
import torch
from fusedtrain.bench.common import measure_interleaved, summarize
from fusedtrain.bench.optim import param_shapes


def _params(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    ps = [torch.randn(s).requires_grad_() for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k not in ("step", "qmap1", "qmap2"):
                total += v.numel() * v.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="resnet50")
    ap.add_argument("--optimizer", default="AdamW", choices=["Adam", "AdamW"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    impls: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
        "fusedtrain 32-bit states": lambda ps: getattr(fusedtrain.optim, args.optimizer)(ps, lr=1e-3),
        "fusedtrain 8-bit states": lambda ps: getattr(fusedtrain.optim, args.optimizer)(ps, lr=1e-3, state_bits=8),
        "fusedtrain 4-bit states": lambda ps: getattr(fusedtrain.optim, args.optimizer)(ps, lr=1e-3, state_bits=4),
        "torch fused (32-bit)": lambda ps: getattr(torch.optim, args.optimizer)(ps, lr=1e-3, fused=True),
    }
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]

        impls["bitsandbytes 8-bit"] = lambda ps: getattr(bnb.optim, args.optimizer + "8bit")(ps, lr=1e-3)
    except ImportError:
        pass
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fusedtrain "
          f"{fusedtrain.build_info().get('cpu_isa', '?')}")
    for name in args.sizes.split(","):
        shapes = param_shapes(name)
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        steps: dict[str, Callable[[], Any]] = {}
        nbytes: dict[str, int] = {}
        for label, make in impls.items():
            opt = make(_params(shapes))
            opt.step()
            nbytes[label] = _state_bytes(opt)
            steps[label] = opt.step
        times = measure_interleaved(steps, torch.device("cpu"), args.warmup, args.reps)
        base = summarize(times["fusedtrain 32-bit states"])[0]
        print(f"\n{args.optimizer}, {name}: {numel / 1e6:.1f} M parameters, {len(shapes)} tensors")
        print(f"{'implementation':28s} {'state B/param':>13s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} "
              f"{'vs 32-bit':>9s}")
        for label, ts in times.items():
            med, p20, p80 = summarize(ts)
            print(f"{label:28s} {nbytes[label] / numel:13.3f} {med:10.2f} {p20:8.2f} {p80:8.2f} {med / base:8.2f}x")
        steps.clear()
        gc.collect()


if __name__ == "__main__":
    main()
