"""A model's stages from input to head, for freezing and discriminative learning rates."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import Tensor, nn

__all__ = ["LayerGroup", "layer_groups"]


@dataclass(eq=False)  # groups compare by identity: their fields hold modules and tensors
class LayerGroup:
    """One stage of a model: its modules (in forward order when ``runnable``) and any parameters that
    belong to the model itself rather than to a module (ViT's class token and position embedding)."""

    name: str
    modules: list[nn.Module]
    extra_params: list[nn.Parameter] = field(default_factory=list)
    runnable: bool = True  # applying `modules` one after another computes this stage

    def parameters(self) -> Iterator[nn.Parameter]:
        seen: set[int] = set()
        for m in self.modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p
        for p in self.extra_params:
            if id(p) not in seen:
                seen.add(id(p))
                yield p

    def batchnorms(self) -> Iterator[nn.modules.batchnorm._BatchNorm]:
        for m in self.modules:
            for sub in m.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    yield sub

    def forward(self, x: Tensor) -> Tensor:
        if not self.runnable:
            raise RuntimeError(f"layer group {self.name!r} cannot be run on its own (its model's forward is not a "
                               "plain sequence of modules)")
        for m in self.modules:
            x = m(x)
        return x

    __call__ = forward


def _downsamples(module: nn.Module) -> bool:
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            return True
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            stride = m.stride if m.stride is not None else m.kernel_size
            if (max(stride) if isinstance(stride, tuple) else stride) > 1:
                return True
    return False


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _split_features(features: nn.Sequential, prefix: str) -> list[LayerGroup]:
    """Stages of a `features` Sequential: a new stage starts at each child that downsamples."""
    stages: list[list[nn.Module]] = []
    for child in features.children():
        if not stages or (_downsamples(child) and any(_has_params(m) for m in stages[-1])):
            stages.append([child])
        else:
            stages[-1].append(child)
    return [LayerGroup(f"{prefix}{i}", mods) for i, mods in enumerate(stages)]


def _timm_groups(model: nn.Module) -> list[LayerGroup] | None:
    """timm models describe their own stages (``group_matcher``); timm puts the head in the last group."""
    if not callable(getattr(model, "group_matcher", None)):
        return None
    try:
        from timm.models import group_parameters
    except ImportError:
        return None
    by_group = group_parameters(model, model.group_matcher(coarse=True))
    params = dict(model.named_parameters())
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    groups = []
    for gid, names in by_group.items():
        members = set(names)
        mods = [m for n, m in bns if any(f"{n}.{p}" in members for p, _ in m.named_parameters())]
        groups.append(LayerGroup(f"group{gid}", mods, [params[n] for n in names], runnable=False))
    groups[-1].name = "head"
    return groups


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """The model's stages from input to head; the head (final classifier) is the last group.

    Recognized: torchvision ResNet (stem, layer1–4, fc), VGG / MobileNet v2, v3 / EfficientNet / DenseNet
    (``features`` split into stages where the resolution halves, then ``classifier``), VisionTransformer
    (embedding, one group per encoder block, ``heads``). Any other ``nn.Sequential`` or module: its
    children with parameters in registration order, the last being the head (only a Sequential's
    groups are runnable one after another). timm models (when timm is installed) use their own
    ``group_matcher(coarse=True)`` stages.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    timm_groups = _timm_groups(model)
    if timm_groups is not None:
        return timm_groups
    names = {n for n, _ in model.named_children()}
    if {"conv1", "bn1", "layer1", "layer4", "fc"} <= names:  # ResNet family
        stem = [model.conv1, model.bn1] + [getattr(model, n) for n in ("relu", "maxpool") if n in names]
        groups = [LayerGroup("stem", stem)]
        groups += [LayerGroup(n, [getattr(model, n)]) for n in ("layer1", "layer2", "layer3", "layer4")]
        return groups + [LayerGroup("head", [model.fc], runnable=True)]
    if "features" in names and "classifier" in names and isinstance(model.features, nn.Sequential):
        return _split_features(model.features, "stage") + [LayerGroup("head", [model.classifier])]
    if {"conv_proj", "encoder", "heads"} <= names:  # torchvision VisionTransformer
        enc = model.encoder
        extra = [p for p in (getattr(model, "class_token", None), getattr(enc, "pos_embedding", None))
                 if isinstance(p, nn.Parameter)]
        groups = [LayerGroup("embed", [model.conv_proj], extra, runnable=False)]
        blocks = list(enc.layers.children())
        for i, block in enumerate(blocks):
            mods = [block] + ([enc.ln] if i == len(blocks) - 1 else [])
            groups.append(LayerGroup(f"block{i}", mods, runnable=False))
        return groups + [LayerGroup("head", [model.heads], runnable=False)]
    children = [(n, m) for n, m in model.named_children()]
    if isinstance(model, nn.Sequential):
        # parameter-free children (activations, pooling) join the group before them; leading ones join
        # the first group with parameters
        groups: list[LayerGroup] = []
        pending: list[nn.Module] = []
        for n, m in children:
            if _has_params(m):
                groups.append(LayerGroup(n, pending + [m]))
                pending = []
            elif groups:
                groups[-1].modules.append(m)
            else:
                pending.append(m)
        if len(groups) < 2:
            raise ValueError("layer_groups: a Sequential needs at least two children with parameters "
                             "(a body and a head)")
        return groups
    with_params = [(n, m) for n, m in children if _has_params(m)]
    if len(with_params) < 2:
        raise ValueError(f"layer_groups: cannot find stages in {type(model).__name__}: it needs at least two child "
                         "modules with parameters; pass the stages to freeze()/unfreeze() yourself")
    return [LayerGroup(n, [m], runnable=False) for n, m in with_params]
