"""Gradient clipping benchmark: the fused multi-tensor norm vs torch's, and a clipped Adam step
(``Adam(max_grad_norm=)``: one norm pass, the scale folded into the update) vs torch's
``clip_grad_norm_`` followed by its fused / foreach Adam."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from .. import optim as ft_optim
from ..clip import get_total_norm
from .common import Progress, Result, timed_rows
from .optim import _make, param_cases

__all__ = ["run", "DEFAULT_SETS"]

DEFAULT_SETS = {"cpu": ["resnet50", "large-98"], "cuda": ["gpt2-medium", "resnet50"]}
MAX_NORM = 1.0  # below the random gradients' norm: clipping is active


def run(device: torch.device, sets: list[str] | None, reps: int, warmup: int, bandwidth: float,
        progress: bool = True) -> list[Result]:
    sets = sets or DEFAULT_SETS[device.type]
    bar = Progress(2 * len(sets), progress)
    results: list[Result] = []
    for set_name, shapes, numel, label in param_cases(sets):

        bar.begin(f"{set_name} gradient norm")
        grads = [p.grad for p in _make(shapes, device)]
        rows = timed_rows("clip", f"gradient 2-norm, {label}", device, numel, bandwidth, {
            "torch get_total_norm (_foreach_norm)": (lambda: torch.nn.utils.get_total_norm(grads), 4)
            if hasattr(torch.nn.utils, "get_total_norm") else
            (lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))), 4),
            "fusedtrain get_total_norm": (lambda: get_total_norm(grads), 4),
        }, reps, warmup)
        rows[-1].vs_best_torch = rows[0].median_ms / rows[-1].median_ms
        results += rows
        del grads
        bar.step(f"{set_name} gradient norm")

        bar.begin(f"{set_name} clip + Adam")
        steps: dict[str, tuple[Callable[[], Any], int]] = {}
        keep: list[Any] = []
        for impl, flags in (("torch clip_grad_norm_ + fused Adam", dict(fused=True)),
                            ("torch clip_grad_norm_ + foreach Adam", dict(foreach=True))):
            try:
                params = _make(shapes, device)
                opt = torch.optim.Adam(params, lr=1e-3, **flags)
                opt.step()
            except (RuntimeError, ValueError, TypeError):
                continue

            def torch_step(params: list[torch.Tensor] = params, opt: torch.optim.Optimizer = opt) -> None:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
                opt.step()

            steps[impl] = (torch_step, 40)  # norm read 4 + scale read/write 8 + Adam 28
            keep.append(opt)
        ours = ft_optim.Adam(_make(shapes, device), lr=1e-3, max_grad_norm=MAX_NORM)
        ours.step()
        steps["fusedtrain Adam(max_grad_norm=)"] = (ours.step, 32)  # norm read 4 + Adam 28
        rows = timed_rows("clip", f"clip_grad_norm_ + Adam, {label}", device, numel, bandwidth, steps, reps, warmup)
        best = min(r.median_ms for r in rows[:-1]) if len(rows) > 1 else None
        if best:
            rows[-1].vs_best_torch = best / rows[-1].median_ms
        results += rows
        bar.step(f"{set_name} clip + Adam")
        del steps, keep, ours
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
