"""Low-bit optimizer states (``state_bits``, Note [8-bit optimizer states]): one AdamW step with 8-bit (and, where
the optimizer offers them, 4-bit) states, timed side by side with the same step on float32 states, torch's fused
AdamW and bitsandbytes' ``AdamW8bit`` when it is importable. Each row's note gives its state bytes per parameter
and its time as a multiple of fusedtrain's float32-state step (issue 17's target: at most 1.0x); "vs best torch"
is torch's fused step over the row's time, as in every family."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from .. import optim as ft_optim
from .common import Progress, Result, measure_interleaved, shorten
from .optim import _make, param_cases

__all__ = ["DEFAULT_SETS", "run", "state_bytes"]

DEFAULT_SETS = {"cpu": ["resnet50"], "cuda": ["gpt2-medium"]}
LR = 1e-3

# label -> (constructor, bytes moved per float32 parameter: param r/w 8 + grad 4 + the states read and written)
_Make = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def _impls() -> dict[str, tuple[_Make, int]]:
    impls: dict[str, tuple[_Make, int]] = {
        "torch fused (32-bit states)": (lambda ps: torch.optim.AdamW(ps, lr=LR, fused=True), 28),
        "fusedtrain 32-bit states": (lambda ps: ft_optim.AdamW(ps, lr=LR), 28),
        "fusedtrain 8-bit states": (lambda ps: ft_optim.AdamW(ps, lr=LR, state_bits=8), 16),
        "fusedtrain 4-bit states": (lambda ps: ft_optim.AdamW(ps, lr=LR, state_bits=4), 14),
    }
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]

        impls["bitsandbytes AdamW8bit"] = (lambda ps: bnb.optim.AdamW8bit(ps, lr=LR), 16)
    except Exception:  # noqa: BLE001 - not installed, or installed without a backend for this machine
        pass
    return impls


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of per-parameter state tensors (codes, scales, float states; not the step counters or
    bitsandbytes' shared code maps)."""
    total = 0
    for st in opt.state.values():
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and key not in ("step", "qmap1", "qmap2"):
                total += value.numel() * value.element_size()
    return total


def run(device: torch.device, sets: list[str] | None, reps: int, warmup: int, bandwidth: float,
        progress: bool = True) -> list[Result]:
    sets = sets or DEFAULT_SETS[device.type]
    bar = Progress(len(sets), progress)
    results: list[Result] = []
    for set_name, shapes, numel, label in param_cases(sets):
        bar.begin(f"{set_name} AdamW state bits")
        rows: dict[str, Result] = {}
        steps: dict[str, Callable[[], Any]] = {}
        per_param: dict[str, float] = {}
        for impl, (make, nbytes) in _impls().items():
            rows[impl] = Result("lowbit", f"AdamW, {label}", impl, str(device), None, bytes_moved=numel * nbytes)
            try:
                opt = make(_make(shapes, device))
                opt.step()
            except (RuntimeError, ValueError, TypeError) as exc:
                if "state_bits" in str(exc):  # this build has no such states: no row
                    del rows[impl]
                else:
                    rows[impl].note = "not available: " + shorten(str(exc).splitlines()[0], 60)
                continue
            per_param[impl] = state_bytes(opt) / numel
            steps[impl] = opt.step
        times = measure_interleaved(steps, device, warmup, reps)
        bar.step(f"{set_name} AdamW state bits")
        for impl, ts in times.items():
            row = rows[impl]
            row.record(ts, bandwidth)
            row.extra["state_bytes_per_param"] = per_param[impl]
        base = rows["fusedtrain 32-bit states"].median_ms
        best_torch = rows["torch fused (32-bit states)"].median_ms
        for impl, row in rows.items():
            if row.median_ms is None:
                continue
            row.note = f"state {per_param[impl]:.3f} B/param"
            if base:
                row.note += f", {row.median_ms / base:.2f}x the 32-bit step"
                row.extra["vs_32bit_states"] = row.median_ms / base
            if impl.startswith("fusedtrain") and best_torch:
                row.vs_best_torch = best_torch / row.median_ms
        results += list(rows.values())
        steps.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
