"""Drop-in fused replacements for torch.optim: same arguments, defaults, state and results."""

from . import functional
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .captured import CapturedStep
from .lamb import Lamb, Lars
from .nadam import NAdam
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "CapturedStep", "functional",
           "Lamb", "Lars"]
