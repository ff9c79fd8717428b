"""``python -m fusedtrain.bench``: fusedtrain against the torch equivalents on this machine."""

from .cli import main

__all__ = ["main"]
