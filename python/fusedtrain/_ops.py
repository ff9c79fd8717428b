"""The only module that calls ``torch.ops.fusedtrain.*``: typed wrappers and fake (meta) kernels.

Schemas live in ``csrc/ops.cpp``; see Note [optimizer op conventions] there. Every optimizer op takes
``ema_params`` / ``ema_weight``: a non-empty list of averages is updated in the same pass. The fake kernels let
``torch.compile`` and ``torch.library.opcheck`` trace the ops: they check nothing and mutate nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._build import library

__all__ = ["sgd_", "adagrad_", "rmsprop_", "adam_", "ema_"]

library()  # loads fusedtrain._C, which registers the ops (clear error if it is missing)
_ops = torch.ops.fusedtrain

TensorSeq = Sequence[Tensor]


def sgd_(params: TensorSeq, grads: TensorSeq, momentum_buffers: TensorSeq, *, lr: float, momentum: float,
         dampening: float, weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
         ema_params: TensorSeq = (), ema_weight: float = 0.0) -> None:
    """In-place SGD / momentum / Nesterov update of ``params`` (one device, one dtype)."""
    _ops.sgd_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
              first_step, ema_params, ema_weight)


def adagrad_(params: TensorSeq, grads: TensorSeq, state_sums: TensorSeq, state_steps: TensorSeq, *, lr: float,
             lr_decay: float, weight_decay: float, eps: float, maximize: bool, ema_params: TensorSeq = (),
             ema_weight: float = 0.0) -> None:
    """In-place Adagrad update; advances ``state_steps`` (CPU scalars)."""
    _ops.adagrad_(params, grads, state_sums, state_steps, lr, lr_decay, weight_decay, eps, maximize, ema_params,
                  ema_weight)


def rmsprop_(params: TensorSeq, grads: TensorSeq, square_avgs: TensorSeq, grad_avgs: TensorSeq,
             momentum_buffers: TensorSeq, state_steps: TensorSeq, *, lr: float, alpha: float, eps: float,
             weight_decay: float, momentum: float, centered: bool, maximize: bool, ema_params: TensorSeq = (),
             ema_weight: float = 0.0) -> None:
    """In-place RMSprop update; ``grad_avgs`` / ``momentum_buffers`` empty when unused."""
    _ops.rmsprop_(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr, alpha, eps,
                  weight_decay, momentum, centered, maximize, ema_params, ema_weight)


def adam_(params: TensorSeq, grads: TensorSeq, exp_avgs: TensorSeq, exp_avg_sqs: TensorSeq,
          max_exp_avg_sqs: TensorSeq, state_steps: TensorSeq, *, lr: float, beta1: float, beta2: float,
          eps: float, weight_decay: float, amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
          ema_params: TensorSeq = (), ema_weight: float = 0.0) -> None:
    """In-place Adam / AdamW update; ``max_exp_avg_sqs`` empty unless ``amsgrad``."""
    _ops.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
               weight_decay, amsgrad, maximize, decoupled_weight_decay, ema_params, ema_weight)


def ema_(averages: TensorSeq, params: TensorSeq, *, weight: float) -> None:
    """In place: ``averages <- averages + weight * (params - averages)`` (one device, one dtype)."""
    _ops.ema_(averages, params, weight)


def _fake_inplace(*args: object) -> None:
    return None


for _name in __all__:
    torch.library.register_fake(f"fusedtrain::{_name}")(_fake_inplace)


# ---- augment (issue 5) ----
# See Note [augment op] in csrc/ops.cpp. The per-sample parameters are CPU tensors (the driver reads them
# on the host); images may be on CPU or CUDA.


def augment(images: TensorSeq, boxes: Tensor, flips: Tensor, factors: Tensor, *, size: int,
            mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype, antialias: bool = False) -> Tensor:
    """Random-resized-crop + flip + colour jitter + normalize of uint8 (C, H, W) images into a new
    (N, C, size, size) tensor; ``boxes`` int64 (N, 4), ``flips`` bool (N,), ``factors`` float32 (N, 3)."""
    return _ops.augment(images, boxes, flips, factors, size, list(mean), list(std), out_dtype, antialias)


@torch.library.register_fake("fusedtrain::augment")
def _augment_fake(images: TensorSeq, boxes: Tensor, flips: Tensor, factors: Tensor, size: int,
                  mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype,
                  antialias: bool = False) -> Tensor:
    torch._check(len(images) > 0, lambda: "fusedtrain.augment: images is empty")
    return images[0].new_empty((len(images), images[0].shape[0], size, size), dtype=out_dtype)


__all__ += ["augment"]
