"""EMA benchmark: the fused averaging kernel vs ``torch._foreach_lerp_``, and an optimizer step that
updates the averages in the same pass vs a step followed by a separate averaging pass."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import optim as ft_optim
from ..ensemble import EMA
from ..optim import functional as F
from .common import Progress, Result, timed_rows
from .optim import _make, param_cases

__all__ = ["run", "DEFAULT_SETS"]

DEFAULT_SETS = {"cpu": ["resnet50", "large-98"], "cuda": ["gpt2-medium", "resnet50"]}
WEIGHT = 1e-3  # 1 - decay


def _as_module(params: list[torch.Tensor]) -> nn.Module:
    m = nn.Module()
    m.ps = nn.ParameterList([nn.Parameter(p.detach(), requires_grad=True) for p in params])
    for q, p in zip(m.ps, params):
        q.grad = p.grad
    return m


def _rows(case: str, device: torch.device, numel: int, bandwidth: float,
          fns: dict[str, tuple[Callable[[], Any], int]], reps: int, warmup: int) -> list[Result]:
    return timed_rows("ema", case, device, numel, bandwidth, fns, reps, warmup)


def run(device: torch.device, sets: list[str] | None, reps: int, warmup: int, bandwidth: float,
        progress: bool = True) -> list[Result]:
    sets = sets or DEFAULT_SETS[device.type]
    bar = Progress(2 * len(sets), progress)
    results: list[Result] = []
    for set_name, shapes, numel, label in param_cases(sets):

        bar.begin(f"{set_name} EMA update")
        params = [p.detach() for p in _make(shapes, device)]
        avgs_ours = [p.clone() for p in params]
        avgs_torch = [p.clone() for p in params]
        rows = _rows(f"EMA update, {label}", device, numel, bandwidth, {
            "torch _foreach_lerp_": (lambda: torch._foreach_lerp_(avgs_torch, params, WEIGHT), 12),
            "fusedtrain": (lambda: F.ema(avgs_ours, params, weight=WEIGHT), 12),
        }, reps, warmup)
        rows[-1].vs_best_torch = rows[0].median_ms / rows[-1].median_ms
        results += rows
        bar.step(f"{set_name} EMA update")
        del params, avgs_ours, avgs_torch

        bar.begin(f"{set_name} Adam step + EMA")
        m_alone, m_fused = _as_module(_make(shapes, device)), _as_module(_make(shapes, device))
        m_torch = _as_module(_make(shapes, device))
        ema_fused = EMA(m_fused, decay=1 - WEIGHT)
        opt_alone = ft_optim.Adam(m_alone.parameters())
        opt_fused = ft_optim.Adam(m_fused.parameters(), ema=ema_fused)
        fused_kw = {"fused": True} if device.type in ("cuda", "cpu") else {}
        opt_torch = torch.optim.Adam(m_torch.parameters(), **fused_kw)
        torch_avgs = [p.detach().clone() for p in m_torch.parameters()]
        torch_params = [p.detach() for p in m_torch.parameters()]

        def torch_step() -> None:
            opt_torch.step()
            torch._foreach_lerp_(torch_avgs, torch_params, WEIGHT)

        rows = _rows(f"Adam step + EMA, {label}", device, numel, bandwidth, {
            "torch fused Adam + _foreach_lerp_": (torch_step, 40),
            "fusedtrain Adam alone (no EMA)": (opt_alone.step, 28),
            "fusedtrain Adam(ema=)": (opt_fused.step, 36),
        }, reps, warmup)
        alone, fused = rows[1].median_ms, rows[2].median_ms
        rows[2].note = f"+{100 * (fused / alone - 1):.0f} % over the step alone"
        rows[2].vs_best_torch = rows[0].median_ms / fused
        results += rows
        bar.step(f"{set_name} Adam step + EMA")
        del m_alone, m_fused, m_torch, opt_alone, opt_fused, opt_torch, ema_fused, torch_avgs, torch_params
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
