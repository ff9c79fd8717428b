"""Loads fusedtrain's compiled library, checks it matches the torch it runs with, and reports how it was built."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from types import ModuleType
from typing import Any

import torch

__all__ = ["build_info", "library", "has_cuda_kernels", "check_torch_version", "check_cuda_device",
           "cuda_arch_coverage"]

_REBUILD = ("rebuild fusedtrain against it (`pip install --no-build-isolation -e .` in the source tree, or "
            "`bash scripts/dev.sh setup`), or install the torch release it was built for")


def _series(version: str) -> str:
    """The X.Y release of a torch version string ("2.14.1+cu130" -> "2.14")."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else version


def check_torch_version(built: str, runtime: str) -> None:
    """Refuse a torch release other than the one the library was compiled against.

    The compiled library uses torch's C++ ABI, which changes between releases (X.Y) but not between patch
    releases; a mismatch fails to load at best and corrupts memory at worst.

    Args:
        built: the torch version the library was compiled against (``torch_built`` in :func:`build_info`).
        runtime: the torch version now (``torch.__version__``).

    Raises:
        ImportError: naming both versions and the fix, when their X.Y releases differ.
    """
    if _series(built) != _series(runtime):
        raise ImportError(
            f"fusedtrain was built against torch {built}, but torch {runtime} is installed; its compiled library "
            f"works only with torch {_series(built)}.x. Either {_REBUILD} (pip install 'torch=={_series(built)}.*')."
        )


def _required_torch() -> str | None:
    """The torch release pinned in the installed package's metadata (setup.py writes torch==X.Y.*), if any."""
    try:
        requirements = importlib.metadata.requires("fusedtrain") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        m = re.match(r"torch\s*==\s*([\d.]+?)(\.\*)?\s*(;|$)", requirement)
        if m:
            return m.group(1)
    return None


_lib: ModuleType | None = None
_error: BaseException | None = None

try:  # importing the module runs its static initializers, which register torch.ops.fusedtrain.*
    _lib = importlib.import_module("fusedtrain._C")
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _error = exc

if _lib is not None:  # refuse at import: a library built for another torch must not register its ops and run
    check_torch_version(_lib.built_with_torch(), torch.__version__)


def library() -> ModuleType:
    """The compiled module ``fusedtrain._C``; raises a clear error when it was not built."""
    if _lib is None:
        pinned = _required_torch()
        hint = "" if pinned is None or _series(pinned) == _series(torch.__version__) else (
            f" The installed fusedtrain was built for torch {pinned}.x and torch {torch.__version__} is installed: "
            f"{_REBUILD}.")
        raise ImportError(
            "fusedtrain's compiled library (fusedtrain._C) could not be loaded: "
            f"{_error}. Build it with `pip install --no-build-isolation -e .` in the source tree "
            "(torch must be installed first), against the same torch version you run." + hint
        ) from _error
    return _lib


def has_cuda_kernels() -> bool:
    """Whether the CUDA kernels were compiled into this build."""
    return bool(library().has_cuda())


def cuda_arch_coverage(arch_list: str, capability: tuple[int, int]) -> str:
    """How a GPU of compute capability ``capability`` runs code built for ``arch_list``.

    CUDA's rules: a cubin for X.Y runs on X.Z with Z >= Y (an ``a`` cubin such as 9.0a on X.Y only); PTX
    (``+PTX``) is JIT-compiled by the driver for X.Y and every later capability.

    Args:
        arch_list: a TORCH_CUDA_ARCH_LIST such as ``"7.5;8.0;9.0+PTX"`` (``cuda_archs`` in :func:`build_info`).
        capability: ``(major, minor)``, as ``torch.cuda.get_device_capability()`` returns.

    Returns:
        ``"cubin"`` (compiled code runs), ``"ptx"`` (runs after JIT compilation, given a driver that knows
        the toolkit's PTX), or ``"none"``.
    """
    return str(library().cuda_arch_coverage(arch_list, int(capability[0]), int(capability[1])))


def check_cuda_device(device: torch.device | str | int) -> None:
    """Raise a clear error when this build has no CUDA code that ``device`` can run.

    Every CUDA op checks this itself on its first call per device; calling it up front fails earlier. The
    message names the device, its compute capability, the compiled architectures and the rebuild command.

    Raises:
        RuntimeError: the build has no CUDA kernels, or none for this device.
    """
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"fusedtrain.check_cuda_device: expected a CUDA device, got {dev}")
    lib = library()
    if not lib.has_cuda():
        raise RuntimeError("fusedtrain was built without CUDA kernels (torch was a CPU build, nvcc was not found, or "
                           "FUSEDTRAIN_CPU_ONLY was set); rebuild it with a CUDA toolkit to use " + str(dev))
    lib.check_cuda_device(dev.index if dev.index is not None else torch.cuda.current_device())


def build_info() -> dict[str, Any]:
    """How this fusedtrain was built and what it will use at run time.

    Returns:
        A dict with ``version``, ``torch_built``/``torch_runtime`` (torch versions at build and now),
        ``cuda`` (CUDA kernels compiled in), ``cuda_version`` (the toolkit that compiled them, "" without),
        ``cuda_archs`` (the TORCH_CUDA_ARCH_LIST compiled: "X.Y" a cubin, "+PTX" also PTX),
        ``cuda_available`` (a GPU is usable now), ``cpu_isa`` (SIMD copy of the CPU loops in use),
        ``cpu_isa_detected`` (best one this processor supports) and ``threads`` (torch's CPU threads).
    """
    lib = library()
    return {
        "version": lib.version(),
        "torch_built": lib.built_with_torch(),
        "torch_runtime": torch.__version__,
        "cuda": bool(lib.has_cuda()),
        "cuda_version": lib.cuda_version(),
        "cuda_archs": lib.cuda_archs(),
        "cuda_available": bool(lib.has_cuda()) and torch.cuda.is_available(),
        "cpu_isa": lib.cpu_isa(),
        "cpu_isa_detected": lib.cpu_isa_detected(),
        "threads": torch.get_num_threads(),
    }
