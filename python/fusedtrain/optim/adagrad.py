"""Adagrad on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import FusedOptimizerMixin, new_step

__all__ = ["Adagrad"]


class Adagrad(FusedOptimizerMixin, torch.optim.Adagrad):
    r"""Adagrad (Duchi, Hazan & Singer, 2011), a drop-in for :class:`torch.optim.Adagrad`.

    .. math::
        r \leftarrow r + g\odot g,\qquad \theta \leftarrow \theta - \eta_t\,\frac{g}{\sqrt{r}+\delta},
        \qquad \eta_t = \frac{\eta}{1 + (t-1)\,\text{lr\_decay}}

    (:math:`\delta` is ``eps``; :math:`r` starts at ``initial_accumulator_value``.)

    Args:
        params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize: as in torch.
        foreach, fused: validated as torch validates them and recorded; always fused here.
        differentiable: runs torch.optim.Adagrad's own step.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.
        state_bits, min_8bit_size: ``state_bits=8`` keeps ``sum`` (uint8 codes) of parameters with at least
            ``min_8bit_size`` elements blockwise-quantized (Note [8-bit states in the optimizers]).

    State: ``step`` (CPU float tensor) and ``sum``, created in the constructor as torch does.
    Sparse gradients (``nn.Embedding(sparse=True)``) are updated by torch.optim.Adagrad's own implementation,
    as torch does.
    """

    _torch_cls = torch.optim.Adagrad
    _opt_name = "Adagrad"
    _rule = "adagrad"
    _rule_8bit = "adagrad8bit"
    _signed_states = frozenset()
    _supports_sparse = True

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, fused: bool | None = None,
                 ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, state_bits: int = 32,
                 min_8bit_size: int = 4096) -> None:
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, foreach,
                         maximize=maximize, differentiable=differentiable, fused=fused)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits,
                          min_8bit_size)

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["sum"]

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "sum" not in state:  # parameters added with add_param_group after construction
            init = group["initial_accumulator_value"]
            state["step"] = new_step(self._step_device(group, p))
            state["sum"] = torch.full_like(p, complex(init, init) if p.is_complex() else init,
                                           memory_format=torch.preserve_format)

    _external_state = _init_state

    def _state_in(self, group: dict[str, Any], p: Tensor, key: str, dtype: torch.dtype) -> Tensor:
        # torch's constructor made the accumulator in the parameter's dtype; before the first update it is
        # made again in the state dtype, so that it starts at exactly initial_accumulator_value
        state = self.state[p]
        if key == "sum" and float(state["step"]) == 0:
            return torch.full_like(p, group["initial_accumulator_value"], dtype=dtype,
                                   memory_format=torch.preserve_format)
        return super()._state_in(group, p, key, dtype)

    def _sparse_refusal(self, group: dict[str, Any]) -> str | None:
        return "weight_decay option is not compatible with sparse gradients" if group["weight_decay"] else None

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr_decay=group["lr_decay"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"])
