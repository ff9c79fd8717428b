"""Freezing, head replacement, the data-size x similarity fine-tuning strategy, gradual unfreezing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

from .groups import LayerGroup, layer_groups

__all__ = ["freeze", "unfreeze", "replace_head", "finetune", "GradualUnfreezer", "extract_features",
           "EarlyFeatureClassifier"]

_BN_MODES = ("freeze_stats", "train", "freeze_all")
Target = Union[nn.Module, LayerGroup, Sequence[Union[nn.Module, LayerGroup]]]


def _as_groups(target: Target) -> list[LayerGroup]:
    if isinstance(target, LayerGroup):
        return [target]
    if isinstance(target, nn.Module):
        return [LayerGroup(type(target).__name__, [target])]
    out = []
    for t in target:
        out += _as_groups(t)
    return out


def _keep_eval(module: nn.Module, args: Any) -> None:
    # Note [frozen BatchNorm]: a forward pre-hook, so that model.train() cannot switch a frozen
    # BatchNorm back to updating its statistics. It checks a flag, so unfreeze() needs no handle.
    if getattr(module, "_ft_frozen_stats", False) and module.training:
        module.train(False)


def _set_bn_stats_frozen(bn: nn.Module, frozen: bool) -> None:
    if frozen and not getattr(bn, "_ft_hooked", False):
        bn.register_forward_pre_hook(_keep_eval)
        bn._ft_hooked = True  # type: ignore[assignment]
    bn._ft_frozen_stats = frozen  # type: ignore[assignment]
    if frozen:
        bn.eval()


def freeze(target: Target, bn: str = "freeze_stats") -> None:
    """Stops training ``target`` (a module, a :class:`LayerGroup` or a list of them).

    Every parameter gets ``requires_grad=False``, except as ``bn`` says for BatchNorm layers inside:

    - ``"freeze_stats"``: running statistics frozen (the layer stays in eval mode, even after
      ``model.train()``), affine weight and bias still trainable;
    - ``"train"``: running statistics keep updating in train mode and the affine parameters train;
    - ``"freeze_all"``: statistics and affine parameters frozen.

    A fusedtrain (or torch) optimizer allocates no state for frozen parameters: they get no gradient.
    """
    if bn not in _BN_MODES:
        raise ValueError(f"bn must be one of {_BN_MODES}, got {bn!r}")
    for group in _as_groups(target):
        bns = list(group.batchnorms())
        bn_params = {id(p) for b in bns for p in b.parameters()}
        for p in group.parameters():
            if id(p) in bn_params and bn in ("freeze_stats", "train"):
                p.requires_grad_(True)
            else:
                p.requires_grad_(False)
        for b in bns:
            _set_bn_stats_frozen(b, bn in ("freeze_stats", "freeze_all"))


def unfreeze(target: Target) -> None:
    """Trains ``target`` again: every parameter ``requires_grad=True``, BatchNorm statistics follow the
    model's train/eval mode again."""
    for group in _as_groups(target):
        for p in group.parameters():
            p.requires_grad_(True)
        for b in group.batchnorms():
            _set_bn_stats_frozen(b, False)


