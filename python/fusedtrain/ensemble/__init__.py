"""Ensembles: snapshot ensembles, averaged predictions of independent models, EMA / Polyak / SWA."""

from .averaging import EMA, SWA, update_bn
from .ensemble import Ensemble
from .snapshot import CyclicCosineLR, SnapshotEnsemble

__all__ = ["CyclicCosineLR", "SnapshotEnsemble", "Ensemble", "EMA", "SWA", "update_bn"]
