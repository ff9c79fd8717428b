"""Drop-in fused replacements for torch.optim: same arguments, defaults, state and results."""

from . import functional
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .captured import CapturedStep
from .nadam import NAdam
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "CapturedStep", "functional"]

# Optimizers whose torch.optim class only newer torch versions have (torch >= 2.6 still imports fusedtrain).
import torch as _torch

if hasattr(_torch.optim, "Muon"):
    from .muon import Muon
    __all__ += ["Muon"]
if hasattr(_torch.optim, "Adafactor"):
    from .adafactor import Adafactor
    __all__ += ["Adafactor"]
