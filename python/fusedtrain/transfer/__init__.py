"""Transfer learning: model stages, freezing, head replacement, fine-tuning strategies."""

from .core import EarlyFeatureClassifier, GradualUnfreezer, extract_features, finetune, freeze, replace_head, unfreeze
from .groups import LayerGroup, layer_groups

__all__ = ["LayerGroup", "layer_groups", "freeze", "unfreeze", "replace_head", "finetune", "GradualUnfreezer",
           "extract_features", "EarlyFeatureClassifier"]
