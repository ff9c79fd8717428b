"""Schedule-Free AdamW and SGD on fusedtrain's fused kernels, with the arguments, state and results of the
schedulefree package's AdamWScheduleFree and SGDScheduleFree.

Note [schedule-free train/eval]:
Schedule-Free (Defazio et al., 2024, "The Road Less Scheduled") keeps three sequences: z (the SGD/Adam
iterate, a state), x (the weighted average of the z's, where the model should be evaluated) and
y = (1 - beta)*z + beta*x (where gradients are taken). The parameter holds y during training and x during
evaluation; ``optimizer.train()`` and ``optimizer.eval()`` move it between the two (a lerp toward z), as the
reference does. Forgetting the switch (evaluating or saving y) is its users' most common mistake:
``model=`` (or :meth:`tie_to`) makes the model's mode drive the switch: before every forward of the model
and before ``model.state_dict()``, the optimizer is brought to the model's mode.

The per-step schedule (warm-up, lr_max, the weight sum, c_{k+1}) is group state computed on the host in
Python doubles exactly as the reference computes it, and handed to the one fused pass as hyperparameters
(Note [group scalars on the host] in csrc/include/fusedtrain/rules_beyond.h).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._base import to_scalar
from ._standalone import StandaloneFusedOptimizer

__all__ = ["ModeTie", "ScheduleFreeAdamW", "ScheduleFreeSGD"]


class ModeTie:
    """The hooks that keep a schedule-free optimizer in its model's mode (Note [schedule-free train/eval]):
    a forward pre-hook and a state_dict pre-hook on the model. The model's hook dicts hold it, and it holds the
    optimizer: a copy (deepcopy, pickle, torch.save) of the model and optimizer together keeps the tie between the
    copies; a copy of the model alone carries a copy of the optimizer with it. ``remove()`` unties."""

    def __init__(self, optimizer: _ScheduleFree, model: nn.Module) -> None:
        self.optimizer = optimizer
        self._handles = [model.register_forward_pre_hook(self._on_forward),
                         model.register_state_dict_pre_hook(self._on_state_dict)]

    def sync(self, training: bool) -> None:
        """Brings the optimizer to ``training`` (train: parameters hold y; eval: x)."""
        if any(g["train_mode"] != training for g in self.optimizer.param_groups):
            if training:
                self.optimizer.train()
            else:
                self.optimizer.eval()

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        self.sync(module.training)

    def _on_state_dict(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        self.sync(module.training)

    def remove(self) -> None:
        """Unties the optimizer from the model (the optimizer's mode stays as it is)."""
        for h in self._handles:
            h.remove()


class _ScheduleFree(StandaloneFusedOptimizer):
    """What both schedule-free optimizers share: the schedule, train()/eval(), the model tie, the refusals."""

    # The schedule (k, lr_max, weight_sum) is group state that only a step that ran may advance; with
    # GradScaler the scaler therefore unscales the gradients and skips step() on inf/NaN itself, as it does
    # for torch.optim's non-fused optimizers, so a skipped step leaves the schedule alone.
    _step_supports_amp_scaling = False

    def _momentum(self, group: dict[str, Any]) -> float:
        """beta1 (AdamW) or momentum (SGD): the weight of x in y."""
        raise NotImplementedError

    def _finish_init(self, ema: Any, max_grad_norm: float | None, l1: float, master_weights: bool,
                     stochastic_rounding: bool, state_dtype: torch.dtype | None, model: nn.Module | None,
                     state_bits: int = 32, min_8bit_size: int = 4096) -> None:
        if state_dtype not in (None, torch.float32):
            raise ValueError(
                f"fusedtrain.optim.{self._opt_name}: state_dtype={state_dtype} is not supported: the state z is the "
                "optimization iterate itself (the parameter is an interpolation toward it), and rounding it to a "
                "low precision every step loses the updates; keep state_dtype=None")
        self._init_extras(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, state_bits,
                          min_8bit_size)
        if model is not None:
            self.tie_to(model)

    def tie_to(self, model: nn.Module) -> ModeTie:
        """Lets ``model``'s train/eval mode drive this optimizer's (Note [schedule-free train/eval]): before every
        forward of ``model`` and before ``model.state_dict()``, ``self.train()`` or ``self.eval()`` is called if
        the optimizer is not in the model's mode. Returns the tie; ``remove()`` undoes it."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"fusedtrain.optim.{self._opt_name}: model= must be an nn.Module, got "
                            f"{type(model).__name__}")
        return ModeTie(self, model)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(len(self.param_groups) - 1, self.param_groups[-1])

    def _check_group(self, gi: int, group: dict[str, Any]) -> None:
        """Refusals at construction (before any step)."""

    # ----------------------------------------------------------------------------------- the schedule
    @staticmethod
    def _schedule(group: dict[str, Any]) -> dict[str, float]:
        """This step's group scalars, computed as the reference computes them (same Python expressions, so the
        same doubles): the warm-up lr, lr_max, the weight sum and c_{k+1} = weight / weight_sum."""
        k = group["k"]
        warmup_steps = group["warmup_steps"]
        sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
        lr = to_scalar(group["lr"], "lr") * sched
        lr_max = max(lr, group["lr_max"])
        weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        weight_sum = group["weight_sum"] + weight
        try:
            ckp1 = weight / weight_sum
        except ZeroDivisionError:
            ckp1 = 0
        return dict(k=k, lr=lr, lr_max=lr_max, weight_sum=weight_sum, ckp1=ckp1)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One fused schedule-free step (see :meth:`FusedOptimizerMixin.step`), then each group's schedule
        advances (``k``, ``lr_max``, ``weight_sum``, ``scheduled_lr``), as the reference's step does.

        Raises:
            RuntimeError: the optimizer is in eval mode (call ``optimizer.train()`` first, or tie it to the
                model with ``model=``); nothing is changed.
        """
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(
                f"fusedtrain.optim.{self._opt_name}: the optimizer is in eval mode (parameters hold x); call "
                "optimizer.train() before training steps and optimizer.eval() before evaluation or saving, or pass "
                "model=your_model to let model.train()/model.eval() switch it. Nothing was updated.")
        loss = super().step(closure)
        for group in self.param_groups:
            s = self._schedule(group)
            group["scheduled_lr"] = s["lr"]
            group["lr_max"] = s["lr_max"]
            group["weight_sum"] = s["weight_sum"]
            group["k"] = s["k"] + 1
        return loss

    def _check_capturable(self) -> None:
        raise RuntimeError(
            f"fusedtrain.optim.{self._opt_name} cannot be captured in a CUDA graph: its schedule (warm-up, lr_max, "
            "weight sum) is computed on the host every step and would be baked into the graph")

    # ------------------------------------------------------------------------------------ train / eval
    @torch.no_grad()
    def _switch(self, to_train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            beta = self._momentum(group)
            weight = 1 - beta if to_train else 1 - 1 / beta
            for p in group["params"]:
                state = self.state[p]
                if "z" not in state:
                    continue
                master = state.get("master_param")
                target = master if master is not None else p
                target.lerp_(end=state["z"].to(target.device), weight=weight)
                if master is not None:
                    p.copy_(master)
            group["train_mode"] = to_train

    def train(self) -> None:
        """Training mode: the parameters hold y (where gradients are taken); ``step()`` requires it."""
        self._switch(True)

    def eval(self) -> None:
        """Evaluation mode: the parameters hold x (the average to evaluate and to save)."""
        self._switch(False)


class ScheduleFreeAdamW(_ScheduleFree):
    r"""Schedule-Free AdamW (Defazio et al., 2024), a drop-in for ``schedulefree.AdamWScheduleFree`` that runs one
    fused kernel per (device, dtype) group.

    With :math:`c_{k+1} = w_{k+1}/\sum_{i\le k+1} w_i`, :math:`w_k = k^r\,\eta_{\max}^{p}` (``r``,
    ``weight_lr_power`` :math:`p`) and the warm-up lr :math:`\eta_k`:

    .. math::
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2,\qquad d = \frac{g}{\sqrt{v/(1-\beta_2^{k+1})} + \epsilon}
             + \lambda y \\
        y &\leftarrow (1-c_{k+1})\,y + c_{k+1} z + \eta_k(\beta_1(1-c_{k+1}) - 1)\,d,\qquad z \leftarrow z - \eta_k d

    The parameter holds y in training mode and x (the average to evaluate) in eval mode; see
    Note [schedule-free train/eval] in this module: call ``train()`` before training and ``eval()`` before
    evaluating or saving, or pass ``model=`` to let the model's mode drive both.

    Args:
        params, lr, betas, eps, weight_decay, warmup_steps, r, weight_lr_power: as in AdamWScheduleFree (same
            defaults: ``lr=0.0025``, ``betas=(0.9, 0.999)``, ``eps=1e-8``, ``weight_decay=0``, ``warmup_steps=0``,
            ``r=0``, ``weight_lr_power=2``). A tensor ``lr`` is read on the host each step.
        foreach: accepted and recorded, as the reference records it; the fused kernels always run.
        model: an ``nn.Module`` whose train/eval mode this optimizer follows (:meth:`tie_to`); optional.
        ema, max_grad_norm, l1, master_weights, stochastic_rounding: the options fusedtrain adds to every
            optimizer; see :class:`~fusedtrain.optim._base.FusedOptimizerMixin` (``ema`` averages y, the
            parameter as it is after each step). ``state_dtype`` must stay None (z is the iterate itself). With
            a GradScaler the scaler unscales and skips steps on inf itself (the schedule must not advance on a
            skipped step). Complex parameters are refused (the reference squares complex gradients as
            complex numbers).
        state_bits: 32 (float states, the default) or 8: ``exp_avg_sq`` of every real parameter of >= 2 dims
            with at least ``min_8bit_size`` elements (default 4096) as uint8 codes of its square root plus one
            float32 absmax per block of up to 256 elements of a row (Note [8-bit states in the optimizers] in
            ``_base.py``), while ``z`` stays float: it is the optimization iterate itself (y interpolates toward
            it, x averages it), so it keeps the parameters' precision. Smaller parameters keep float states.
        min_8bit_size: see ``state_bits``.

    State: the reference's keys, ``z`` and ``exp_avg_sq`` per parameter (at ``state_bits=8``: codes and
    ``exp_avg_sq_absmax``; :func:`fusedtrain.optim.to_torch_state_dict` gives float ones), and per group ``k``,
    ``lr_max``, ``weight_sum``, ``scheduled_lr``, ``train_mode``; ``state_dict()`` loads into AdamWScheduleFree
    and back.
    Unlike the reference, the step leaves ``p.grad`` as it was (the reference normalizes it in place).
    """

    _opt_name = "ScheduleFreeAdamW"
    _rule = "sf_adamw"
    # Note [8-bit states in the optimizers] (_base.py): exp_avg_sq in 8 bits, z float (Note [mixed state lists]
    # in csrc/include/fusedtrain/rules_quant.h; rules_sf_quant.h says why)
    _rule_8bit = "sf_adamw8bit"
    _float_8bit_states = frozenset({"z"})

    def __init__(self, params: Any, lr: float | Tensor = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, foreach: bool | None = True, *, model: nn.Module | None = None,
                 ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None,
                 state_bits: int = 32, min_8bit_size: int = 4096) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, r=r, k=0, warmup_steps=warmup_steps, train_mode=False,
                        weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=weight_lr_power,
                        weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)
        self._finish_init(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, model,
                          state_bits, min_8bit_size)

    def _check_group(self, gi: int, group: dict[str, Any]) -> None:
        if any(p.is_complex() for p in group["params"]):
            raise ValueError(
                f"fusedtrain.optim.ScheduleFreeAdamW: param_groups[{gi}] has complex parameters, which are not "
                "supported (the reference squares complex gradients as complex numbers); optimize "
                "torch.view_as_real(p) instead")

    def _momentum(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["z", "exp_avg_sq"]

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "z" not in state:
            source = self._master(p) if self._kind(p) == "master" else p
            state["z"] = source.detach().clone(memory_format=torch.preserve_format).to(self._state_dtype_for(p))
            state["exp_avg_sq"] = self._zeros(p)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        s = self._schedule(group)
        beta1, beta2 = group["betas"]
        beta1, beta2 = to_scalar(beta1, "betas[0]"), to_scalar(beta2, "betas[1]")
        lr, ckp1 = s["lr"], s["ckp1"]
        return dict(beta2=beta2, eps=group["eps"], weight_decay=to_scalar(group["weight_decay"], "weight_decay"),
                    bias_correction2=1 - beta2 ** (s["k"] + 1), ckp1=ckp1, y_coef=lr * (beta1 * (1 - ckp1) - 1),
                    scheduled_lr=lr)


class ScheduleFreeSGD(_ScheduleFree):
    r"""Schedule-Free SGD (Defazio et al., 2024), a drop-in for ``schedulefree.SGDScheduleFree`` that runs one fused
    kernel per (device, dtype) group.

    .. math::
        d = g + \lambda y,\qquad y \leftarrow (1-c_{k+1})\,y + c_{k+1} z + \eta_k(\mu(1-c_{k+1}) - 1)\,d,
        \qquad z \leftarrow z - \eta_k d

    with :math:`c_{k+1}` and :math:`\eta_k` as in :class:`ScheduleFreeAdamW` (momentum :math:`\mu`).

    Args:
        params, lr, momentum, weight_decay, warmup_steps, r, weight_lr_power: as in SGDScheduleFree (same
            defaults: ``lr=1.0``, ``momentum=0.9``, ``weight_decay=0``, ``warmup_steps=0``, ``r=0``,
            ``weight_lr_power=2``, and the same validation errors).
        foreach, model, ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype: as in
            :class:`ScheduleFreeAdamW` (complex parameters are supported here: the update is linear).

    State: ``z`` per parameter and the reference's group keys; train()/eval() and ``model=`` as in
    :class:`ScheduleFreeAdamW`. Unlike the reference, the step leaves ``p.grad`` as it was.
    """

    _opt_name = "ScheduleFreeSGD"
    _rule = "sf_sgd"
    _no_8bit_reason = ("its only state z is the optimization iterate itself (the parameter is an interpolation "
                       "toward it), which 8-bit codes cannot hold to the parameters' precision")

    def __init__(self, params: Any, lr: float | Tensor = 1.0, momentum: float = 0.9, weight_decay: float = 0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2, foreach: bool | None = True, *,
                 model: nn.Module | None = None, ema: Any = None, max_grad_norm: float | None = None, l1: float = 0.0,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, state_bits: int = 32) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if momentum <= 0 or momentum >= 1:
            raise ValueError(f"Momentum must be between 0 and 1 exclusive: {momentum}")
        defaults = dict(lr=lr, momentum=momentum, r=r, k=0, warmup_steps=warmup_steps, train_mode=False,
                        weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=weight_lr_power,
                        weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)
        self._finish_init(ema, max_grad_norm, l1, master_weights, stochastic_rounding, state_dtype, model,
                          state_bits)

    def _momentum(self, group: dict[str, Any]) -> float:
        return group["momentum"]

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["z"]

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        if "z" not in state:
            source = self._master(p) if self._kind(p) == "master" else p
            state["z"] = source.detach().clone(memory_format=torch.preserve_format).to(self._state_dtype_for(p))

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        s = self._schedule(group)
        lr, ckp1 = s["lr"], s["ckp1"]
        return dict(weight_decay=to_scalar(group["weight_decay"], "weight_decay"), ckp1=ckp1,
                    y_coef=lr * (to_scalar(group["momentum"], "momentum") * (1 - ckp1) - 1), scheduled_lr=lr)
