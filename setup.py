"""Build script for fusedtrain's compiled library (``fusedtrain._C``).

Build options (environment variables):
  FUSEDTRAIN_CPU_ONLY=1     build the CPU kernels only, even when CUDA is available.
  TORCH_CUDA_ARCH_LIST      CUDA architectures, e.g. "9.0" or "8.0;9.0+PTX" (default "8.0;9.0+PTX").
  MAX_JOBS                  parallel compile jobs (ninja).
  CUDA_HOME                 CUDA toolkit root; found automatically when unset (see _find_cuda_home).
  FUSEDTRAIN_CUDA_ILP       vectors each CUDA thread keeps in flight (default 2; a tuning knob).

The CUDA kernels are compiled whenever torch is a CUDA build and nvcc is found; no GPU is needed.
Install with ``pip install --no-build-isolation -e .`` after torch is installed.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _nvcc_version(home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _find_cuda_home(torch_cuda: str | None) -> str | None:
    """Find the CUDA toolkit root without the user's help.

    torch guesses CUDA_HOME as dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a
    wrapper script (e.g. /usr/local/bin/nvcc). We look for real toolkits (bin/nvcc next to
    include/cuda_runtime.h) and prefer the one whose version matches torch's CUDA.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script that execs the real nvcc names it
            with open(real, errors="ignore") as f:
                head = f.read(4096)
            candidates += [os.path.dirname(os.path.dirname(p)) for p in re.findall(r"(/\S+/bin/nvcc)\b", head)]
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    found = [c for c in dict.fromkeys(candidates)
             if os.path.isfile(os.path.join(c, "bin", "nvcc"))
             and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h"))]
    if torch_cuda:
        for c in found:
            if _nvcc_version(c) == torch_cuda:
                return c
    return found[0] if found else None


def _nvidia_wheel_includes() -> list[str]:
    """CUDA library headers (cusparse.h, cublas) shipped by the nvidia-* pip wheels torch depends on."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    try:
        roots.update(site.getsitepackages())
    except AttributeError:
        pass
    dirs = []
    for root in sorted(roots):
        dirs += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _extension():
    import torch

    cpu_only = os.environ.get("FUSEDTRAIN_CPU_ONLY", "0") not in ("", "0", "false", "False")
    cuda_home = None
    if not cpu_only and torch.version.cuda:
        cuda_home = _find_cuda_home(torch.version.cuda)
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # read when torch.utils.cpp_extension is imported
    from torch.utils import cpp_extension

    with_cuda = bool(not cpu_only and torch.version.cuda and cuda_home)
    if not with_cuda:
        why = ("FUSEDTRAIN_CPU_ONLY is set" if cpu_only else
               "torch is a CPU-only build" if not torch.version.cuda else "no CUDA toolkit (nvcc) was found")
        print(f"fusedtrain: building the CPU kernels only ({why}).", file=sys.stderr)

    torch_version = torch.__version__.split("+")[0]
    sources = ["csrc/ops.cpp", "csrc/bindings.cpp", "csrc/cpu/cpu_isa.cpp", "csrc/cpu/optim.cpp",
               "csrc/cpu/augment.cpp"]
    define = [("FUSEDTRAIN_VERSION", f'"{VERSION}"'), ("FUSEDTRAIN_TORCH_VERSION", f'"{torch_version}"')]
    # -fno-math-errno lets the vectorizer turn sqrt into SIMD instructions (see cpu_driver.h).
    # -fopenmp: at::parallel_for is an inline OpenMP region in torch's Linux builds; without the flag it
    # silently runs on one thread. The loader reuses the libgomp.so.1 torch already loaded, so
    # torch.set_num_threads governs our threads too. Torch chooses the C++ standard it needs.
    # -ffp-contract=off / --fmad=false: every operation of math.h rounds as written, in every
    # instantiation, so a rule gives the same bits wherever it is inlined (see Note [no FMA contraction]).
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # -fno-trapping-math lets it compute both sides of a select (if-conversion), needed to vectorize
    # rules with options (see Note [flags as numbers] in math.h).
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"] + openmp
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    kwargs = {}
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX"
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        sources += ["csrc/cuda/optim.cu", "csrc/cuda/augment.cu"]
        define += [("FUSEDTRAIN_WITH_CUDA", None), ("FUSEDTRAIN_CUDA_ARCHS", f'"{arch_list}"')]
        if os.environ.get("FUSEDTRAIN_CUDA_ILP"):  # tuning knob: vectors in flight per thread
            define.append(("FUSEDTRAIN_CUDA_ILP", str(int(os.environ["FUSEDTRAIN_CUDA_ILP"]))))
        include_dirs += _nvidia_wheel_includes()
        kwargs["extra_compile_args"] = {
            "cxx": cxx,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"],
        }
        ext_cls = cpp_extension.CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="fusedtrain._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define,
        extra_link_args=openmp,
        **kwargs,
    )
    return ext, cpp_extension.BuildExtension.with_options(use_ninja=True)


ext, build_ext = _extension()

setup(
    name="fusedtrain",
    version=VERSION,
    description="Fused, fast, drop-in training parts for PyTorch: optimizers, dropout, augmentation, ensembles",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
    entry_points={"console_scripts": ["fusedtrain-bench=fusedtrain.bench.cli:main"]},
    zip_safe=False,
)
