"""``create_optimizer``: a fusedtrain optimizer by name, with weight decay kept off biases and norms.

In the spirit of timm's ``create_optimizer_v2``: one call turns a model into an optimizer whose parameters are
split into a group with weight decay and a group without it (every bias, every parameter of one dimension or
less, which covers the scales and shifts of BatchNorm / LayerNorm / GroupNorm, and the names a model lists in
``no_weight_decay()``, as timm's models do). Decaying those parameters pulls the norms' scales towards zero and
the biases towards the origin, which regularizes nothing useful; excluding them is the usual recipe for AdamW
(BERT, ViT, GPT-2) and for SGD on ResNets.
"""

from __future__ import annotations

import inspect

import fnmatch
import importlib
from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["create_optimizer", "list_optimizers", "param_groups_weight_decay"]

# Names that are not a class of fusedtrain.optim: SGD with momentum preset (timm's names; timm's own "sgd" means
# Nesterov momentum, fusedtrain's "sgd" is torch.optim.SGD's plain defaults).
_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "momentum": ("SGD", {"momentum": 0.9}),
    "nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
}


def _classes() -> dict[str, type[torch.optim.Optimizer]]:
    """Every optimizer class fusedtrain.optim exports, by lower-case name (read at call time, so a new
    optimizer is reachable by name as soon as it is exported)."""
    package = importlib.import_module(__package__ or "fusedtrain.optim")
    found = {}
    for name in package.__all__:
        obj = getattr(package, name, None)
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            found[name.lower()] = obj
    return found


def list_optimizers() -> list[str]:
    """The names :func:`create_optimizer` accepts: every optimizer class of ``fusedtrain.optim`` in lower case,
    plus ``"momentum"`` (SGD, momentum 0.9) and ``"nesterov"`` (SGD, Nesterov momentum 0.9)."""
    return sorted(set(_classes()) | set(_PRESETS))


def param_groups_weight_decay(model: nn.Module, weight_decay: float,
                              no_weight_decay: Collection[str] = ()) -> list[dict[str, Any]]:
    """Splits the trainable parameters of ``model`` into a group with ``weight_decay`` and one without.

    A parameter goes without weight decay when it has at most one dimension (biases, norm scales and shifts),
    when its name ends in ``.bias``, or when its name matches a pattern of ``no_weight_decay`` (``fnmatch``
    wildcards, e.g. ``"*.pos_embed"``) or of ``model.no_weight_decay()`` when the model defines it. Frozen
    parameters (``requires_grad=False``) are left out. The rule is timm's ``param_groups_weight_decay``.

    Args:
        model: the module whose ``named_parameters()`` are grouped (each shared parameter once).
        weight_decay: the decay of the first group.
        no_weight_decay: more name patterns to exclude from weight decay.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]``, empty
        groups left out.
    """
    patterns = set(no_weight_decay)
    model_list = getattr(model, "no_weight_decay", None)
    if callable(model_list):
        patterns |= set(model_list())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, pat) for pat in patterns):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(model_or_params: nn.Module | Iterable[Any], name: str = "adamw", lr: float | None = None,
                     weight_decay: float = 0.0, *, filter_bias_and_norm: bool = True,
                     no_weight_decay: Collection[str] = (), **kwargs: Any) -> torch.optim.Optimizer:
    """A fusedtrain optimizer by name.

    Example::

        opt = fusedtrain.optim.create_optimizer(model, "adamw", lr=3e-4, weight_decay=0.05, max_grad_norm=1.0)

    Args:
        model_or_params: a module (its trainable parameters are grouped by :func:`param_groups_weight_decay`
            when ``weight_decay`` > 0 and ``filter_bias_and_norm``), or parameters / param groups as any
            torch optimizer takes them (used as given; a group's own ``weight_decay`` wins).
        name: one of :func:`list_optimizers` (case-insensitive): ``"sgd"``, ``"momentum"``, ``"nesterov"``,
            ``"adagrad"``, ``"rmsprop"``, ``"adam"``, ``"adamw"``, ... ``"momentum"`` and ``"nesterov"`` are SGD
            with ``momentum=0.9`` (and ``nesterov=True``) unless ``kwargs`` say otherwise.
        lr: the learning rate; None leaves the optimizer's default.
        weight_decay: the decay of the parameters that get it (all of them when ``filter_bias_and_norm`` is
            False or a parameter list is given).
        filter_bias_and_norm: keep weight decay off biases, norms and ``no_weight_decay`` names (a module only).
        no_weight_decay: more name patterns without weight decay (a module only).
        **kwargs: the optimizer's other arguments: ``betas``, ``momentum``, ``eps``, and fusedtrain's options
            (``max_grad_norm``, ``ema``, ``master_weights``, ``l1``, ...).

    Returns:
        The optimizer, an instance of a ``fusedtrain.optim`` class.

    Raises:
        ValueError: an unknown ``name`` (the message lists the known ones), or ``no_weight_decay`` given with
            parameters instead of a module.
    """
    if not isinstance(name, str):
        raise TypeError(f"create_optimizer: name must be a string such as 'adamw', got {type(name).__name__}")
    key = name.lower().replace("_", "")
    classes = _classes()
    if key in _PRESETS:
        cls_name, preset = _PRESETS[key]
        cls = classes[cls_name.lower()]
        kwargs = {**preset, **kwargs}
    elif key in classes:
        cls = classes[key]
    else:
        raise ValueError(f"create_optimizer: unknown optimizer {name!r}; known: {', '.join(list_optimizers())}")
    if lr is not None:
        kwargs["lr"] = lr
    if not _takes_weight_decay(cls):  # Rprop
        if weight_decay:
            raise ValueError(f"create_optimizer: {cls.__name__} has no weight_decay; pass weight_decay=0")
    else:
        # The default of groups added later (add_param_group) and of groups given without their own.
        kwargs["weight_decay"] = weight_decay
    if isinstance(model_or_params, nn.Module):
        if weight_decay and filter_bias_and_norm:
            params: Any = param_groups_weight_decay(model_or_params, weight_decay, no_weight_decay)
        else:
            params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        if no_weight_decay:
            raise ValueError("create_optimizer: no_weight_decay names parameters of a module; pass the module, "
                             "not its parameters")
        params = model_or_params
    if getattr(cls, "__name__", "") == "Muon":
        params = _muon_groups(params)
    return cls(params, **kwargs)


def _takes_weight_decay(cls: type) -> bool:
    return "weight_decay" in inspect.signature(cls.__init__).parameters


def _muon_groups(params: Any) -> list[dict[str, Any]]:
    """Muon orthogonalizes matrices only: every group is split into its 2-D parameters (Muon's) and the rest
    (biases, norms, ...), which go to Muon's fused AdamW (``use_muon=False``, Muon's documented convention)."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out: list[dict[str, Any]] = []
    for g in groups:
        ps = list(g["params"])
        rest = {k: v for k, v in g.items() if k != "params"}
        mats, others = [p for p in ps if p.ndim == 2], [p for p in ps if p.ndim != 2]
        if mats:
            out.append({**rest, "params": mats})
        if others:
            out.append({**rest, "params": others, "use_muon": False})
    return out
