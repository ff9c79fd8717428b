"""Prediction ensembles of independently trained models."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

__all__ = ["Ensemble"]

_COMBINE = ("mean_softmax", "mean_logits", "vote")


def _same_architecture(models: Sequence[nn.Module]) -> bool:
    first = models[0]
    sig = [(n, p.shape, p.dtype, p.device) for n, p in first.named_parameters()]
    bsig = [(n, b.shape, b.dtype, b.device) for n, b in first.named_buffers()]
    return all(type(m) is type(first)
               and [(n, p.shape, p.dtype, p.device) for n, p in m.named_parameters()] == sig
               and [(n, b.shape, b.dtype, b.device) for n, b in m.named_buffers()] == bsig for m in models[1:])


class Ensemble(nn.Module):
    """Combines the predictions of several models (evaluated in eval mode).

    When all members share an architecture, their weights are stacked once
    (``torch.func.stack_module_state``) and evaluated in one vectorized call (``torch.func.vmap``);
    otherwise the members run one after another. The stacked weights are a copy taken at construction
    (or by :meth:`refresh`): later changes to the members are not seen until then.

    Args:
        models: the members (same output size).
        combine: ``"mean_softmax"`` (average probabilities), ``"mean_logits"`` (average logits) or
            ``"vote"`` (fraction of members voting for each class; argmax is the majority class, ties to
            the lowest index).

    Returns (forward):
        A tensor of shape (N, classes).
    """

    def __init__(self, models: Sequence[nn.Module], combine: str = "mean_softmax") -> None:
        super().__init__()
        if len(models) == 0:
            raise ValueError("Ensemble needs at least one model")
        if combine not in _COMBINE:
            raise ValueError(f"combine must be one of {_COMBINE}, got {combine!r}")
        self.members = nn.ModuleList(models)
        self.combine = combine
        self.vectorized = len(models) > 1 and _same_architecture(models)
        self.refresh()

    def refresh(self) -> None:
        """Re-stacks the members' current weights for the vectorized path."""
        if not self.vectorized:
            return
        params, buffers = stack_module_state(list(self.members))
        self._params = {k: v.detach() for k, v in params.items()}
        self._buffers_stacked = {k: v.detach() for k, v in buffers.items()}
        base = copy.deepcopy(self.members[0]).to("meta")
        self._base = [base.eval()]  # a list: not registered as a submodule

    def member_logits(self, x: Tensor) -> Tensor:
        """Outputs of every member, shape (M, N, classes)."""
        if self.vectorized:
            base = self._base[0]

            def one(params: dict[str, Tensor], buffers: dict[str, Tensor], inp: Tensor) -> Tensor:
                return functional_call(base, (params, buffers), (inp,))

            return torch.vmap(one, in_dims=(0, 0, None))(self._params, self._buffers_stacked, x)
        outs = []
        for m in self.members:
            was_training = m.training
            m.eval()
            outs.append(m(x))
            m.train(was_training)
        return torch.stack(outs)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.member_logits(x)
        if self.combine == "mean_logits":
            return logits.mean(0)
        if self.combine == "mean_softmax":
            return torch.softmax(logits, dim=-1).mean(0)
        votes = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1])
        return votes.to(logits.dtype).mean(0)
