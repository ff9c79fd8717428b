"""Augmentation benchmark: random resized crop 256 -> 224 + horizontal flip + colour jitter (0.4, 0.4, 0.4) +
normalize of a uint8 batch, fusedtrain's one op (per-sample parameters) against torchvision v2 applied per
sample in a loop (per-sample parameters, the usual Dataset pipeline) and on the whole batch (one parameter
set for all images).

Bytes per image of the floor: the float32 output written once (C * 224^2 * 4 = 602,112 B) plus at most the
whole uint8 input read once (C * 256^2 = 196,608 B): 798,720 B.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from ..augment import BatchAugment
from ..augment import functional as AF
from .common import Progress, Result, measure_interleaved

__all__ = ["run", "BATCH", "IN_SIZE", "OUT_SIZE"]

BATCH = {"cpu": 64, "cuda": 256}
IN_SIZE, OUT_SIZE, JITTER = 256, 224, 0.4
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _torchvision(antialias: bool) -> Any:
    """torchvision v2's version of the pipeline (a ``Compose``)."""
    import torchvision.transforms.v2 as T

    return T.Compose([
        T.RandomResizedCrop(OUT_SIZE, antialias=antialias),
        T.RandomHorizontalFlip(),
        T.ColorJitter(JITTER, JITTER, JITTER),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(MEAN, STD),
    ])


def run(device: torch.device, reps: int, warmup: int, bandwidth: float, progress: bool = True,
        batch: int | None = None, layouts: tuple[str, ...] = ("NCHW",)) -> list[Result]:
    """Images per second of each implementation on ``batch`` random uint8 images (interleaved timing).

    Args:
        device: where the images live and the work runs.
        reps, warmup: timed and untimed calls per implementation.
        bandwidth: the machine's measured bandwidth (GB/s) for the % of the floor.
        batch: images per call (default 64 on CPU, 256 on CUDA).
        layouts: input layouts for fusedtrain ("NCHW", "NHWC"); torchvision reads NCHW.

    Returns:
        One :class:`Result` per implementation; ``extra["images_per_s"]`` holds the throughput.
    """
    try:
        import torchvision  # noqa: F401
    except ImportError:  # pragma: no cover - torchvision is in the dev setup
        print("fusedtrain.bench: torchvision is not installed; skipping the augment family")
        return []
    n = batch or BATCH[device.type]
    bar = Progress(1, progress)
    bar.step(f"augment {n} x 3 x {IN_SIZE}^2 -> {OUT_SIZE}^2")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, IN_SIZE, IN_SIZE), dtype=torch.uint8, generator=gen).to(device)
    nhwc = images.permute(0, 2, 3, 1).contiguous() if "NHWC" in layouts else None
    tv_plain, tv_aa = _torchvision(False), _torchvision(True)
    ours = BatchAugment(OUT_SIZE, brightness=JITTER, contrast=JITTER, saturation=JITTER, mean=MEAN, std=STD)
    ours_aa = BatchAugment(OUT_SIZE, brightness=JITTER, contrast=JITTER, saturation=JITTER, mean=MEAN, std=STD,
                           antialias=True)
    ours_nhwc = BatchAugment(OUT_SIZE, brightness=JITTER, contrast=JITTER, saturation=JITTER, mean=MEAN, std=STD,
                             layout="NHWC")
    params = ours.sample_params(images, seed=1)
    keep: list[torch.Tensor] = []  # the last output of each, so allocation is part of every call

    def keeping(make: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def f() -> None:
            keep[:] = [make()]
        return f

    def loop(tf: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        return keeping(lambda: torch.stack([tf(img) for img in images]))

    fns: dict[str, Callable[[], None]] = {
        "torchvision v2 per-sample loop (antialias=False)": loop(tv_plain),
        "torchvision v2 per-sample loop (antialias=True, v2 default)": loop(tv_aa),
        "torchvision v2 whole batch (one parameter set)": keeping(lambda: tv_plain(images)),
        "fusedtrain BatchAugment (per-sample)": keeping(lambda: ours(images)),
        "fusedtrain functional.augment (parameters given)": keeping(lambda: AF.augment(
            images, params.boxes, params.flips, params.brightness, params.contrast, params.saturation,
            size=OUT_SIZE, mean=MEAN, std=STD)),
        "fusedtrain BatchAugment (per-sample), antialias=True": keeping(lambda: ours_aa(images)),
    }
    if nhwc is not None:
        fns["fusedtrain BatchAugment (per-sample), NHWC input"] = keeping(lambda: ours_nhwc(nhwc))
    if device.type == "cuda":  # the loops are launch-bound there: a few calls say enough
        loop_names = [k for k in fns if "loop" in k]
        slow = {k: fns.pop(k) for k in loop_names}
        times = measure_interleaved(fns, device, warmup, reps)
        times.update(measure_interleaved(slow, device, 1, max(3, reps // 5)))
    else:
        times = measure_interleaved(fns, device, warmup, reps)
    bytes_per_image = 3 * OUT_SIZE * OUT_SIZE * 4 + 3 * IN_SIZE * IN_SIZE
    case = f"{n} x uint8 3x{IN_SIZE}x{IN_SIZE} -> {OUT_SIZE}, RRC + flip + jitter {JITTER} + normalize"
    rows = []
    for impl, ts in times.items():
        r = Result("augment", case, impl, str(device), None, bytes_moved=n * bytes_per_image)
        r.record(ts, bandwidth)
        r.extra = {"images_per_s": n / r.median_ms * 1e3, "batch": n, "bytes_per_image": bytes_per_image}
        rows.append(r)
    by = {r.impl: r for r in rows}
    loop_ms = by["torchvision v2 per-sample loop (antialias=False)"].median_ms
    batch_ms = by["torchvision v2 whole batch (one parameter set)"].median_ms
    loop_aa_ms = by["torchvision v2 per-sample loop (antialias=True, v2 default)"].median_ms
    for r in rows:
        ips = r.extra["images_per_s"]
        if "antialias=True" in r.impl and r.impl.startswith("fusedtrain"):
            r.vs_best_torch = loop_aa_ms / r.median_ms
            r.note = f"{ips:,.0f} img/s; {loop_aa_ms / r.median_ms:.1f}x the antialiased loop"
        elif r.impl.startswith("fusedtrain"):
            r.vs_best_torch = loop_ms / r.median_ms
            r.note = f"{ips:,.0f} img/s; {loop_ms / r.median_ms:.1f}x the loop, {batch_ms / r.median_ms:.2f}x the batch"
        else:
            r.note = f"{ips:,.0f} img/s"
    del images, nhwc, keep
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows
