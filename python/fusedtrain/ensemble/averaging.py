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
        self._count: int | Tensor = 0
        self._rest: tuple[Any, list[int], list[Tensor], list[Tensor]] | None = None

    # Note [EMA counter on the device]: the number of updates decides the weight of the next one (an EMA
    # warm-up, SWA's 1/(n+1)). It is a host int, except when the host cannot know it: while a CUDA graph is
    # being captured (a replayed update must count and weigh itself), or when GradScaler's found_inf is left
    # on the device (a skipped step must not count). Then it becomes a float64 tensor on the averages'
    # device, advanced by the device (by 1 - found_inf), and the weights are computed there from it; reading
    # num_updates then waits for the device.
    @property
    def num_updates(self) -> int:
        """How many updates the averages have had (a skipped step is not one)."""
        count = self._count
        return int(count.item()) if isinstance(count, Tensor) else count

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        if isinstance(self._count, Tensor):
            self._count.fill_(int(value))
        else:
            self._count = int(value)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rest"] = None  # a cache keyed by object identity: rebuilt by the copy
        return state

    def _device_count(self, device: torch.device | None) -> Tensor:
        """The update counter as a device tensor (Note [EMA counter on the device])."""
        if not isinstance(self._count, Tensor):
            dev = device if device is not None else (local(self._averages[0]).device if self._averages else None)
            self._count = torch.tensor(float(self._count), dtype=torch.float64, device=dev)
        return self._count

    def _needs_device_count(self, device: torch.device | None, found_inf: Tensor | None) -> bool:
        if isinstance(self._count, Tensor):
            return True
        if found_inf is not None:
            return True
        return device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    # -- the weight schedule -------------------------------------------------------------------
    def weight_at(self, n: int) -> float:
        """The weight w of the (n+1)-th update."""
        raise NotImplementedError

    def _weight_tensor(self, count: Tensor) -> Tensor | None:
        """The weight of the next update computed on the device from the counter, or None when it does not
        depend on the count (a constant decay)."""
        raise NotImplementedError

    def next_weight(self) -> float:
        """The weight the next update will use."""
        return self.weight_at(self.num_updates)

    def weight_args(self, device: torch.device | None = None,
                    found_inf: Tensor | None = None) -> tuple[float, Tensor | None]:
        """The next update's weight as the kernels take it: (a host float, None), or (0.0, a float32 tensor
        on the device) in device-counter mode (Note [EMA counter on the device])."""
        if self._needs_device_count(device, found_inf):
            count = self._device_count(device)
            w = self._weight_tensor(count)
            if w is not None:
                return 0.0, w.to(torch.float32)
            return self.weight_at(0), None
        return self.next_weight(), None

    # -- updates ---------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, found_inf: Tensor | None = None) -> None:
        """Moves every average toward the model's current parameters (one fused kernel per device
        and dtype) and averages or copies the buffers. A non-zero ``found_inf`` (GradScaler's, on the device)
        makes it a no-op, decided on the device."""
        weight = self.weight_args(self._device_of_params(), found_inf)
        self._update_params(range(len(self._params)), weight, found_inf)
        self._update_buffers(weight, found_inf)
        self._advance(found_inf)

    def averages_for(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        """The averages of ``params`` (in order), or None if one of them is not in the model."""
        index = self._index
        try:
            return [self._averages[index[id(p)]] for p in params]
        except KeyError:
            return None

    @torch.no_grad()
    def finish_fused_update(self, updated: Sequence[Tensor], found_inf: Tensor | None = None) -> None:
        """Completes an update whose averages of ``updated`` an optimizer step already moved (with the weight
        of :meth:`weight_args`): the other parameters' averages and the buffers, then the count. ``found_inf``:
        GradScaler's flag when it was left to the device (the step's kernels skipped or not on it).

        The optimizers pass the same ``updated`` list object on every step of a plan, so the rest of the
        model is found once per plan, not per step."""
        rest = self._rest
        if rest is None or rest[0] is not updated:
            done = {id(p) for p in updated}
            index = [i for i, p in enumerate(self._params) if id(p) not in done]
            rest = self._rest = (updated, index, [self._averages[i] for i in index], [self._params[i] for i in index])
        weight = self.weight_args(self._device_of_params(), found_inf)
        if rest[1]:
            F.ema(rest[2], rest[3], weight=weight[1] if weight[1] is not None else weight[0], found_inf=found_inf)
        self._update_buffers(weight, found_inf)
        self._advance(found_inf)

    def _device_of_params(self) -> torch.device | None:
        return local(self._averages[0]).device if self._averages else None

    def _advance(self, found_inf: Tensor | None) -> None:
        if isinstance(self._count, Tensor):
            if found_inf is not None:
                self._count.add_(1.0 - found_inf.to(self._count.device, torch.float64))
            else:
                self._count.add_(1.0)
        else:
            self._count += 1

    def _update_params(self, index: Sequence[int], weight: tuple[float, Tensor | None],
                       found_inf: Tensor | None = None) -> None:
        w = weight[1] if weight[1] is not None else weight[0]
        if len(index) == len(self._params):
            F.ema(self._averages, self._params, weight=w, splits=self._splits, found_inf=found_inf)
        elif index:
            F.ema([self._averages[i] for i in index], [self._params[i] for i in index], weight=w,
                  found_inf=found_inf)

    def _update_buffers(self, weight: tuple[float, Tensor | None], found_inf: Tensor | None = None) -> None:
        if self._averaged_buffers:
            F.ema([a for _, a in self._averaged_buffers], [b for b, _ in self._averaged_buffers],
                  weight=weight[1] if weight[1] is not None else weight[0], found_inf=found_inf)
        for b, a in self._copied_buffers:
            if found_inf is None:
                a.copy_(b)
            else:  # decided on the device: keep the copy when the step was skipped
                a.copy_(torch.where(found_inf.to(a.device) != 0, a, b))

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

    def _weight_tensor(self, count: Tensor) -> Tensor | None:
        if self.warmup is None:
            return None
        return 1.0 - torch.clamp((1.0 + count) / (self.warmup + count), max=self.decay)


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

    def _weight_tensor(self, count: Tensor) -> Tensor | None:
        return 1.0 / (count + 1.0)


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
