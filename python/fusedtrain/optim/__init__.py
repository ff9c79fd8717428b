"""Drop-in fused replacements for torch.optim: same arguments, defaults, state and results."""

from . import functional
from .adagrad import Adagrad
from ._quant import to_torch_state_dict
from .adam import Adam, Adam8bit, AdamW, AdamW8bit
from .captured import CapturedStep
from .factory import create_optimizer, list_optimizers, param_groups_weight_decay
from .nadam import NAdam
from .rmsprop import RMSprop
from .sgd import SGD

# torch.optim's other element-wise optimizers (issue 15)
from .adadelta import Adadelta
from .adamax import Adamax
from .asgd import ASGD
from .radam import RAdam
from .rprop import Rprop

# Beyond torch.optim (issue 16): fused forms of timm's Lion and the schedulefree package's optimizers.
from .lion import Lion
from .schedulefree import ScheduleFreeAdamW, ScheduleFreeSGD

# Layer-wise trust ratios (issue 16): timm's Lamb and Lars; LAMB and LARS are the same classes.
from .lamb import Lamb, Lars

LAMB, LARS = Lamb, Lars

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "CapturedStep", "functional",
           "RAdam", "Adamax", "Adadelta", "ASGD", "Rprop",
           "Lion", "ScheduleFreeAdamW", "ScheduleFreeSGD", "Lamb", "Lars", "LAMB", "LARS",
           "create_optimizer", "list_optimizers", "param_groups_weight_decay",
           # 8-bit states (issue 17)
           "Adam8bit", "AdamW8bit", "to_torch_state_dict"]

# Optimizers whose torch.optim class only newer torch versions have (torch >= 2.6 still imports fusedtrain).
import torch as _torch

if hasattr(_torch.optim, "Muon"):
    from .muon import Muon
    __all__ += ["Muon"]
if hasattr(_torch.optim, "Adafactor"):
    from .adafactor import Adafactor
    __all__ += ["Adafactor"]
