"""Weight averaging: EMA / Polyak averaging and SWA on fusedtrain's fused multi-tensor kernel."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .._dtensor import is_fsdp_module, local
from ..optim import functional as F

__all__ = ["EMA", "SWA", "update_bn"]


class _Averager:
    """An averaged copy of a model, updated as ``a <- a + w_t (theta - a)`` by the fused ``ema_`` op."""

    def __init__(self, model: nn.Module, buffers: str) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if buffers not in ("average", "copy"):
            raise ValueError(f"buffers must be 'average' or 'copy', got {buffers!r}")
        self.buffers = buffers
        self._model = model
        self._params = [p for p in model.parameters()]
        # Note [sharded averages]: an FSDP2 model (fully_shard) cannot be deep-copied, and a copy could not
        # run without its own sharding. Its averages are then clones of the parameters, DTensors sharded
        # like them (the kernels average the local shards), with no module around them: evaluate with
        # average_parameters(), which swaps them into the model's shards.
        self.module: nn.Module | None = None if is_fsdp_module(model) else copy.deepcopy(model)
        if self.module is None:
            self._averages = [p.detach().clone() for p in self._params]
            copies = [b.detach().clone() for b in model.buffers()]
        else:
            for p in self.module.parameters():
                p.requires_grad_(False)
            self._averages = [a for a in self.module.parameters()]
            copies = list(self.module.buffers())
        self._index = {id(p): i for i, p in enumerate(self._params)}
        pairs = list(zip(model.buffers(), copies))
        # (model buffer, its copy): floating ones averaged when buffers="average", the rest copied
        self._averaged_buffers = [(b, a) for b, a in pairs if buffers == "average" and b.is_floating_point()]
        self._copied_buffers = [(b, a) for b, a in pairs if not (buffers == "average" and b.is_floating_point())]
        self._splits = F.splits_for(self._averages)  # (device, dtype) groups, computed once
        self.num_updates = 0

    # -- the weight schedule -------------------------------------------------------------------
    def weight_at(self, n: int) -> float:
        """The weight w of the (n+1)-th update."""
        raise NotImplementedError

    def next_weight(self) -> float:
        """The weight the next update will use."""
        return self.weight_at(self.num_updates)

    # -- updates ---------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self) -> None:
        """Moves every average toward the model's current parameters (one fused kernel per device
        and dtype) and averages or copies the buffers."""
        self._update_params(range(len(self._params)), self.next_weight())  # under no_grad
        self._update_buffers()
        self.num_updates += 1

    def averages_for(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        """The averages of ``params`` (in order), or None if one of them is not in the model."""
        index = self._index
        try:
            return [self._averages[index[id(p)]] for p in params]
        except KeyError:
            return None

    @torch.no_grad()
    def finish_fused_update(self, updated: Sequence[Tensor]) -> None:
        """Completes an update whose averages of ``updated`` an optimizer step already moved."""
        done = {id(p) for p in updated}
        rest = [i for i, p in enumerate(self._params) if id(p) not in done]
        self._update_params(rest, self.next_weight())
        self._update_buffers()
        self.num_updates += 1

    def _update_params(self, index: Sequence[int], weight: float) -> None:
        if len(index) == len(self._params):
            F.ema(self._averages, self._params, weight=weight, splits=self._splits)
        elif index:
            F.ema([self._averages[i] for i in index], [self._params[i] for i in index], weight=weight)

    def _update_buffers(self) -> None:
        if self._averaged_buffers:
            F.ema([a for _, a in self._averaged_buffers], [b for b, _ in self._averaged_buffers],
                  weight=self.next_weight())
        for b, a in self._copied_buffers:
            a.copy_(b)

    # -- evaluation with the averaged weights -----------------------------------------------------
    @torch.no_grad()
    def swap(self) -> None:
        """Exchanges the model's parameters (and averaged buffers) with the averages, in place."""
        for p, a in list(zip(self._params, self._averages)) + self._averaged_buffers:
            p, a = local(p), local(a)  # DTensors: swap the shards
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)

    @contextmanager
    def average_parameters(self) -> Iterator[nn.Module]:
        """``with ema.average_parameters(): evaluate(model)``: the model holds the averaged weights
        inside the block and its own weights again after it."""
        self.swap()
        try:
            yield self._model
        finally:
            self.swap()

    def _named_averages(self) -> dict[str, Tensor]:
        """The averages and buffer copies of a sharded model under the model's names (Note [sharded averages])."""
        names = [n for n, _ in self._model.named_parameters()] + [n for n, _ in self._model.named_buffers()]
        copies = {id(b): a for b, a in self._averaged_buffers + self._copied_buffers}
        values = self._averages + [copies[id(b)] for b in self._model.buffers()]
        return dict(zip(names, values))

    def state_dict(self) -> dict[str, Any]:
        """``{"module": the averaged model's state dict, "num_updates": n}``. For an FSDP2 model the
        averages are DTensors under the model's parameter and buffer names (savable with
        ``torch.distributed.checkpoint``)."""
        module = self.module.state_dict() if self.module is not None else self._named_averages()
        return {"module": module, "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        if self.module is not None:
            self.module.load_state_dict(state["module"])
        else:
            averages = self._named_averages()
            missing = sorted(set(averages) - set(state["module"]))
            if missing:
                raise KeyError(f"EMA.load_state_dict: the state has no average for {missing}")
            for name, a in averages.items():
                a.copy_(state["module"][name])
        self.num_updates = int(state["num_updates"])


class EMA(_Averager):
    r"""Exponential moving average of a model's weights (Polyak averaging with forgetting):

    .. math:: \bar\theta \leftarrow \beta_t \bar\theta + (1-\beta_t)\,\theta

    updated by one fused multi-tensor kernel per (device, dtype). ``ema.module`` is the averaged
    copy; ``with ema.average_parameters():`` evaluates the original model with the averaged weights.

    Distributed: with DDP, pass the inner model (``EMA(ddp.module)``); every rank holds the same
    averages. With FSDP2 (``fully_shard``) the averages are DTensors sharded like the parameters and
    each rank averages its shards; such a model cannot be deep-copied, so ``ema.module`` is None:
    evaluate with ``average_parameters()``. ``state_dict()`` then holds the sharded averages under the
    model's names, for ``torch.distributed.checkpoint``.

    Pass it to a fusedtrain optimizer (``Adam(..., ema=ema)``) and the step's kernel updates the
    averages of the parameters it changes in the same pass; results equal ``opt.step(); ema.update()``.

    Args:
        model: the model to average; the EMA keeps a deep copy (create the EMA after moving the model
            to its device and dtype).
        decay: :math:`\beta` in [0, 1].
        warmup: None for a constant decay; an integer W > 0 for :math:`\beta_t = \min(\beta,
            (1 + t)/(W + t))` at update t (W = 10 is TensorFlow's ``num_updates`` rule), so early
            averages do not remember the random initialization.
        buffers: ``"average"`` averages floating-point buffers (BatchNorm statistics) like weights,
            ``"copy"`` copies them; integer buffers are always copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: int | None = None,
                 buffers: str = "average") -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if warmup is not None and (not isinstance(warmup, int) or warmup < 1):
            raise ValueError(f"warmup must be None or a positive integer, got {warmup!r}")
        super().__init__(model, buffers)
        self.decay = float(decay)
        self.warmup = warmup

    def decay_at(self, n: int) -> float:
        """:math:`\\beta_t` of the (n+1)-th update."""
        if self.warmup is None:
            return self.decay
        return min(self.decay, (1.0 + n) / (self.warmup + n))

    def weight_at(self, n: int) -> float:
        return 1.0 - self.decay_at(n)


class SWA(_Averager):
    r"""Stochastic weight averaging (Izmailov et al., 2018): the equal-weight running mean of the
    weights seen at each :meth:`update`, :math:`\bar\theta_{n+1} = \bar\theta_n + (\theta -
    \bar\theta_n)/(n+1)`. Buffers are copied; recompute BatchNorm statistics with :func:`update_bn`.
    Like :class:`EMA` it can ride along an optimizer step (``ema=swa``), averaging at every step.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, buffers="copy")

    def weight_at(self, n: int) -> float:
        return 1.0 / (n + 1)


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: nn.Module, device: torch.device | str | None = None,
              call_fn: Callable[[nn.Module, Any], Any] | None = None) -> None:
    """Recomputes the BatchNorm running statistics of ``model`` with one pass over ``loader``, as
    ``torch.optim.swa_utils.update_bn`` does (cumulative averages, momentum restored after).

    Args:
        loader: batches; a batch that is a list or tuple is fed by its first element.
        model: the model (typically ``swa.module``).
        device: moves each input there first (optional).
        call_fn: ``call_fn(model, batch)`` runs the model on a batch, for models with several inputs.
    """
    momenta = {}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            momenta[module] = module.momentum
    if not momenta:
        return
    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None
    for batch in loader:
        if call_fn is not None:
            call_fn(model, batch)
            continue
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if device is not None:
            x = x.to(device)
        model(x)
    for module, momentum in momenta.items():
        module.momentum = momentum
    model.train(was_training)
