"""Optimizer-step benchmark: fusedtrain vs torch.optim (for-loop, foreach, fused) on realistic shapes."""

from __future__ import annotations

import gc
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import optim as ft_optim
from .common import Progress, Result, measure_interleaved, summarize

__all__ = ["PARAM_SETS", "OPTIMIZERS", "param_shapes", "param_cases", "run"]


def _gpt2_medium() -> list[tuple[int, ...]]:
    """GPT-2 medium: 24 layers, d=1024, vocab 50257, context 1024 (354.8 M parameters, 292 tensors)."""
    d, shapes = 1024, [(50257, 1024), (1024, 1024)]
    for _ in range(24):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def _resnet50() -> list[tuple[int, ...]]:
    """torchvision ResNet-50's parameter shapes (25.6 M parameters, 161 tensors)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = width * 4
            for co, ci, k in ((width, cin, 1), (width, width, 3), (out, width, 1)):
                shapes += [(co, ci, k, k), (co,), (co,)]
            if b == 0:
                shapes += [(out, cin, 1, 1), (out,), (out,)]
            cin = out
    return shapes + [(1000, 2048), (1000,)]


def _large98() -> list[tuple[int, ...]]:
    """98 large matrices, 83.4 M parameters: bandwidth-bound on a CPU."""
    return [(1024, 1024)] * 49 + [(1024, 640)] * 49


def _small2004() -> list[tuple[int, ...]]:
    """2004 small tensors, about 11 M parameters: per-tensor overhead dominates."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(64, 10_900, (2004,), generator=g)
    return [(int(s),) for s in sizes]


PARAM_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2-medium": _gpt2_medium,
    "resnet50": _resnet50,
    "large-98": _large98,
    "small-2004": _small2004,
}
DEFAULT_SETS = {"cpu": ["resnet50", "large-98", "small-2004"], "cuda": ["gpt2-medium", "resnet50"]}

# name -> (class name, kwargs, bytes moved per fp32 parameter by one fused pass)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any], int]] = {
    "Adam": ("Adam", dict(lr=1e-3), 28),
    "AdamW": ("AdamW", dict(lr=1e-3), 28),
    "SGD momentum": ("SGD", dict(lr=1e-2, momentum=0.9), 20),
    "SGD nesterov": ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True), 20),
    "Adagrad": ("Adagrad", dict(lr=1e-2), 20),
    "RMSprop": ("RMSprop", dict(lr=1e-2), 20),
}

# LAMB / LARS (issue 16): no torch.optim class; timm's implementations are the reference side. Bytes: the
# global gradient norm (LAMB's max_grad_norm), then the two passes of Note [trust-ratio passes].
OPTIMIZERS.update({
    "Lamb": ("Lamb", dict(lr=1e-3), 44),
    "Lars": ("Lars", dict(lr=0.1, momentum=0.9, weight_decay=1e-4), 28),
})
# Optimizers without a torch.optim class: the module of the reference implementation their rows compare to
# (the "torch ..." rows are labelled with its package name).
REFERENCES: dict[str, str] = {"Lamb": "timm.optim", "Lars": "timm.optim"}

IMPLS = {
    "torch for-loop": dict(foreach=False),
    "torch foreach": dict(foreach=True),
    "torch fused": dict(fused=True),
    "fusedtrain": {},
}


def param_shapes(name: str) -> list[tuple[int, ...]]:
    return PARAM_SETS[name]()


def _numel(shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def param_cases(sets: list[str]) -> Iterator[tuple[str, list[tuple[int, ...]], int, str]]:
    """(name, shapes, parameter count, table label) of each named parameter set."""
    for set_name in sets:
        shapes = param_shapes(set_name)
        numel = _numel(shapes)
        yield set_name, shapes, numel, f"{set_name} ({numel / 1e6:.1f} M, {len(shapes)} tensors)"


def _make(shapes: list[tuple[int, ...]], device: torch.device) -> list[torch.Tensor]:
    params = [torch.randn(s, device=device) for s in shapes]
    for p in params:
        p.requires_grad_()
        p.grad = torch.randn_like(p)
    return params


def run(device: torch.device, sets: list[str] | None, optimizers: list[str] | None, reps: int, warmup: int,
        bandwidth: float, progress: bool = True) -> list[Result]:
    sets = sets or DEFAULT_SETS[device.type]
    names = optimizers or list(OPTIMIZERS)
    results: list[Result] = []
    bar = Progress(len(sets) * len(names), progress)  # one tick per measured group
    for set_name, shapes, numel, case_label in param_cases(sets):
        for name in names:
            cls_name, kwargs, bytes_per_param = OPTIMIZERS[name]
            bar.begin(f"{set_name} {name}")
            rows: dict[str, Result] = {}
            steps: dict[str, Callable[[], Any]] = {}
            ref_module = REFERENCES.get(cls_name, "torch.optim")
            for impl, flags in IMPLS.items():
                label = impl if impl == "fusedtrain" else impl.replace("torch", ref_module.split(".")[0], 1)
                rows[label] = Result("optim", f"{name}, {case_label}", label, str(device), None,
                                     bytes_moved=numel * bytes_per_param)
                try:
                    cls = getattr(ft_optim if impl == "fusedtrain" else importlib.import_module(ref_module), cls_name)
                    opt = cls(_make(shapes, device), **kwargs, **flags)
                    opt.step()
                    steps[label] = opt.step
                except (RuntimeError, ValueError, TypeError) as exc:
                    rows[label].note = f"not available: {str(exc).splitlines()[0][:60]}"
            times = measure_interleaved(steps, device, warmup, reps)
            bar.step(f"{set_name} {name}")
            for impl, ts in times.items():
                row = rows[impl]
                row.median_ms, row.p20_ms, row.p80_ms = summarize(ts)
                row.gbps = row.bytes_moved / row.median_ms / 1e6
                row.pct_bw = 100 * row.gbps / bandwidth if bandwidth else None
            steps.clear()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch_times = [r.median_ms for k, r in rows.items() if k != "fusedtrain" and r.median_ms is not None]
            ours = rows["fusedtrain"]
            if torch_times and ours.median_ms:
                ours.vs_best_torch = min(torch_times) / ours.median_ms
            results += list(rows.values())
    return results
