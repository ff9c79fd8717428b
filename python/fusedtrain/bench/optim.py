"""Optimizer-step benchmark: fusedtrain vs torch.optim (for-loop, foreach, fused) on realistic shapes."""

from __future__ import annotations

import gc
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import optim as ft_optim
from .common import Progress, Result, measure_interleaved, shorten

__all__ = ["OPTIMIZERS", "PARAM_SETS", "REFERENCES", "param_cases", "param_shapes", "run"]


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
    # torch.optim's other element-wise optimizers (issue 15): (p, g, 2 states) read, (p, 2 states) written;
    # ASGD (p, g, ax) read, (p, ax) written. ASGD with t0=0 so that its averaging pass runs from step 2.
    "NAdam": ("NAdam", dict(lr=2e-3), 28),
    "RAdam": ("RAdam", dict(lr=1e-3), 28),
    "Adamax": ("Adamax", dict(lr=2e-3), 28),
    "Adadelta": ("Adadelta", dict(lr=1.0), 28),
    "ASGD": ("ASGD", dict(lr=1e-2, t0=0), 20),
    "Rprop": ("Rprop", dict(lr=1e-2), 28),
    # Beyond torch.optim (issue 16): the "torch" rows run the reference implementation (REFERENCES).
    "Lion": ("Lion", dict(lr=1e-4, weight_decay=0.1), 20),
    "ScheduleFreeAdamW": ("ScheduleFreeAdamW", dict(lr=2.5e-3), 28),
    "ScheduleFreeSGD": ("ScheduleFreeSGD", dict(lr=0.1), 20),
    # three sweeps (Note [Adafactor passes]): read g, p; read g; read g, p, write p (factored parameters)
    "Adafactor": ("Adafactor", dict(lr=1e-2), 24),
}

# Optimizers torch.optim does not have: "module:attribute" of the implementation the reference rows run
# (labelled with its package's name instead of "torch").
REFERENCES = {
    "Lion": "timm.optim:Lion",
    "ScheduleFreeAdamW": "schedulefree:AdamWScheduleFree",
    "ScheduleFreeSGD": "schedulefree:SGDScheduleFree",
}

# LAMB / LARS (issue 16): no torch.optim class; timm's implementations are the reference side. Bytes: the
# global gradient norm (LAMB's max_grad_norm), then the two passes of Note [trust-ratio passes].
OPTIMIZERS.update({
    "Lamb": ("Lamb", dict(lr=1e-3), 44),
    "Lars": ("Lars", dict(lr=0.1, momentum=0.9, weight_decay=1e-4), 28),
})
REFERENCES.update({"Lamb": "timm.optim:Lamb", "Lars": "timm.optim:Lars"})

# Cautious Lion (issue 16): a pass counting each tensor's mask (reads p, g, m) before Lion's update pass.
OPTIMIZERS["Lion caution"] = ("Lion", dict(lr=1e-4, weight_decay=0.1, caution=True), 32)

# The optimizers ``--quick`` times when ``--optimizers`` is not given: torch's three fused ones and one beyond
# torch (every optimizer on the resnet50 set took ~2 minutes on an idle 2-core CPU, the goal is under one).
QUICK_OPTIMIZERS = ["Adam", "AdamW", "SGD momentum", "Lion"]

IMPLS = {
    "torch for-loop": dict(foreach=False),
    "torch foreach": dict(foreach=True),
    "torch fused": dict(fused=True),
    "fusedtrain": {},
}


def _reference(cls_name: str) -> type[torch.optim.Optimizer]:
    """The class of the "torch" rows: torch.optim's, or the reference of an optimizer torch.optim lacks."""
    if cls_name not in REFERENCES:
        return getattr(torch.optim, cls_name)
    module, attr = REFERENCES[cls_name].split(":")
    return getattr(importlib.import_module(module), attr)


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


# Standard-normal values the benchmark tensors are filled from (two pools: parameters and gradients differ).
_POOL_SIZE = 1 << 20
_pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _filled(shape: tuple[int, ...], device: torch.device, which: int) -> torch.Tensor:
    """A float32 tensor of ``shape`` holding standard-normal values repeated from a fixed pool of 2^20.

    The step's time does not depend on the values (no data-dependent branches), and copying them is
    several times faster than drawing them: drawing 2 x 25.6 M values per implementation and optimizer
    took most of a ``--quick`` run on a busy 2-core CPU."""
    key = str(device)
    if key not in _pools:
        gen = torch.Generator().manual_seed(0)
        first = torch.randn(_POOL_SIZE, generator=gen).to(device)
        _pools[key] = (first, torch.randn(_POOL_SIZE, generator=gen).to(device))
    pool = _pools[key][which]
    out = torch.empty(shape, device=device)
    flat = out.view(-1)
    for start in range(0, flat.numel(), _POOL_SIZE):
        chunk = flat[start:start + _POOL_SIZE]
        chunk.copy_(pool[:chunk.numel()])
    return out


def _make(shapes: list[tuple[int, ...]], device: torch.device) -> list[torch.Tensor]:
    """Fresh float32 parameters of ``shapes`` with gradients (values: :func:`_filled`)."""
    params = [_filled(s, device, 0) for s in shapes]
    for p in params:
        p.requires_grad_()
        p.grad = _filled(p.shape, device, 1)
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
            package = REFERENCES.get(cls_name, "torch").split(".")[0].split(":")[0]
            for impl, flags in IMPLS.items():
                label = impl if impl == "fusedtrain" else impl.replace("torch", package, 1)
                rows[label] = Result("optim", f"{name}, {case_label}", label, str(device), None,
                                     bytes_moved=numel * bytes_per_param)
                try:
                    cls: Any = getattr(ft_optim, cls_name) if impl == "fusedtrain" else _reference(cls_name)
                    opt = cls(_make(shapes, device), **kwargs, **flags)
                    if hasattr(opt, "train"):  # schedule-free: steps need training mode
                        opt.train()
                    opt.step()
                    steps[label] = opt.step
                except (RuntimeError, ValueError, TypeError, ImportError) as exc:
                    rows[label].note = "not available: " + shorten(str(exc).splitlines()[0], 60)
            times = measure_interleaved(steps, device, warmup, reps)
            bar.step(f"{set_name} {name}")
            for impl, ts in times.items():
                row = rows[impl]
                row.record(ts, bandwidth)
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
