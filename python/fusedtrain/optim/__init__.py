"""Drop-in fused replacements for torch.optim: same arguments, defaults, state and results."""

from . import functional
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .captured import CapturedStep
from .nadam import NAdam
from .rmsprop import RMSprop
from .sgd import SGD

# torch.optim's other element-wise optimizers (issue 15)
from .adadelta import Adadelta
from .adamax import Adamax
from .asgd import ASGD
from .radam import RAdam
from .rprop import Rprop

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "CapturedStep", "functional"]
__all__ += ["RAdam", "Adamax", "Adadelta", "ASGD", "Rprop"]
