"""SGD, momentum and Nesterov momentum on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import FusedOptimizerMixin, to_scalar

__all__ = ["SGD"]


class MomentumBufferState:
    """The ``momentum_buffer`` state of SGD-style momentum (SGD, and LARS in lamb.py), for a
    FusedOptimizerMixin class whose groups have a ``momentum`` entry.

    A new buffer starts from the gradient (torch clones the gradient on the first step): the kernel writes
    b <- g on a parameter's first update (the rule's first_step flag, Note [the step]). It is made as zeros,
    not empty: if GradScaler's found_inf skips that update on the device, the next
    b <- mu*0 + (1 - dampening)*g is still defined.
    """

    state: Any

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if group["momentum"] != 0 and state.get("momentum_buffer") is None:
            state["momentum_buffer"] = self._zeros(p)  # type: ignore[attr-defined]
            self.__dict__.setdefault("_ft_fresh", set()).add(id(p))

    def _fresh_params(self, group: dict[str, Any], params: list[Tensor]) -> set[int]:
        if group["momentum"] == 0:
            return set()
        fresh = self.__dict__.get("_ft_fresh", set())
        return {id(p) for p in params if id(p) in fresh}

    def _after_update(self, fresh: list[Tensor]) -> None:
        done = self.__dict__.get("_ft_fresh", set())
        for p in fresh:
            done.discard(id(p))


class SGD(MomentumBufferState, FusedOptimizerMixin, torch.optim.SGD):
    r"""Stochastic gradient descent with optional momentum, a drop-in for :class:`torch.optim.SGD`.

    With :math:`g = \nabla f(\theta) + \lambda\theta` (weight decay :math:`\lambda`):

    - plain SGD: :math:`\theta \leftarrow \theta - \eta g`;
    - momentum (heavy ball): :math:`b \leftarrow \mu b + (1-\tau) g,\ \theta \leftarrow \theta - \eta b`
      (:math:`b = g` on the first step). The textbook form :math:`v \leftarrow \mu v - \eta g,\ \theta
      \leftarrow \theta + v` is the same trajectory with :math:`v = -\eta b` for a constant :math:`\eta`;
    - Nesterov: :math:`\theta \leftarrow \theta - \eta (g + \mu b)`, the look-ahead form of Sutskever
      et al. (2013) rewritten in terms of the current parameters.

    Args:
        params: parameters or parameter groups.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in torch.optim.SGD (same defaults
            and errors).
        foreach, fused: validated as torch validates them and recorded; always fused here.
        differentiable: runs torch.optim.SGD's own step.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.
        state_bits, min_8bit_size: ``state_bits=8`` keeps ``momentum_buffer`` (int8 codes) of parameters with at least
            ``min_8bit_size`` elements blockwise-quantized (Note [8-bit states in the optimizers]).

    State: ``momentum_buffer`` when momentum is non-zero, as in torch. Sparse gradients
    (``nn.Embedding(sparse=True)``) are updated by torch.optim.SGD's own implementation, as torch does.
    """

    _torch_cls = torch.optim.SGD
    _opt_name = "SGD"
    _rule = "sgd"
    _rule_8bit = "sgd8bit"
    _signed_states = frozenset({"momentum_buffer"})
    _supports_sparse = True

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, state_bits: int = 32,
                 min_8bit_size: int = 4096) -> None:
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits,
                          min_8bit_size)


    def _sparse_refusal(self, group: dict[str, Any]) -> str | None:
        # torch's single-tensor SGD adds the decay with add(sparse, dense), which ATen refuses
        if group["weight_decay"]:
            return "add(sparse, dense) is not supported. Use add(dense, sparse) instead."
        return None

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(momentum=group["momentum"], dampening=group["dampening"],
                    weight_decay=to_scalar(group["weight_decay"], "weight_decay"), nesterov=group["nesterov"],
                    maximize=group["maximize"], first_step=False)
