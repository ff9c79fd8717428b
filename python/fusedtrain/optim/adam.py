"""Adam and AdamW on fusedtrain's fused multi-tensor kernels."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from ._base import FusedOptimizerMixin, new_step, to_scalar

__all__ = ["Adam", "AdamW", "Adam8bit", "AdamW8bit"]

_TORCH_ADAM_HAS_DECOUPLED = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam.__init__).parameters


class Adam(FusedOptimizerMixin, torch.optim.Adam):
    r"""Adam (Kingma & Ba, 2015), a drop-in for :class:`torch.optim.Adam` that runs one fused kernel per
    (device, dtype) group.

    .. math::
        g_t &= \nabla_\theta f_t(\theta_{t-1}) \;(+\lambda\theta_{t-1}),\qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t}+\epsilon}

    This is torch's parametrization: ``eps`` is added after the bias correction of :math:`\sqrt{v_t}`.
    ``amsgrad`` uses :math:`\max(v_{\max}, v_t)` in place of :math:`v_t`; ``decoupled_weight_decay`` gives
    AdamW (the parameter is first multiplied by :math:`1-\eta\lambda`).

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as in torch.optim.Adam
            (same defaults and validation errors).
        foreach, fused: validated as torch validates them and recorded in the param groups; they select
            nothing: fusedtrain always runs its fused kernels.
        capturable: keep the ``step`` counters on the parameters' device (float32, as torch does); the
            kernels read them and a tensor ``lr`` there, so the step can be captured in a CUDA graph and
            GradScaler's ``found_inf`` is honoured without a host synchronisation.
        differentiable: runs torch.optim.Adam's own implementation (same state keys).
        ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: the options fusedtrain
            adds to every optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin`.
        state_bits: 8 keeps ``exp_avg`` (int8 codes), ``exp_avg_sq`` and ``max_exp_avg_sq`` (uint8 codes) of
            parameters of >= 2 dims with at least ``min_8bit_size`` elements blockwise-quantized, with one float32
            absmax per block of up to 256 elements of each dim-0 slice under ``<key>_absmax``: about 2 bytes of
            state per parameter instead of 8. 4 keeps them as packed 4-bit codes (``ceil(n / 2)`` bytes, int8 for
            ``exp_avg``, uint8 for the others) with one float32 absmax per 128 elements under ``<key>_absmax4``
            and the shape under ``<key>_shape4``: 1.0625 bytes per parameter, at a cost in loss (docs/optim.md,
            "4-bit states"; Note [4-bit optimizer states] in csrc/include/fusedtrain/quant4.h).
        min_8bit_size: smaller parameters keep float32 states at ``state_bits=8`` or ``4`` (default 4096).

    The state keys (``step`` as a CPU float tensor, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) are
    torch's, so ``state_dict()`` loads into torch.optim.Adam and back (at ``state_bits=8`` or ``4`` through
    :func:`fusedtrain.optim.to_torch_state_dict`; a torch.optim state_dict loads directly and is quantized).
    """

    _torch_cls = torch.optim.Adam
    _opt_name = "Adam"
    _rule = "adam"
    _rule_8bit = "adam8bit"
    _rule_4bit = "adam4bit"
    _signed_states = frozenset({"exp_avg"})
    _decoupled_default = False

    def __init__(self, params: Any, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False, ema: Any = None,
                 max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, state_bits: int = 32, min_8bit_size: int = 4096) -> None:
        kwargs: dict[str, Any] = dict(foreach=foreach, maximize=maximize, capturable=capturable,
                                      differentiable=differentiable, fused=fused)
        if _TORCH_ADAM_HAS_DECOUPLED:
            kwargs["decoupled_weight_decay"] = decoupled_weight_decay
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
        if not _TORCH_ADAM_HAS_DECOUPLED:  # torch < 2.7: record the option the way newer torch does
            self.defaults["decoupled_weight_decay"] = decoupled_weight_decay
            for group in self.param_groups:
                group.setdefault("decoupled_weight_decay", decoupled_weight_decay)
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits,
                          min_8bit_size)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", self._decoupled_default)

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] if group["amsgrad"] else ["exp_avg", "exp_avg_sq"]

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "step" not in state:  # (a master copy may exist already)
            state["step"] = new_step(self._step_device(group, p))
            state["exp_avg"] = self._zeros(p)
            state["exp_avg_sq"] = self._zeros(p)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = self._zeros(p)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(beta1=to_scalar(beta1, "betas[0]"), beta2=to_scalar(beta2, "betas[1]"), eps=group["eps"],
                    weight_decay=to_scalar(group["weight_decay"], "weight_decay"), amsgrad=group["amsgrad"],
                    maximize=group["maximize"],
                    decoupled_weight_decay=group.get("decoupled_weight_decay", self._decoupled_default))


class AdamW(Adam, torch.optim.AdamW):
    r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, a drop-in for
    :class:`torch.optim.AdamW` (default ``weight_decay=1e-2``).

    .. math::
        \theta_{t-1} \leftarrow \theta_{t-1}(1-\eta\lambda), \text{ then the Adam update without the L2 term.}

    Arguments and state are those of :class:`Adam`; see there.
    """

    _torch_cls = torch.optim.AdamW
    _opt_name = "AdamW"
    _decoupled_default = True

    def __init__(self, params: Any, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, ema: Any = None,
                 max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, state_bits: int = 32, min_8bit_size: int = 4096) -> None:
        torch.optim.AdamW.__init__(self, params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                                   foreach=foreach, capturable=capturable, differentiable=differentiable,
                                   fused=fused)
        self.defaults["decoupled_weight_decay"] = True
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits,
                          min_8bit_size)


class Adam8bit(Adam):
    """:class:`Adam` with 8-bit states: ``Adam(..., state_bits=8)`` (the class name of bitsandbytes and
    torchao). Parameters with fewer than ``min_8bit_size`` elements keep float32 states."""

    def __init__(self, params: Any, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, state_bits: int = 8, min_8bit_size: int = 4096,
                 **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, state_bits=state_bits,
                         min_8bit_size=min_8bit_size, **kwargs)


class AdamW8bit(AdamW):
    """:class:`AdamW` with 8-bit states: ``AdamW(..., state_bits=8)`` (the class name of bitsandbytes and
    torchao). Parameters with fewer than ``min_8bit_size`` elements keep float32 states."""

    def __init__(self, params: Any, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, state_bits: int = 8,
                 min_8bit_size: int = 4096, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, state_bits=state_bits,
                         min_8bit_size=min_8bit_size, **kwargs)
