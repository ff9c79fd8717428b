"""Mixed-precision optimizer steps: bfloat16 parameters and states (torch fused Adam vs fusedtrain, with and
without stochastic rounding), float32 master weights for bfloat16 parameters, and bfloat16 states for
float32 parameters."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from .. import optim as ft_optim
from .common import Progress, Result, timed_rows
from .optim import param_cases

__all__ = ["run", "DEFAULT_SETS"]

DEFAULT_SETS = {"cpu": ["resnet50"], "cuda": ["gpt2-medium", "resnet50"]}


def _params(shapes: list[tuple[int, ...]], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    params = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    for p in params:
        p.requires_grad_()
        p.grad = torch.randn_like(p)
    return params


def run(device: torch.device, sets: list[str] | None, reps: int, warmup: int, bandwidth: float,
        progress: bool = True) -> list[Result]:
    sets = sets or DEFAULT_SETS[device.type]
    bar = Progress(len(sets), progress)
    results: list[Result] = []
    bf16 = torch.bfloat16
    for set_name, shapes, numel, label in param_cases(sets):
        bar.begin(f"{set_name} mixed precision")
        # (implementation, optimizer factory, bytes per parameter moved by one fused pass)
        cases: list[tuple[str, Callable[[], torch.optim.Optimizer], int]] = [
            ("torch fused Adam, bf16 params + states", lambda: torch.optim.Adam(_params(shapes, device, bf16),
                                                                                fused=True), 14),
            ("fusedtrain Adam, bf16 params + states", lambda: ft_optim.Adam(_params(shapes, device, bf16)), 14),
            ("fusedtrain Adam, bf16 + stochastic rounding",
             lambda: ft_optim.Adam(_params(shapes, device, bf16), stochastic_rounding=True), 14),
            ("fusedtrain Adam, bf16 + fp32 master weights",
             lambda: ft_optim.Adam(_params(shapes, device, bf16), master_weights=True), 28),
            ("fusedtrain Adam, fp32 params + bf16 states",
             lambda: ft_optim.Adam(_params(shapes, device, torch.float32), state_dtype=bf16), 20),
        ]
        steps: dict[str, tuple[Callable[[], Any], int]] = {}
        for impl, make, nbytes in cases:
            try:
                opt = make()
                opt.step()
            except (RuntimeError, ValueError, TypeError):
                continue
            steps[impl] = (opt.step, nbytes)
        rows = timed_rows("mixed", f"Adam step, {label}", device, numel, bandwidth, steps, reps, warmup)
        ref = next((r.median_ms for r in rows if r.impl.startswith("torch")), None)
        for r in rows:
            if ref and not r.impl.startswith("torch"):
                r.vs_best_torch = ref / r.median_ms
        results += rows
        bar.step(f"{set_name} mixed precision")
        del steps
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