def _parent_and_name(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent = model
    *parents, name = path.split(".")
    for p in parents:
        parent = getattr(parent, p)
    return parent, name


def replace_head(model: nn.Module, num_classes: int, head: str | None = None) -> nn.Linear:
    """Replaces the final classifier by a fresh ``nn.Linear(in_features, num_classes)`` on the same
    device and dtype, and returns it.

    The classifier is the last ``nn.Linear`` in the model's module order (``fc`` of ResNet,
    ``classifier[-1]`` of VGG / MobileNet / EfficientNet, ``classifier`` of DenseNet, ``heads.head`` of
    ViT, the last layer of a Sequential). Pass its dotted name as ``head=`` for other models.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if head is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"replace_head: {type(model).__name__} has no nn.Linear classifier; pass its dotted "
                             "name, e.g. replace_head(model, 10, head='classifier.3')")
        head = linears[-1]
    parent, name = _parent_and_name(model, head)
    old = getattr(parent, name)
    if not isinstance(old, nn.Linear):
        raise ValueError(f"replace_head: {head!r} is a {type(old).__name__}, not an nn.Linear")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    setattr(parent, name, new)
    return new


class EarlyFeatureClassifier(nn.Module):
    """A linear classifier on globally pooled features of an earlier stage of a backbone."""

    def __init__(self, stages: Sequence[LayerGroup], head: nn.Linear) -> None:
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(*g.modules) for g in stages])
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        for s in self.stages:
            x = s(x)
        return x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def finetune(model: nn.Module, data: str = "small", similarity: str = "similar", lr: float = 1e-3,
             lr_decay: float = 2.6, num_classes: int | None = None,
             example_input: Tensor | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Applies the fine-tuning strategy for the amount of data and its similarity to the pretraining data.

    ============ =============================================== ==========================================
    data         similar                                         different
    ============ =============================================== ==========================================
    ``small``    only the head trains (all else frozen)          a new linear head on an earlier stage's
                                                                 pooled features, the rest frozen
    ``large``    the head and the last quarter of the stages     every stage trains, with discriminative
                 train (at least one stage)                      learning rates
    ============ =============================================== ==========================================

    Discriminative rates: the head gets ``lr`` and each earlier group ``lr / lr_decay`` of the next one,
    written as the real ``lr`` of its param group (any optimizer honours it). Frozen BatchNorm layers
    freeze statistics and affine parameters.

    Args:
        model: a model :func:`layer_groups` understands.
        data: ``"small"`` or ``"large"``. similarity: ``"similar"`` or ``"different"``.
        lr: the head's learning rate. lr_decay: ratio between neighbouring groups (≥ 1).
        num_classes: replace the head by a new ``nn.Linear`` with this many outputs first (required for
            small+different, which always builds a new head).
        example_input: a batch the early stages can run on, to size the new head of small+different
            (default: zeros of shape (2, 3, 224, 224) on the model's device).

    Returns:
        ``(model, param_groups)``: the model to train (a new :class:`EarlyFeatureClassifier` for
        small+different, else ``model`` itself) and the param groups for the optimizer, input to head.
    """
    if data not in ("small", "large"):
        raise ValueError(f"data must be 'small' or 'large', got {data!r}")
    if similarity not in ("similar", "different"):
        raise ValueError(f"similarity must be 'similar' or 'different', got {similarity!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not lr_decay >= 1:
        raise ValueError(f"lr_decay must be >= 1, got {lr_decay}")
    if num_classes is not None:
        replace_head(model, num_classes)
    groups = layer_groups(model)
    body, head = groups[:-1], groups[-1]

    if data == "small" and similarity == "different":
        if num_classes is None:
            raise ValueError("finetune(small, different) builds a new head: pass num_classes")
        if not all(g.runnable for g in body):
            raise ValueError(f"finetune(small, different) needs a backbone whose stages run one after another; "
                             f"{type(model).__name__}'s do not (use data='small', similarity='similar')")
        keep = body[: max(1, (len(body) + 1) // 2)]
        freeze(groups, bn="freeze_all")
        param = next(model.parameters())
        if example_input is None:
            example_input = torch.zeros(2, 3, 224, 224, device=param.device, dtype=param.dtype)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            x = example_input
            for g in keep:
                x = g(x)
        model.train(was_training)
        width = x.shape[1]
        new_head = nn.Linear(width, num_classes, device=param.device, dtype=param.dtype)
        return EarlyFeatureClassifier(keep, new_head), [{"params": list(new_head.parameters()), "lr": lr}]

    if data == "small":
        trainable = [head]
    elif similarity == "similar":
        trainable = body[len(body) - max(1, len(body) // 4):] + [head]
    else:
        trainable = groups
    frozen = [g for g in groups if g not in trainable]
    unfreeze(trainable)
    freeze(frozen, bn="freeze_all")
    param_groups = []
    for depth, g in enumerate(reversed(trainable)):
        param_groups.append({"params": list(g.parameters()), "lr": lr / lr_decay ** depth, "name": g.name})
    param_groups.reverse()
    if data == "large" and similarity == "similar":  # one rate for the few trained stages
        for pg in param_groups:
            pg["lr"] = lr
    return model, param_groups


class GradualUnfreezer:
    """Unfreezes one more layer group from the top at each scheduled step, adding its parameters to the
    optimizer with their own learning rate (ULMFiT-style gradual unfreezing).

    Start from a model whose body is frozen (e.g. after ``finetune(model, "small", "similar")``); call
    :meth:`step` once per epoch (``schedule="epoch"``) or once per iteration with ``schedule`` a list of
    the step numbers (1-based) at which to unfreeze.

    Args:
        model: the model (its :func:`layer_groups`).
        optimizer: the optimizer training the head; unfrozen groups are added with ``add_param_group``.
        schedule: ``"epoch"`` or a sorted list of step numbers.
        lr_decay: each newly unfrozen group's lr is the previous group's divided by this.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: str | Iterable[int] = "epoch",
                 lr_decay: float = 2.6) -> None:
        if not lr_decay >= 1:
            raise ValueError(f"lr_decay must be >= 1, got {lr_decay}")
        self.groups = layer_groups(model)[:-1]
        self.optimizer = optimizer
        self.lr_decay = lr_decay
        if schedule == "epoch":
            self.schedule: list[int] | None = None
        else:
            steps = sorted(int(s) for s in schedule)  # type: ignore[union-attr]
            if any(s < 1 for s in steps):
                raise ValueError(f"schedule steps are 1-based positive integers, got {steps}")
            self.schedule = steps
        self.steps = 0
        self.unfrozen: list[str] = []
        self._lr = optimizer.param_groups[-1]["lr"]

    def step(self) -> LayerGroup | None:
        """Advances one step; returns the group unfrozen now, if any."""
        self.steps += 1
        due = self.schedule is None or self.steps in self.schedule
        remaining = self.groups[: len(self.groups) - len(self.unfrozen)]
        if not due or not remaining:
            return None
        group = remaining[-1]
        unfreeze(group)
        self._lr = self._lr / self.lr_decay
        self.optimizer.add_param_group({"params": list(group.parameters()), "lr": self._lr, "name": group.name})
        self.unfrozen.append(group.name)
        return group


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: Iterable[Any], device: torch.device | str | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Runs a frozen backbone once over ``loader`` (batches of ``(inputs, labels)``) in eval mode and
    returns ``(features, labels)`` concatenated on the CPU, so a linear classifier can train on the
    cache instead of re-running the backbone every epoch."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in loader:
        if device is not None:
            x = x.to(device)
        out = backbone(x)
        feats.append(out.flatten(1).cpu())
        labels.append(torch.as_tensor(y).cpu())
    backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batch")
    return torch.cat(feats), torch.cat(labels)
