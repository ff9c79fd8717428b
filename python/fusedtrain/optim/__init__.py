"""Drop-in fused replacements for torch.optim: same arguments, defaults, state and results."""

from . import functional
from .adagrad import Adagrad
from ._quant import to_torch_state_dict
from .adam import Adam, Adam8bit, AdamW, AdamW8bit
from .captured import CapturedStep
from .nadam import NAdam
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "CapturedStep", "functional",
           "Adam8bit", "AdamW8bit", "to_torch_state_dict"]
