"""The whole optimizer step captured in a CUDA graph and replayed: host time independent of the model.

Note [captured step]:
A fusedtrain step's host work is already O(1) Python per group plus an O(tensors) C++ check (Note [step
plan] in csrc/plan.cpp); on a GPU the remaining launches (GradScaler's inf check, the norm, the update, the
EMA, the scale update) still cost a few microseconds each. :class:`CapturedStep` records all of them once in a
CUDA graph and replays the graph on every later step:

- warm-up: the first ``warmup`` steps run eagerly (the plan is built, states are created, allocators warm);
- capture: the next step is recorded in a graph (torch.cuda.graph) and replayed at once;
- replay: before each replay the plan's check confirms that nothing it relies on changed and that every
  gradient sits where it sat at capture (the graph reads recorded addresses: use
  ``optimizer.zero_grad(set_to_none=False)``, or a captured backward, so gradients keep their memory), the
  learning rates set by any LR scheduler are copied into device tensors the kernels read, and the graph runs.
  Anything else that changed (a param group added, state loaded, another hyperparameter, new gradient
  memory) makes the next step eager and the one after a fresh capture.

What the captured kernels read from device memory, so that it is fresh on every replay: the step counters
(kept on the device, as ``capturable=True`` keeps them), the learning rate, GradScaler's scale and found_inf,
the clip coefficient, the EMA's weight and count (Note [EMA counter on the device]) and the seed of stochastic
rounding (drawn by torch's CUDA generator, whose offset advances on every replay). On the CPU the step is
simply the eager one.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from ._base import FusedOptimizerMixin

__all__ = ["CapturedStep"]


class CapturedStep:
    r"""Runs ``optimizer.step()`` (with ``scaler.step`` / ``scaler.update`` when a GradScaler is given) as a
    replayed CUDA graph (Note [captured step]).

    Example::

        opt = fusedtrain.optim.AdamW(model.parameters(), lr=3e-4, max_grad_norm=1.0, ema=ema)
        step = fusedtrain.optim.CapturedStep(opt, scaler)
        for x, y in loader:
            opt.zero_grad(set_to_none=False)       # gradients keep their memory between steps
            scaler.scale(loss_fn(model(x), y)).backward()
            step()                                  # = scaler.step(opt); scaler.update()
            scheduler.step()                        # the new lr reaches the graph through a device tensor

    Args:
        optimizer: a fusedtrain optimizer. Its step counters are kept on the parameters' device from now on
            (as ``capturable=True`` keeps them; ``state_dict()`` holds them there, as torch's capturable
            optimizers do).
        scaler: a ``torch.amp.GradScaler`` (optional): its ``step`` and ``update`` are part of the graph.
        warmup: eager steps before the first capture (at least 1: the first step builds the state).
        check: before each replay, run the plan's check (O(tensors) pointer comparisons in C++, a few
            nanoseconds each) that no parameter, state or gradient moved. Turn it off only when nothing is
            ever reassigned and gradients are never freed; a replay after such a change reads stale memory.

    On the CPU (or with parameters on several kinds of devices) every step is eager.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: Any = None, *, warmup: int = 3,
                 check: bool = True) -> None:
        if not isinstance(optimizer, FusedOptimizerMixin):
            raise TypeError(f"CapturedStep drives a fusedtrain optimizer, got {type(optimizer).__name__}; wrap "
                            "e.g. fusedtrain.optim.AdamW(...)")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1, got {warmup!r}")
        if optimizer._use_torch_step():
            raise ValueError("CapturedStep cannot drive differentiable=True param groups (torch's own step)")
        self.optimizer = optimizer
        self.scaler = scaler
        self.warmup = warmup
        self.check = check
        self._graph: Any = None
        self._key: Any = None
        self._eager_steps = 0
        self._lrs: list[Tensor] | None = None
        self._warned = False
        optimizer.__dict__["_ft_device_steps"] = True
        optimizer.__dict__["_ft_plan"] = None

    def __call__(self) -> None:
        self.step()

    def step(self) -> None:
        """One optimizer step: a graph replay, or an eager step while warming up or after a change."""
        opt = self.optimizer
        device = self._device()
        if device is None:
            self._eager()
            return
        self._set_lrs(device)
        if self._graph is not None:
            if self._replayable():
                self._graph.replay()
                return
            self._graph = None
            self._eager_steps = self.warmup - 1  # one eager step (rebuilds what changed), then capture
        if self._eager_steps < self.warmup or opt.__dict__.get("_ft_plan") is None:
            self._eager_steps += 1
            self._eager()
            return
        self._capture()
        self._graph.replay()

    def zero_grad(self) -> None:
        """``optimizer.zero_grad(set_to_none=False)``: the gradients keep the memory the graph reads."""
        self.optimizer.zero_grad(set_to_none=False)

    # ------------------------------------------------------------------------------------------ internals
    def _device(self) -> torch.device | None:
        devices = {p.device for g in self.optimizer.param_groups for p in g["params"]}
        if len(devices) != 1:
            return None
        (device,) = devices
        return device if device.type == "cuda" and torch.cuda.is_available() else None

    def _set_lrs(self, device: torch.device) -> None:
        """The groups' learning rates as float32 device tensors the kernels read (a tensor lr is used as is)."""
        groups = self.optimizer.param_groups
        if self._lrs is None or len(self._lrs) != len(groups):
            self._lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in groups]
        lrs = []
        for t, group in zip(self._lrs, groups):
            lr = group["lr"]
            if isinstance(lr, Tensor):
                lrs.append(lr)
            else:
                t.fill_(float(lr))
                lrs.append(t)
        self.optimizer.__dict__["_ft_lrs"] = lrs

    def _eager(self) -> None:
        opt = self.optimizer
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def _state_key(self) -> Any:
        """What the graph baked in besides memory: the plan, every group's hyperparameters and l1, the
        options and the EMA."""
        opt = self.optimizer
        hypers = tuple(tuple(_ops.hyper_list(opt._rule, opt._hyper(g))) + (float(g.get("l1", 0.0)),)
                       for g in opt.param_groups)
        return (id(opt.__dict__.get("_ft_plan")), hypers, opt.max_grad_norm, id(opt.ema), id(self.scaler),
                tuple(isinstance(g["lr"], Tensor) for g in opt.param_groups))

    def _replayable(self) -> bool:
        opt = self.optimizer
        plan = opt.__dict__.get("_ft_plan")
        if plan is None or self._state_key() != self._key:
            return False
        if self.check:
            status = plan.impl.check([g["params"] for g in opt.param_groups], opt.state)
            if status == 2 and not self._warned:
                self._warned = True
                warnings.warn("fusedtrain.optim.CapturedStep: gradients moved since the step was captured (new "
                              "gradient tensors, e.g. zero_grad(set_to_none=True)); recapturing. Call "
                              "optimizer.zero_grad(set_to_none=False) so that the graph can be replayed.",
                              stacklevel=3)
            return status == 1
        return True

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records on torch's side stream; nothing runs until replay()
            self._eager()
        self._graph = graph
        self._key = self._state_key()
