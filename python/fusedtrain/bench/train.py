"""Whole training iterations, built from torch's parts and from fusedtrain's, with a per-phase breakdown.

Two workloads, each run by two implementations of the same training ("sides") that share the
initial weights (one model is built, the other loads its state dict) and read the same batches:

- **transformer**: a GPT-2-style decoder: token + position embedding, pre-norm blocks (causal
  self-attention through ``torch.nn.functional.scaled_dot_product_attention``, GELU MLP), a tied head;
  dropout (p = 0.1) on the embeddings, on the attention probabilities and on both residual branches;
  AdamW (weight decay on matrices and embeddings only), gradient clipping at 1.0 and an EMA of the
  weights; bf16 autocast where the device computes in bf16 (GradScaler with fp16 on a CUDA device
  without bf16).

  * torch's parts: ``nn.Dropout`` (embeddings, and ``x + dropout(linear(h))`` on the residuals),
    ``torch.optim.AdamW(fused=True)`` (foreach where fused does not exist),
    ``torch.nn.utils.clip_grad_norm_``, ``torch._foreach_lerp_`` for the EMA (float buffers averaged,
    others copied, as fusedtrain's ``EMA`` does by default).
  * fusedtrain's parts: ``fusedtrain.nn.Dropout`` on the embeddings;
    ``fusedtrain.nn.functional.bias_dropout_add(linear_without_bias(h), bias, x, p)`` on the residuals
    (the linear's bias is split out and added inside the fused op, with the same weights);
    ``fusedtrain.optim.AdamW(max_grad_norm=1.0, ema=fusedtrain.ensemble.EMA(model, decay))`` (clip,
    update and EMA in one step); ``fusedtrain.nn.functional.cross_entropy`` for the loss (the loss and the
    gradient of the logits in one pass; torch's side: ``F.cross_entropy`` on float32 logits; no label
    smoothing, so both compute the same loss).
  * Attention-probability dropout is SDPA's ``dropout_p`` on **both** sides: fusedtrain has no fused
    attention, and its dropout on the weights of an explicit softmax path would compare a different
    attention kernel, not a different dropout. That part of the iteration is therefore the same code on
    both sides.
- **vision**: a ResNet-18-style CNN (BasicBlocks [2, 2, 2, 2], ImageNet stem) on uint8 images with
  per-sample random-resized-crop + horizontal flip + colour jitter (0.4, 0.4, 0.4) + normalize
  (antialiased resize, torchvision v2's default, on both sides), SGD with Nesterov momentum (weight decay
  on conv/linear weights) and an EMA of the weights.

  * torch's parts: torchvision.transforms.v2 applied per sample to the host's uint8 images (the
    Dataset pipeline, here in the training process), ``torch.stack``, a copy to the device;
    ``torch.optim.SGD(fused=True)`` (foreach where fused does not exist); ``torch._foreach_lerp_`` EMA.
  * fusedtrain's parts: the uint8 batch copied to the device and ``fusedtrain.augment.BatchAugment``
    there; ``fusedtrain.optim.SGD(nesterov=True, ema=EMA(model, decay))``.

Sizes by device: ``--quick`` tiny; CPU default 4 layers, d = 256, sequence 128, batch 8 (vocabulary 8192)
and ResNet-18 on 64x64 crops of 80x80 images, batch 32 (about a minute for both); CUDA default GPT-2
small (12 layers, d = 768, 12 heads, sequence 1024, vocabulary 50304, batch 16) and ResNet-18 on 224x224
crops of 256x256 images, batch 256.

Timing: the sides take turns iteration by iteration (the order flips every round, several rounds), so a
noisy neighbour slows both alike. Each iteration is split into four phases: data (fetch the batch; for
vision also the augmentation), forward (with the loss), backward, optimizer (clip + update + EMA +
``zero_grad``). On the CPU the phases are ``time.perf_counter`` intervals (everything there is
synchronous); on CUDA they are CUDA events recorded between the phases, after a synchronize at the start
of each iteration, so they add up to the iteration's time on the device. Rows report the median
iteration, the p20/p80 spread and the median of every phase; the fusedtrain row's ratio is torch's median
over ours, and ``extra["round_ratios"]`` holds the same ratio for each round (the spread over time).
For the transformer a third side, torch's parts without any dropout (p = 0 everywhere), runs in the same
rotation: the difference of its forward + backward to each side's is what dropout costs there, so the
table can say what share of the iteration the optimizer + dropout + EMA take on each side. That reference
runs torch's loss, so for the fusedtrain side the difference of the two losses' forward + backward, timed
apart on logits of the same shape (``loss_delta_ms``, ``extra["loss_delta_ms"]``), is taken out of it.
``torch.compile`` variants (``compile=True``, CLI ``--compile``) compile each side's model (the
optimizer step stays eager) and report the compile time, taken as the warm-up iterations' time beyond
the steady iterations', separately (``extra["compile_s"]``), with Inductor's on-disk caches off so that it
is a compile from scratch. The two vision models are one class with one code path: dynamo reuses the first
side's compiled graph for the second (its guards do not depend on the module instance), so the vision
compile time shows on the torch side only. On a CPU compiling takes minutes, hence the flag.

Equivalence (how it was checked; ``tests/test_bench_train.py``): with every dropout p = 0 and the
augmentation replaced by a fixed central crop (the same boxes through torchvision's ``resized_crop`` and
fusedtrain's ``augment``), the two sides' losses agree to float32 rounding at each of six iterations, and
so do the weights, the EMA weights and the BatchNorm statistics after them, for both workloads (relative
2e-5 for the transformer; 1e-4 for the CNN, whose inputs already differ by an ulp and whose training
amplifies it; dropout moves a loss by ~1e-2). With dropout on, each side's first loss moves away from the
no-dropout loss (dropout runs on both), and both sides' losses fall alike over 40 iterations; with random
augmentation both CNN sides stay within the same band. Masks are not the same between the sides (torch's and fusedtrain's
generators differ), so losses with dropout are not compared value by value.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .. import augment as ft_augment
from .. import nn as ft_nn
from .. import optim as ft_optim
from ..augment import functional as AF
from ..ensemble import EMA
from ..nn import functional as ftF
from .common import Progress, Result, sync

__all__ = [
    "GPT",
    "PHASES",
    "TRANSFORMER",
    "VISION",
    "ResNet18",
    "Side",
    "TransformerSize",
    "VisionSize",
    "amp_dtype",
    "format_breakdown",
    "loss_delta_ms",
    "measure_sides",
    "run",
    "transformer_sides",
    "vision_sides",
]

PHASES = ("data", "forward", "backward", "optimizer")
WORKLOADS = ("transformer", "vision")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
JITTER = 0.4
EMA_DECAY = 0.999


# ---------------------------------------------------------------------------------------------------------
# sizes


@dataclass(frozen=True)
class TransformerSize:
    """A GPT-2-style decoder and its batch."""

    vocab: int
    seq: int
    d: int
    layers: int
    heads: int
    batch: int
    p: float = 0.1  # dropout on embeddings, attention probabilities and residual branches (GPT-2's)
    lr: float = 6e-4
    weight_decay: float = 0.1

    def label(self) -> str:
        return f"{self.layers}L d{self.d} h{self.heads} seq{self.seq} b{self.batch} V{self.vocab}"


@dataclass(frozen=True)
class VisionSize:
    """A ResNet-18-style CNN, its input images and batch."""

    batch: int
    in_size: int  # side of the uint8 source images
    out_size: int  # side of the crops the model sees
    width: int = 64  # channels of the first stage (ResNet-18: 64)
    classes: int = 1000
    lr: float = 0.1
    weight_decay: float = 5e-5

    def label(self) -> str:
        return (f"ResNet-18 w{self.width}, b{self.batch} uint8 {self.in_size}^2 -> {self.out_size}^2, "
                f"{self.classes} classes")


TRANSFORMER = {
    "quick": TransformerSize(vocab=512, seq=32, d=64, layers=2, heads=2, batch=4),
    "cpu": TransformerSize(vocab=8192, seq=128, d=256, layers=4, heads=4, batch=8),
    "cuda": TransformerSize(vocab=50304, seq=1024, d=768, layers=12, heads=12, batch=16),  # GPT-2 small
}
VISION = {
    "quick": VisionSize(batch=8, in_size=40, out_size=32, width=16, classes=10),
    "cpu": VisionSize(batch=32, in_size=80, out_size=64),
    "cuda": VisionSize(batch=256, in_size=256, out_size=224),
}


def amp_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype of a run: ``"auto"`` is bf16 where the device computes in it (a CUDA GPU with
    bf16, a CPU with AVX-512-BF16/AMX), fp16 on an older GPU, and None (float32) on other CPUs, where
    bf16 matrix products are emulated and slower than float32."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp != "auto":
        raise ValueError(f"amp must be 'auto', 'off', 'bf16' or 'fp16', got {amp!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


# ---------------------------------------------------------------------------------------------------------
# models


class _Block(nn.Module):
    """A pre-norm GPT-2 block. ``impl`` picks the residual epilogue; the parameters are the same."""

    def __init__(self, size: TransformerSize, impl: str, p: float) -> None:
        super().__init__()
        d = size.d
        self.heads, self.impl, self.p = size.heads, impl, p
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc, self.out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        if impl == "torch":
            self.drop_attn, self.drop_mlp = nn.Dropout(p), nn.Dropout(p)

    def _residual(self, linear: nn.Linear, h: Tensor, x: Tensor, drop: Callable[[Tensor], Tensor] | None) -> Tensor:
        if drop is not None:  # torch: x + dropout(h W^T + b)
            return x + drop(linear(h))
        # fusedtrain: x + dropout(h W^T + b) in one pass after the matrix product, bias split out
        y = TF.linear(h, linear.weight)
        if y.dtype != x.dtype:  # autocast: the product is bf16/fp16, the residual stream float32
            y = y.to(x.dtype)
        return ftF.bias_dropout_add(y, linear.bias, x, self.p, self.training)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = TF.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, c)
        torch_side = self.impl == "torch"
        x = self._residual(self.proj, y, x, self.drop_attn if torch_side else None)
        h = TF.gelu(self.fc(self.ln2(x)), approximate="tanh")
        return self._residual(self.out, h, x, self.drop_mlp if torch_side else None)


class GPT(nn.Module):
    """A GPT-2-style decoder returning the logits; ``impl`` is ``"torch"`` or ``"fusedtrain"`` (which
    dropout implementation runs; the parameters and their names are the same)."""

    def __init__(self, size: TransformerSize, impl: str, p: float | None = None) -> None:
        super().__init__()
        if impl not in ("torch", "fusedtrain"):
            raise ValueError(f"impl must be 'torch' or 'fusedtrain', got {impl!r}")
        p = size.p if p is None else p
        self.wte, self.wpe = nn.Embedding(size.vocab, size.d), nn.Embedding(size.seq, size.d)
        self.drop = nn.Dropout(p) if impl == "torch" else ft_nn.Dropout(p)
        self.blocks = nn.ModuleList(_Block(size, impl, p) for _ in range(size.layers))
        self.ln_f = nn.LayerNorm(size.d)
        # GPT-2's initialization: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() >= 2:
                std = 0.02 / math.sqrt(2 * size.layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(param, 0.0, std)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return TF.linear(self.ln_f(x), self.wte.weight)  # the head is the token embedding (tied)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = TF.relu(self.bn1(self.conv1(x)), inplace=True)
        return TF.relu(self.bn2(self.conv2(y)) + self.shortcut(x), inplace=True)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016): 7x7/2 stem, 3x3/2 max pool, BasicBlocks [2, 2, 2, 2] of ``width`` x
    (1, 2, 4, 8) channels, global average pool, linear classifier; torchvision's initialization."""

    def __init__(self, classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for i, cout in enumerate(width * m for m in (1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(TF.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


# ---------------------------------------------------------------------------------------------------------
# the two sides


class _LerpEMA:
    """torch's EMA: a deep copy of the model moved toward it with ``torch._foreach_lerp_`` after each step
    (floating buffers averaged like the weights, the others copied: what ``fusedtrain.ensemble.EMA`` does
    with its default ``buffers="average"``)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).requires_grad_(False)
        pairs = list(zip(self.module.parameters(), model.parameters()))
        buffers = list(zip(self.module.buffers(), model.buffers()))
        self.averages = [a for a, _ in pairs] + [a for a, b in buffers if b.is_floating_point()]
        self.sources = [p for _, p in pairs] + [b for _, b in buffers if b.is_floating_point()]
        self.copies = [(a, b) for a, b in buffers if not b.is_floating_point()]
        self.weight = 1.0 - decay

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.averages, self.sources, self.weight)
        for a, b in self.copies:
            a.copy_(b)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices, embeddings and convolution kernels; none on biases and norm scales."""
    params = list(model.parameters())  # a tied weight appears once
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _torch_optimizer(cls: Callable[..., torch.optim.Optimizer], groups: list[dict[str, Any]],
                     **kwargs: Any) -> tuple[torch.optim.Optimizer, str]:
    """``cls(fused=True)`` where torch has a fused kernel for the device, else ``foreach=True``."""
    try:
        return cls(groups, fused=True, **kwargs), "fused"
    except (RuntimeError, ValueError):
        return cls(groups, foreach=True, **kwargs), "foreach"


@dataclass
class Side:
    """One implementation of a training iteration: ``iterate`` runs data, forward, backward and optimizer,
    marking the end of each phase on ``clock``."""

    impl: str
    model: nn.Module  # the uncompiled model (its parameters are the trained ones)
    forward: Callable[[Tensor], Tensor]  # the model as called (compiled or not)
    next_batch: Callable[[], tuple[Tensor, Tensor]]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    step: Callable[[], None]  # clip + update + EMA + zero_grad
    averages: Sequence[Tensor]  # the EMA's parameters (updated in place; for the checks)
    device: torch.device
    autocast: torch.dtype | None = None
    scaler: Any = None  # torch.amp.GradScaler with fp16
    parts: str = ""

    def iterate(self, clock: _PhaseClock) -> Tensor:
        clock.start()
        x, y = self.next_batch()
        clock.mark()
        ctx = torch.autocast(self.device.type, self.autocast) if self.autocast is not None else nullcontext()
        with ctx:
            loss = self.loss_fn(self.forward(x), y)
        clock.mark()
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        clock.mark()
        self.step()
        clock.mark()
        return loss.detach()


class _Cycle:
    """The same list of batches for every side, each side with its own position in it."""

    def __init__(self, batches: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.batches, self.i = batches, 0

    def next(self) -> tuple[Tensor, Tensor]:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


def _token_batches(size: TransformerSize, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """Learnable synthetic text: each next token is a fixed permutation of the previous one with
    probability 0.8, else uniform (the loss falls from ln V toward the source's entropy, about 0.5 + 0.2 ln V
    nats, as the model learns the permutation)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(size.vocab, generator=gen)
    batches = []
    for _ in range(count):
        seq = torch.empty(size.batch, size.seq + 1, dtype=torch.int64)
        seq[:, 0] = torch.randint(size.vocab, (size.batch,), generator=gen)
        noise = torch.randint(size.vocab, (size.batch, size.seq), generator=gen)
        keep = torch.rand(size.batch, size.seq, generator=gen) < 0.8
        for t in range(size.seq):
            seq[:, t + 1] = torch.where(keep[:, t], perm[seq[:, t]], noise[:, t])
        batches.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return batches


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return TF.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _lm_loss_fused(logits: Tensor, targets: Tensor) -> Tensor:
    """The same loss by fusedtrain's fused cross-entropy: loss and logits gradient in one pass, computed in float32
    from the logits' own dtype (no float32 copy of bf16 logits; a float32 loss under autocast, like the torch side)."""
    return ftF.cross_entropy(logits.flatten(0, 1), targets.flatten())


def loss_delta_ms(size: TransformerSize, device: torch.device, dtype: torch.dtype | None, reps: int = 5) -> float:
    """Median forward + backward time of the fusedtrain side's loss minus the torch side's, on random logits of the
    transformer's shape and dtype, interleaved: the no-dropout reference side runs torch's loss, so the fusedtrain
    row's "dropout by difference" subtracts this to leave dropout alone."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(size.batch, size.seq, size.vocab, generator=gen).to(device, dtype or torch.float32)
    targets = torch.randint(0, size.vocab, (size.batch, size.seq), generator=gen).to(device)
    times: dict[str, list[float]] = {"torch": [], "fusedtrain": []}
    fns = {"torch": _lm_loss, "fusedtrain": _lm_loss_fused}
    for rep in range(reps + 1):
        for impl in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            x = logits.detach().requires_grad_(True)
            sync(device)
            start = time.perf_counter()
            fns[impl](x, targets).backward()
            sync(device)
            if rep > 0:  # the first round warms up
                times[impl].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times["fusedtrain"]) - statistics.median(times["torch"])


def _make_scaler(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 and device.type == "cuda" else None


def _compiled(model: nn.Module, compile: bool) -> Callable[[Tensor], Tensor]:
    return torch.compile(model) if compile else model


def transformer_sides(size: TransformerSize, device: torch.device, *, amp: str = "auto", p: float | None = None,
                      compile: bool = False, reference: bool = False, seed: int = 0,
                      batches: int = 4) -> list[Side]:
    """The torch and fusedtrain sides of the transformer workload (and, with ``reference``, torch's parts
    without dropout), with the same initial weights and batches.

    Args:
        size: model and batch.
        device: where to train.
        amp: autocast choice (:func:`amp_dtype`).
        p: dropout probability everywhere (default ``size.p``); 0 turns every dropout off.
        compile: ``torch.compile`` each model.
        reference: add a third side, torch's parts with p = 0 (the cost of dropout by difference).
        seed: initialization and data seed.
        batches: distinct batches cycled through.
    """
    dtype = amp_dtype(device, amp)
    data = [(x.to(device), y.to(device)) for x, y in _token_batches(size, batches, seed)]
    torch.manual_seed(seed)
    base = GPT(size, "torch", p).to(device)
    state = base.state_dict()
    sides = []
    specs = [("torch", p), ("fusedtrain", p)] + ([("torch, no dropout (reference)", 0.0)] if reference else [])
    for impl, p_side in specs:
        kind = "fusedtrain" if impl == "fusedtrain" else "torch"
        model = GPT(size, kind, p_side).to(device)
        model.load_state_dict(state)
        groups = _param_groups(model, size.weight_decay)
        scaler = _make_scaler(device, dtype)
        cycle = _Cycle(data)
        if kind == "torch":
            opt, how = _torch_optimizer(torch.optim.AdamW, groups, lr=size.lr, betas=(0.9, 0.95))
            ema = _LerpEMA(model, EMA_DECAY)
            params = list(model.parameters())
            step = _torch_step(opt, params, ema, scaler, max_norm=1.0)
            averages = list(ema.module.parameters())
            parts = (f"nn.Dropout; AdamW({how}); clip_grad_norm_; _foreach_lerp_ EMA" if p_side != 0.0 else
                     f"no dropout; AdamW({how}); clip_grad_norm_; _foreach_lerp_ EMA")
        else:
            ft_ema = EMA(model, EMA_DECAY)
            opt = ft_optim.AdamW(groups, lr=size.lr, betas=(0.9, 0.95), max_grad_norm=1.0, ema=ft_ema)
            step = _fusedtrain_step(opt, scaler)
            averages = list(ft_ema.module.parameters())  # type: ignore[union-attr]
            parts = "fusedtrain.nn.Dropout + bias_dropout_add; fused cross_entropy; AdamW(max_grad_norm=1.0, ema=EMA)"
        loss_fn = _lm_loss_fused if kind == "fusedtrain" else _lm_loss
        sides.append(Side(impl, model, _compiled(model, compile), cycle.next, loss_fn, step,
                          averages, device, dtype, scaler, parts))
    return sides


def _torch_step(opt: torch.optim.Optimizer, params: Sequence[Tensor], ema: _LerpEMA, scaler: Any,
                max_norm: float | None) -> Callable[[], None]:
    def step() -> None:
        if scaler is not None:
            scaler.unscale_(opt)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        ema.update()
        opt.zero_grad(set_to_none=True)
    return step


def _fusedtrain_step(opt: torch.optim.Optimizer, scaler: Any) -> Callable[[], None]:
    def step() -> None:
        if scaler is not None:  # the step reads the scale and found_inf (it unscales in its kernels)
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _image_batches(size: VisionSize, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """Learnable synthetic uint8 images on the host: a class colour (one of ``classes``) blended with
    noise, so that a model can learn the class from the colour through crops and jitter."""
    gen = torch.Generator().manual_seed(seed)
    palette = torch.randint(0, 256, (size.classes, 3), generator=gen).float()
    out = []
    for _ in range(count):
        labels = torch.randint(size.classes, (size.batch,), generator=gen)
        noise = torch.randint(0, 256, (size.batch, 3, size.in_size, size.in_size), generator=gen).float()
        images = (0.6 * palette[labels][:, :, None, None] + 0.4 * noise).round().clamp(0, 255).to(torch.uint8)
        out.append((images, labels))
    return out


def _central_box(size: VisionSize) -> list[int]:
    off = (size.in_size - size.out_size) // 2
    return [off, off, size.out_size, size.out_size]


def _torchvision_pipeline(size: VisionSize, augment: bool) -> Callable[[Tensor], Tensor]:
    import torchvision.transforms.v2 as T
    import torchvision.transforms.v2.functional as TVF

    tail = [T.ToDtype(torch.float32, scale=True), T.Normalize(list(MEAN), list(STD))]
    if augment:
        return T.Compose([T.RandomResizedCrop(size.out_size, antialias=True), T.RandomHorizontalFlip(),
                          T.ColorJitter(JITTER, JITTER, JITTER)] + tail)
    top, left, h, w = _central_box(size)
    fixed = T.Compose(tail)
    return lambda img: fixed(TVF.resized_crop(img, top, left, h, w, [size.out_size], antialias=True))


def vision_sides(size: VisionSize, device: torch.device, *, amp: str = "auto", augment: bool = True,
                 compile: bool = False, seed: int = 0, batches: int = 4) -> list[Side]:
    """The torch and fusedtrain sides of the vision workload, with the same initial weights and images.

    Args:
        size: model, images and batch.
        device: where to train (the uint8 images start on the host on both sides).
        amp: autocast choice (:func:`amp_dtype`).
        augment: random per-sample augmentation; False: a fixed central crop + normalize on both sides.
        compile: ``torch.compile`` each model.
        seed: initialization and data seed.
        batches: distinct batches cycled through.
    """
    dtype = amp_dtype(device, amp)
    host = _image_batches(size, batches, seed)
    if device.type == "cuda":
        host = [(x.pin_memory(), y.pin_memory()) for x, y in host]
    torch.manual_seed(seed)
    base = ResNet18(size.classes, size.width).to(device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    base = base.to(memory_format=memory_format)
    state = base.state_dict()
    sides = []
    for impl in ("torch", "fusedtrain"):
        model = ResNet18(size.classes, size.width).to(device).to(memory_format=memory_format)
        model.load_state_dict(state)
        groups = _param_groups(model, size.weight_decay)
        scaler = _make_scaler(device, dtype)
        cycle = _Cycle(host)
        if impl == "torch":
            pipeline = _torchvision_pipeline(size, augment)

            def torch_batch(cycle: _Cycle = cycle, pipeline: Callable[[Tensor], Tensor] = pipeline
                            ) -> tuple[Tensor, Tensor]:
                images, labels = cycle.next()
                x = torch.stack([pipeline(img) for img in images])
                return x.to(device, non_blocking=True), labels.to(device, non_blocking=True)

            next_batch: Callable[[], tuple[Tensor, Tensor]] = torch_batch

            opt, how = _torch_optimizer(torch.optim.SGD, groups, lr=size.lr, momentum=0.9, nesterov=True)
            ema = _LerpEMA(model, EMA_DECAY)
            step = _torch_step(opt, list(model.parameters()), ema, scaler, max_norm=None)
            averages = list(ema.module.parameters())
            parts = (f"torchvision v2 per sample; SGD(nesterov, {how}); _foreach_lerp_ EMA" if augment else
                     f"central crop (torchvision); SGD(nesterov, {how}); _foreach_lerp_ EMA")
        else:
            aug = ft_augment.BatchAugment(size.out_size, brightness=JITTER, contrast=JITTER, saturation=JITTER,
                                          mean=MEAN, std=STD, antialias=True)
            box = torch.tensor([_central_box(size)], dtype=torch.int64)

            def fused_batch(cycle: _Cycle = cycle, aug: ft_augment.BatchAugment = aug,
                            box: Tensor = box) -> tuple[Tensor, Tensor]:
                images, labels = cycle.next()
                images = images.to(device, non_blocking=True)
                if augment:
                    x = aug(images)
                else:
                    x = AF.augment(images, box.expand(images.shape[0], 4), size=size.out_size, mean=MEAN, std=STD,
                                   antialias=True)
                return x, labels.to(device, non_blocking=True)

            next_batch = fused_batch

            ft_ema = EMA(model, EMA_DECAY)
            opt = ft_optim.SGD(groups, lr=size.lr, momentum=0.9, nesterov=True, ema=ft_ema)
            step = _fusedtrain_step(opt, scaler)
            averages = list(ft_ema.module.parameters())  # type: ignore[union-attr]
            parts = ("BatchAugment" if augment else "central crop (augment)") + "; SGD(nesterov, ema=EMA)"
        sides.append(Side(impl, model, _compiled(model, compile), next_batch, TF.cross_entropy, step,
                          averages, device, dtype, scaler, parts))
    return sides


# ---------------------------------------------------------------------------------------------------------
# timing


class _PhaseClock:
    """Marks the ends of an iteration's phases: ``time.perf_counter`` on the CPU (synchronous), CUDA events
    on a GPU (after a synchronize at the start, so the phases add up to the iteration on the device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._marks: list[Any] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        sync(self.device)
        self._marks = [self._now()]

    def mark(self) -> None:
        self._marks.append(self._now())

    def finish(self) -> list[float]:
        """Milliseconds of each phase of the iteration just run."""
        marks = self._marks
        if self.cuda:
            marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in pairwise(marks)]
        return [(b - a) * 1e3 for a, b in pairwise(marks)]


@dataclass
class SideTimes:
    """Per-iteration phase times (ms) of one side, its losses, and the warm-up iterations' totals."""

    phases: list[list[float]] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # the round of each timed iteration
    losses: list[float] = field(default_factory=list)
    warmup_ms: list[float] = field(default_factory=list)

    def totals(self) -> list[float]:
        return [sum(p) for p in self.phases]


def measure_sides(sides: Sequence[Side], warmup: int, rounds: int, per_round: int,
                  on_iteration: Callable[[], None] | None = None) -> dict[str, SideTimes]:
    """Runs the sides in turns: ``warmup`` untimed iterations each, then ``rounds`` rounds of ``per_round``
    iterations each in which the sides alternate iteration by iteration (the order rotates every round).
    Every loss is recorded (the warm-up ones too)."""
    clock = _PhaseClock(sides[0].device)
    times = {s.impl: SideTimes() for s in sides}

    def one(side: Side, timed: bool, round_: int) -> None:
        loss = side.iterate(clock)
        ms = clock.finish()
        t = times[side.impl]
        t.losses.append(float(loss))
        if timed:
            t.phases.append(ms)
            t.rounds.append(round_)
        else:
            t.warmup_ms.append(sum(ms))
        if on_iteration is not None:
            on_iteration()

    for _ in range(warmup):
        for side in sides:
            one(side, False, -1)
    for r in range(rounds):
        k = r % len(sides)
        order = list(sides[k:]) + list(sides[:k])
        for _ in range(per_round):
            for side in order:
                one(side, True, r)
    return times


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    qs = statistics.quantiles(xs, n=5)
    return statistics.median(xs), qs[0], qs[3]


def _rows(workload: str, case: str, sides: Sequence[Side], times: dict[str, SideTimes], compiled: bool,
          config: dict[str, Any], device: torch.device, loss_delta: float = 0.0) -> list[Result]:
    rows: dict[str, Result] = {}
    for side in sides:
        t = times[side.impl]
        med, p20, p80 = _quantiles(t.totals())
        phase_stats = {name: _quantiles([ms[i] for ms in t.phases]) for i, name in enumerate(PHASES)}
        phase_med = {k: v[0] for k, v in phase_stats.items()}
        extra: dict[str, Any] = {
            "workload": workload, "compiled": compiled, "config": config, "parts": side.parts,
            "params": sum(p.numel() for p in side.model.parameters()),
            "amp": str(side.autocast).replace("torch.", "") if side.autocast is not None else "off",
            "phases_ms": phase_med,
            "phases_p20_ms": {k: v[1] for k, v in phase_stats.items()},
            "phases_p80_ms": {k: v[2] for k, v in phase_stats.items()},
            "share_pct": {k: 100 * v / sum(phase_med.values()) for k, v in phase_med.items()},
            "iterations": len(t.phases), "rounds": max(t.rounds) + 1 if t.rounds else 0,
            "loss_first": t.losses[0], "loss_last": t.losses[-1],
        }
        if compiled:
            extra["compile_s"] = max(0.0, (sum(t.warmup_ms) - len(t.warmup_ms) * med) / 1e3)
        r = Result("train", case, side.impl, str(device), med, p20, p80, note=side.parts, extra=extra)
        rows[side.impl] = r
    torch_row, ours = rows["torch"], rows["fusedtrain"]
    assert torch_row.median_ms is not None and ours.median_ms is not None
    ours.vs_best_torch = torch_row.median_ms / ours.median_ms
    # the same ratio per round: how much it moves with the machine's load
    t_torch, t_ours = times["torch"], times["fusedtrain"]
    round_ratios = []
    for round_ in sorted(set(t_ours.rounds)):
        a = [x for x, q in zip(t_torch.totals(), t_torch.rounds) if q == round_]
        b = [x for x, q in zip(t_ours.totals(), t_ours.rounds) if q == round_]
        round_ratios.append(statistics.median(a) / statistics.median(b))
    ours.extra["round_ratios"] = round_ratios
    no_data = {impl: sum(v for k, v in row.extra["phases_ms"].items() if k != "data") for impl, row in rows.items()}
    ours.extra["vs_torch_without_data"] = no_data["torch"] / no_data["fusedtrain"]
    reference = rows.get("torch, no dropout (reference)")
    if reference is not None:
        ref_fb = reference.extra["phases_ms"]["forward"] + reference.extra["phases_ms"]["backward"]
        ours.extra["loss_delta_ms"] = loss_delta  # the reference runs torch's loss; see loss_delta_ms
        for row, delta in ((torch_row, 0.0), (ours, loss_delta)):
            ph = row.extra["phases_ms"]
            dropout_ms = ph["forward"] + ph["backward"] - ref_fb - delta
            row.extra["dropout_ms"] = dropout_ms
            row.extra["optimizer_dropout_ema_pct"] = 100 * (ph["optimizer"] + dropout_ms) / sum(ph.values())
    ours.note += f" | per-round ratios {min(round_ratios):.2f}-{max(round_ratios):.2f}x"
    return list(rows.values())


def format_breakdown(results: Sequence[Result]) -> str:
    """The per-phase table of the train rows: median ms of each phase, the iteration's median and p20-p80,
    and (where the reference side ran) the dropout cost by difference and the optimizer + dropout + EMA
    share."""
    header = ["case", "impl", *PHASES, "iteration", "p20-p80", "opt+dropout+EMA", "vs torch"]
    lines = [header]
    for r in results:
        if r.family != "train":
            continue
        ph = r.extra["phases_ms"]
        share = r.extra.get("optimizer_dropout_ema_pct")
        share_s = f"{share:.0f}% ({r.extra['dropout_ms']:.1f} ms dropout)" if share is not None else ""
        lines.append([r.case, r.impl, *(f"{ph[k]:.1f}" for k in PHASES), f"{r.median_ms:.1f}",
                      f"{r.p20_ms:.1f}-{r.p80_ms:.1f}", share_s,
                      f"{r.vs_best_torch:.3f}x" if r.vs_best_torch is not None else ""])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "per-phase medians (ms) of one training iteration\n" + "\n".join(out)


def run(device: torch.device, reps: int | None = None, warmup: int | None = None, progress: bool = True,
        quick: bool = False, compile: bool = False, workloads: Sequence[str] = WORKLOADS,
        amp: str = "auto") -> list[Result]:
    """The train family: for each workload, torch's parts vs fusedtrain's, eager (and compiled with
    ``compile``), interleaved iteration by iteration.

    Args:
        device: where to train.
        reps: timed iterations per side (default: 4 quick, 12 on the CPU, 20 on CUDA), split into rounds.
        warmup: untimed iterations per side first (default 1 quick, 2 on the CPU, 3 on CUDA; compiled
            variants at least 2, the first compiles).
        quick: tiny models.
        compile: also the ``torch.compile`` variant of both sides.
        workloads: a subset of ``("transformer", "vision")``.
        amp: autocast choice (:func:`amp_dtype`).

    Returns:
        Two rows per workload and variant (plus the transformer's no-dropout reference row); the breakdown
        is in each row's ``extra`` and printed as a table.
    """
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown train workloads {unknown}; choose from {list(WORKLOADS)}")
    key = "quick" if quick else device.type
    n = reps or (4 if quick else 12 if device.type == "cpu" else 20)
    rounds = 2 if n < 6 else 3 if device.type == "cpu" else 4
    per_round = max(1, math.ceil(n / rounds))
    w = warmup if warmup is not None else (1 if quick else 2 if device.type == "cpu" else 3)
    variants = [False, True] if compile else [False]
    n_sides = {"transformer": 3, "vision": 2}
    warmups = {False: w, True: max(w, 2)}  # a compiled model compiles in its first iteration (and backward)
    total = sum(n_sides[wl] * (warmups[c] + rounds * per_round) for wl in workloads for c in variants)
    bar = Progress(total, progress)
    results: list[Result] = []
    for compiled in variants:
        if compiled:  # Inductor's one-time start-up, so that the first model's compile time does not carry it
            torch.compile(lambda t: t * 2)(torch.ones(2, device=device))
        # compile times from scratch: with Inductor's on-disk caches on, every run after the first would read
        # the first one's kernels and graphs back
        no_caches = torch.compiler.config.patch(force_disable_caches=True)  # type: ignore[attr-defined]
        with no_caches if compiled else nullcontext(), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # what we asked for
            results += _run_variant(device, key, workloads, amp, compiled, warmups[compiled], rounds, per_round, bar)
    print(format_breakdown(results), flush=True)
    return results


def _run_variant(device: torch.device, key: str, workloads: Sequence[str], amp: str, compiled: bool, warmup: int,
                 rounds: int, per_round: int, bar: Progress) -> list[Result]:
    """One variant (eager or compiled) of every workload: build the sides, measure them, make the rows."""
    results: list[Result] = []
    for workload in workloads:
        if workload == "transformer":
            tsize = TRANSFORMER[key]
            sides = transformer_sides(tsize, device, amp=amp, compile=compiled, reference=True)
            config: dict[str, Any] = asdict(tsize)
            case = f"transformer {tsize.label()}"
        else:
            vsize = VISION[key]
            sides = vision_sides(vsize, device, amp=amp, compile=compiled)
            config = asdict(vsize)
            case = f"vision {vsize.label()}"
        dtype = sides[0].autocast
        case += f", {str(dtype).replace('torch.', '') if dtype is not None else 'fp32'}"
        if compiled:
            case += ", compiled"
        label = f"{workload}{' (compiled)' if compiled else ''}"
        bar.begin(label)
        times = measure_sides(sides, warmup, rounds, per_round, on_iteration=partial(bar.step, label))
        delta = loss_delta_ms(tsize, device, dtype) if workload == "transformer" else 0.0
        results += _rows(workload, case, sides, times, compiled, config, device, delta)
        del sides, times
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
