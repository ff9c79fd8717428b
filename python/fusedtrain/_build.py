"""Loads fusedtrain's compiled library and reports how it was built."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

__all__ = ["build_info", "library", "has_cuda_kernels"]

_lib: ModuleType | None = None
_error: BaseException | None = None

try:  # importing the module runs its static initializers, which register torch.ops.fusedtrain.*
    _lib = importlib.import_module("fusedtrain._C")
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _error = exc


def library() -> ModuleType:
    """The compiled module ``fusedtrain._C``; raises a clear error when it was not built."""
    if _lib is None:
        raise ImportError(
            "fusedtrain's compiled library (fusedtrain._C) could not be loaded: "
            f"{_error}. Build it with `pip install --no-build-isolation -e .` in the source tree "
            "(torch must be installed first), against the same torch version you run."
        ) from _error
    return _lib


def has_cuda_kernels() -> bool:
    """Whether the CUDA kernels were compiled into this build."""
    return bool(library().has_cuda())


def build_info() -> dict[str, Any]:
    """How this fusedtrain was built and what it will use at run time.

    Returns:
        A dict with ``version``, ``torch_built``/``torch_runtime`` (torch versions at build and now),
        ``cuda`` (CUDA kernels compiled in), ``cuda_archs`` (TORCH_CUDA_ARCH_LIST of the build),
        ``cuda_available`` (a GPU is usable now), ``cpu_isa`` (SIMD copy of the CPU loops in use),
        ``cpu_isa_detected`` (best one this processor supports) and ``threads`` (torch's CPU threads).
    """
    lib = library()
    return {
        "version": lib.version(),
        "torch_built": lib.built_with_torch(),
        "torch_runtime": torch.__version__,
        "cuda": bool(lib.has_cuda()),
        "cuda_archs": lib.cuda_archs(),
        "cuda_available": bool(lib.has_cuda()) and torch.cuda.is_available(),
        "cpu_isa": lib.cpu_isa(),
        "cpu_isa_detected": lib.cpu_isa_detected(),
        "threads": torch.get_num_threads(),
    }
