"""CUDA graph capture: whether a call is being captured, for the code paths that must know.

A captured CUDA graph replays the kernels it recorded with the arguments they had at capture time. Anything
the host computed for a launch (a random seed drawn on the CPU, per-sample crop boxes read on the host) is
frozen into the graph: every replay then repeats it. The dropout family therefore draws its seed on the
device while capturing (:mod:`fusedtrain.nn.functional`, Note [seeds]), and the fused augmentation, whose
per-sample parameters are host data by design, refuses to be captured.
"""

from __future__ import annotations

import torch

__all__ = ["stream_capturing"]


def stream_capturing() -> bool:
    """Whether CUDA graph capture is underway on the current CUDA stream.

    False while torch.compile traces (it refuses to compile during a capture, so the traced code runs
    outside of one) and without an initialized CUDA context (a capture needs one); the check itself never
    initializes CUDA, so it costs nothing on CPU-only machines.
    """
    if torch.compiler.is_compiling() or not torch.cuda.is_initialized():
        return False
    return bool(torch.cuda.is_current_stream_capturing())

