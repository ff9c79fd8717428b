"""Snapshot ensembles (Huang et al., 2017, "Snapshot Ensembles: Train 1, get M for free")."""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["CyclicCosineLR", "SnapshotEnsemble"]


class CyclicCosineLR(LRScheduler):
    r"""The cyclic cosine annealing of snapshot ensembles, stepped once per iteration (Eq. 2):

    .. math:: \alpha(t) = \frac{\alpha_0}{2}\left(\cos\left(\frac{\pi\,\operatorname{mod}(t-1,
              \lceil T/M\rceil)}{\lceil T/M\rceil}\right) + 1\right)

    with :math:`\alpha_0` each group's initial lr, T = ``total_steps`` iterations, M = ``cycles``.
    Indexing: iteration t = 1, 2, ... is the t-th call of ``optimizer.step()``; it runs with the lr set
    after ``scheduler.step()`` was called t-1 times, i.e. ``last_epoch = t - 1``. A cycle ends after
    iterations t that are multiples of :math:`\lceil T/M\rceil` (and after t = T): there the lr has
    fallen to its lowest value and :class:`SnapshotEnsemble` takes a snapshot.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, cycles: int,
                 last_epoch: int = -1) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        if not isinstance(cycles, int) or not 1 <= cycles <= total_steps:
            raise ValueError(f"cycles must be an integer in [1, total_steps={total_steps}], got {cycles!r}")
        self.total_steps = total_steps
        self.cycles = cycles
        self.period = math.ceil(total_steps / cycles)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, t: int) -> float:
        """The lr of iteration t (1-based), Eq. 2."""
        return base_lr / 2 * (math.cos(math.pi * ((t - 1) % self.period) / self.period) + 1)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [self.lr_at(base, self.last_epoch + 1) for base in self.base_lrs]

    def is_cycle_end(self, t: int) -> bool:
        """Whether iteration t (1-based) ends a cycle."""
        return t % self.period == 0 or t == self.total_steps


class SnapshotEnsemble:
    """Trains one model with :class:`CyclicCosineLR` and keeps a snapshot at the end of each cycle.

    Call :meth:`step` after each ``optimizer.step()``; :meth:`predict` averages the softmax outputs of
    the kept snapshots. Snapshots live in CPU memory (``store="cpu"``) or as files in a directory
    (``store=path``), never as M models on the GPU: prediction loads them one at a time into a single
    evaluation copy of the model.

    Args:
        model: the model being trained.
        optimizer: its optimizer (any torch or fusedtrain optimizer); its lr becomes the schedule's
            :math:`\\alpha_0`.
        total_steps: T, the training budget in iterations.
        cycles: M, the number of cosine cycles (and snapshots).
        keep_last: keep only the last m snapshots (None: all).
        store: ``"cpu"`` or a directory for ``snapshot_<k>.pt`` files.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, cycles: int,
                 keep_last: int | None = None, store: str | os.PathLike[str] = "cpu") -> None:
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be None or a positive integer, got {keep_last!r}")
        self.model = model
        self.scheduler = CyclicCosineLR(optimizer, total_steps, cycles)
        self.keep_last = keep_last
        self.store = str(store)
        if self.store != "cpu":
            os.makedirs(self.store, exist_ok=True)
        self.iteration = 0
        self.snapshots: list[Any] = []  # state dicts (cpu) or file paths
        self.snapshot_steps: list[int] = []
        self._eval_model: nn.Module | None = None

    def step(self) -> bool:
        """Advances the schedule by one iteration; returns True when a snapshot was taken."""
        self.iteration += 1
        taken = self.scheduler.is_cycle_end(self.iteration)
        if taken:
            self._snapshot()
        self.scheduler.step()
        return taken

    def _snapshot(self) -> None:
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        if self.store == "cpu":
            self.snapshots.append(state)
        else:
            path = os.path.join(self.store, f"snapshot_{len(self.snapshot_steps)}.pt")
            torch.save(state, path)
            self.snapshots.append(path)
        self.snapshot_steps.append(self.iteration)
        while self.keep_last is not None and len(self.snapshots) > self.keep_last:
            old = self.snapshots.pop(0)
            self.snapshot_steps.pop(0)
            if isinstance(old, str) and os.path.exists(old):
                os.remove(old)

    def _load(self, snapshot: Any) -> dict[str, Tensor]:
        return torch.load(snapshot, map_location="cpu") if isinstance(snapshot, str) else snapshot

    def models(self) -> list[nn.Module]:
        """The kept snapshots as separate models on the CPU, in eval mode."""
        out = []
        for snap in self.snapshots:
            m = copy.deepcopy(self.model).to("cpu")
            m.load_state_dict(self._load(snap))
            out.append(m.eval())
        return out

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int | None = None) -> Tensor:
        """Mean of the softmax outputs of the kept snapshots (eval mode, no grad), shape (N, classes).

        Args:
            x: a batch of inputs on the model's device.
            batch_size: split ``x`` into chunks of this many rows (optional).
        """
        if not self.snapshots:
            raise RuntimeError("SnapshotEnsemble.predict: no snapshot yet; call step() after each optimizer "
                               "step until the first cycle ends")
        if self._eval_model is None:
            self._eval_model = copy.deepcopy(self.model)
        net = self._eval_model.eval()
        chunks = [x] if batch_size is None else list(x.split(batch_size))
        total: Tensor | None = None
        for snap in self.snapshots:
            net.load_state_dict(self._load(snap))
            probs = torch.cat([torch.softmax(net(c), dim=-1) for c in chunks])
            total = probs if total is None else total + probs
        assert total is not None
        return total / len(self.snapshots)

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "snapshots": list(self.snapshots),
                "snapshot_steps": list(self.snapshot_steps), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.snapshots = list(state["snapshots"])
        self.snapshot_steps = list(state["snapshot_steps"])
        self.scheduler.load_state_dict(state["scheduler"])
