"""The base of fusedtrain optimizers that have no torch.optim counterpart (Lion, Schedule-Free).

FusedOptimizerMixin is written for subclasses of a torch.optim class: it borrows that class's constructor
checks, and its ``step`` for the parameters the fused kernels do not update ("external": sparse gradients,
meta parameters) and for ``differentiable=True``. These optimizers subclass ``torch.optim.Optimizer``
directly (their references, timm's Lion and the schedulefree package, are not dependencies of fusedtrain),
so there is no torch step to borrow: sparse gradients are refused, as the references refuse or cannot
handle them, and meta parameters get their states and no arithmetic (there are no values to update).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import FusedOptimizerMixin

__all__ = ["StandaloneFusedOptimizer"]


class StandaloneFusedOptimizer(FusedOptimizerMixin, torch.optim.Optimizer):
    """FusedOptimizerMixin over ``torch.optim.Optimizer`` itself (see the module's docstring)."""

    _torch_cls = torch.optim.Optimizer
    # Sparse gradients are routed to _check_external, which refuses them with this class's own message
    # (the mixin's default message names a torch.optim class these optimizers do not have).
    _supports_sparse = True

    def _sparse_refusal(self, group: dict[str, Any]) -> str | None:
        return (f"fusedtrain.optim.{self._opt_name} does not support sparse gradients (nor does its reference "
                "implementation); use torch.optim.SparseAdam for parameters with sparse gradients (e.g. "
                "nn.Embedding(sparse=True))")

    def _torch_step(self, closure: Any) -> Any:
        raise RuntimeError(f"fusedtrain.optim.{self._opt_name} has no torch.optim implementation to fall back on")

    def _external_step(self, external: list[tuple[int, list[int]]], grad_scale: Tensor | None,
                       found_inf: Tensor | None) -> None:
        """Meta parameters (the only external ones left after _check_external): their states are made, as the
        reference makes them; an update of a meta tensor computes no values."""
        for gi, positions in external:
            group = self.param_groups[gi]
            for i in positions:
                self._init_state(group, group["params"][i])
