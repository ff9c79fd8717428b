"""Where a cold host step goes: fusedtrain's Adam step over one-element CPU tensors, split into parts, each timed
right after something that evicts the caches (a 64 MB read, or torch's for-loop Adam step over as many tensors,
which is what precedes fusedtrain's step in 3 of 4 rounds of ``python -m fusedtrain.bench --family host``) and
again with warm caches. The measurements behind benchmarks/NOTES.md "Cold step, fourth pass".

    python benchmarks/host_cold_parts.py [--tensors 2004] [--reps 40]

Parts (medians, microseconds):
- the fixed cost, on a one-tensor optimizer: ``step()`` (torch's hook runner and profiler range around it), the
  step without that wrapper, ``_step_planned`` (the Python of Note [the step]), the plan's C++ step alone, the
  plan's validation alone (``check``); and for scale, torch's ``record_function`` range and ``_RecordFunctionFast``;
- per tensor, on the N-tensor optimizer: the step, the validation alone, and the step right after a validation
  (its objects then cached: the rest is the update pass and the fixed cost).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import fusedtrain.optim as fo
from fusedtrain import _ops
from fusedtrain.bench.host import _params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=2004)
    ap.add_argument("--reps", type=int, default=40)
    args = ap.parse_args()
    cpu = torch.device("cpu")
    one = fo.Adam(_params(1, cpu), lr=1e-3)
    many = fo.Adam(_params(args.tensors, cpu), lr=1e-3)
    loop = torch.optim.Adam(_params(args.tensors, cpu), lr=1e-3, foreach=False)
    for opt in (one, many, loop):
        opt.step()
    sweep = torch.ones(8 << 20, dtype=torch.float64)  # 64 MB

    def parts(opt: fo.Adam) -> dict[str, Callable[[], object]]:
        plan = opt.__dict__["_ft_plan"]
        groups = [g["params"] for g in opt.param_groups]
        hyper = [_ops.hyper_list(opt._rule, opt._hyper(g)) for g in opt.param_groups]
        unwrapped = type(opt).step.__wrapped__
        return {
            "step()": opt.step,
            "step() without torch's hook runner": lambda: unwrapped(opt),
            "_step_planned (Python and C++)": opt._step_planned,
            "the plan's C++ step": lambda: plan.impl.step(groups, opt.state, hyper, [1e-3], [0.0], None, None, None,
                                                          None, 0.0, None, None),
            "the plan's validation (check)": lambda: plan.impl.check(groups, opt.state),
        }

    def timed(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    from torch._C._profiler import _RecordFunctionFast

    def rf_slow() -> None:
        with torch.autograd.profiler.record_function("Optimizer.step#Adam.step"):
            pass

    def rf_fast() -> None:
        with _RecordFunctionFast("Optimizer.step#Adam.step"):
            pass

    fixed = {**parts(one), "torch record_function range": rf_slow, "_RecordFunctionFast range": rf_fast}
    check_many = parts(many)["the plan's validation (check)"]
    per_tensor = {"step()": many.step, "the plan's validation (check)": check_many,
                  "step() right after a validation": many.step}
    polluters = {"after a 64 MB read": lambda: sweep.sum(), "after torch's for-loop step": loop.step}
    res: dict[str, list[float]] = {}
    for _ in range(args.reps):
        for pname, pollute in polluters.items():
            for name, fn in fixed.items():
                pollute()
                res.setdefault(f"1 tensor | {name} | {pname}", []).append(timed(fn))
            for name, fn in per_tensor.items():
                pollute()
                if name.endswith("after a validation"):
                    check_many()
                res.setdefault(f"{args.tensors} tensors | {name} | {pname}", []).append(timed(fn))
        warm = [(f"1 tensor | {k}", fn) for k, fn in fixed.items()]
        warm += [(f"{args.tensors} tensors | {k}", fn) for k, fn in per_tensor.items() if "after" not in k]
        for label, fn in warm:
            for _ in range(3):
                fn()
            res.setdefault(f"{label} | warm", []).append(timed(fn))
    print(f"fusedtrain Adam, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; medians of {args.reps}, microseconds")
    for key in sorted(res, key=lambda k: (k.split(" | ")[0], k.split(" | ")[1], k.split(" | ")[2])):
        print(f"  {key:<90s} {statistics.median(res[key]):9.1f}")


if __name__ == "__main__":
    main()
