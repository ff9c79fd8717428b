"""Build script for fusedtrain's compiled library (``fusedtrain._C``).

Build options (environment variables):
  FUSEDTRAIN_CPU_ONLY=1     build the CPU kernels only, even when CUDA is available.
  TORCH_CUDA_ARCH_LIST      CUDA architectures, e.g. "9.0" or "8.0;9.0+PTX". Default: one cubin per family the
                            found nvcc knows from Turing on (7.5, 8.0, 8.6, 9.0, 10.0, 12.0; 11.0 on aarch64) plus
                            PTX of the newest (see _default_arch_list).
  MAX_JOBS                  parallel compile jobs (ninja).
  CUDA_HOME                 CUDA toolkit root (12.1 or newer); found automatically when unset (_find_cuda_home).
  FUSEDTRAIN_CUDA_ILP       vectors each CUDA thread keeps in flight (default 2; a tuning knob).
  FUSEDTRAIN_EXTRA_CXXFLAGS extra C++ compile flags, placed after fusedtrain's own (so -O1 beats our -O3), e.g.
                            sanitizers; FUSEDTRAIN_EXTRA_LDFLAGS: extra link flags, placed last.
  FUSEDTRAIN_BUILD_DIR      where the objects are kept between builds (default build/temp-<cpu|cuda>-py-torch):
                            ninja then recompiles only what changed, also under ``pip install -e .``.

The CUDA kernels are compiled whenever torch is a CUDA build and nvcc is found; no GPU is needed.
Install with ``pip install --no-build-isolation -e .`` after torch is installed. The package metadata pins
torch to the X.Y release it was built against (the extension uses torch's C++ ABI, which changes between
releases); fusedtrain checks the same at import (python/fusedtrain/_build.py).
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"

# Kernel parameters beyond 4 KB (our 31 KB __grid_constant__ tensor tables, cuda_launcher.cuh) need nvcc 12.1
# and a Volta (7.0) or newer device.
MIN_NVCC = (12, 1)
MIN_ARCH = (7, 0)
# The default: one cubin per binary-compatible family from Turing on. A cubin for X.Y also runs on X.Z with
# Z >= Y, so 8.6 serves 8.7/8.8/8.9 (Orin, Ada), 10.0 serves 10.3 (B300), 12.0 serves 12.1 (GB10): the list
# torch's own wheels ship, and each entry left out saves ~1/7 of the CUDA compile time. PTX of the newest
# is added so a later GPU can JIT-compile it. 11.0 (Jetson Thor) exists only on aarch64.
DEFAULT_ARCHS = ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0") + (("11.0",) if platform.machine() == "aarch64" else ())


def _nvcc(home: str, *args: str) -> str:
    try:
        return subprocess.run([os.path.join(home, "bin", "nvcc"), *args], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _nvcc_version(home: str) -> tuple[int, int] | None:
    m = re.search(r"release (\d+)\.(\d+)", _nvcc(home, "--version"))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _nvcc_archs(home: str) -> list[str]:
    """The real architectures ("7.5", "9.0", ...) this nvcc can compile for, from ``nvcc --list-gpu-code``."""
    codes = re.findall(r"\bsm_(\d+)(\d)\b", _nvcc(home, "--list-gpu-code"))
    return sorted({f"{major}.{minor}" for major, minor in codes}, key=_arch_key)


def _arch_key(arch: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", arch).groups()
    return int(major), int(minor)


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
        want = tuple(int(x) for x in torch_cuda.split(".")[:2])
        for c in found:
            if _nvcc_version(c) == want:
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


def _torch_arch_flags(cpp_extension, arch_list: str) -> list[str] | None:
    """The -gencode flags torch will pass for ``arch_list`` (None when torch refuses the list)."""
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        return cpp_extension._get_cuda_arch_flags()
    except (ValueError, IndexError):  # an unknown arch; "native" without a visible GPU
        return None
    finally:
        if saved is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def _default_arch_list(cpp_extension, nvcc_archs: list[str]) -> str:
    """DEFAULT_ARCHS that both this nvcc and torch's cpp_extension know, plus PTX of the newest."""
    archs = [a for a in DEFAULT_ARCHS if a in nvcc_archs and _torch_arch_flags(cpp_extension, a) is not None]
    if not archs:
        raise SystemExit(f"fusedtrain: nvcc knows none of the default CUDA architectures {DEFAULT_ARCHS} "
                         f"(it knows {nvcc_archs}); set TORCH_CUDA_ARCH_LIST.")
    archs.sort(key=_arch_key)
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def _compiled_archs(flags: list[str]) -> str:
    """What the -gencode flags compile, as a canonical TORCH_CUDA_ARCH_LIST: "7.5;9.0+PTX" (X.Y: a cubin for
    sm_XY; +PTX: also PTX for compute_XY; an a/f suffix as nvcc's sm_90a / sm_100f). The build records it
    (FUSEDTRAIN_CUDA_ARCHS), and the run-time check parses it (csrc/cuda_arch.cpp)."""
    cubins, ptx = set(), set()
    for flag in flags:
        m = re.search(r"code=(sm|compute)_(\d+)(\d)([af]?)\b", flag)
        if m:
            (cubins if m.group(1) == "sm" else ptx).add(f"{m.group(2)}.{m.group(3)}{m.group(4)}")
    archs = sorted(cubins | ptx, key=lambda a: (_arch_key(a), a))
    return ";".join(a + ("+PTX" if a in ptx else "") for a in archs)


def _cuda_arch_list(cpp_extension, cuda_home: str) -> tuple[str, tuple[int, int]]:
    """Check the toolkit and the requested architectures: the canonical list that will be compiled, and nvcc's
    version."""
    version = _nvcc_version(cuda_home)
    if version is None or version < MIN_NVCC:
        have = "an unknown version" if version is None else "%d.%d" % version
        raise SystemExit(
            f"fusedtrain: nvcc at {cuda_home} is {have}; the CUDA kernels need CUDA {MIN_NVCC[0]}.{MIN_NVCC[1]} "
            "or newer (their tensor tables are 31 KB kernel parameters, allowed from CUDA 12.1 on). Point CUDA_HOME "
            "at a newer toolkit, or build the CPU kernels only with FUSEDTRAIN_CPU_ONLY=1.")
    nvcc_archs = _nvcc_archs(cuda_home)
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    arch_list = requested or _default_arch_list(cpp_extension, nvcc_archs)
    flags = _torch_arch_flags(cpp_extension, arch_list)
    if not flags:
        raise SystemExit(f"fusedtrain: torch's cpp_extension does not accept TORCH_CUDA_ARCH_LIST={arch_list!r} "
                         "(an unknown architecture, or 'native' without a visible GPU).")
    compiled = _compiled_archs(flags)
    for arch in compiled.split(";"):
        base = re.match(r"\d+\.\d+", arch).group(0)
        if _arch_key(base) < MIN_ARCH:
            raise SystemExit(f"fusedtrain: TORCH_CUDA_ARCH_LIST asks for {arch}, but the kernels need compute "
                             f"capability {MIN_ARCH[0]}.{MIN_ARCH[1]} or newer (kernel parameters over 4 KB).")
        if nvcc_archs and base not in nvcc_archs:
            raise SystemExit(f"fusedtrain: TORCH_CUDA_ARCH_LIST asks for {arch}, which nvcc {version[0]}.{version[1]} "
                             f"at {cuda_home} cannot compile for (it knows {';'.join(nvcc_archs)}).")
    return compiled, version


def _extra_flags(var: str) -> list[str]:
    return shlex.split(os.environ.get(var, ""))


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
    # Every translation unit of csrc/ and csrc/cpu/ (and csrc/cuda/ with CUDA), sorted for stable builds.
    sources = sorted(os.path.relpath(f, ROOT) for pattern in ("csrc/*.cpp", "csrc/cpu/*.cpp")
                     for f in glob.glob(os.path.join(ROOT, pattern)))
    define = [("FUSEDTRAIN_VERSION", f'"{VERSION}"'), ("FUSEDTRAIN_TORCH_VERSION", f'"{torch_version}"')]
    # -fno-math-errno lets the vectorizer turn sqrt into SIMD instructions (see cpu_driver.h).
    # -fopenmp: at::parallel_for is an inline OpenMP region in torch's Linux builds; without the flag it
    # silently runs on one thread. The loader reuses the libgomp.so.1 torch already loaded, so
    # torch.set_num_threads governs our threads too. Torch chooses the C++ standard it needs.
    # -ffp-contract=off / --fmad=false: every operation of math.h rounds as written, in every
    # instantiation, so a rule gives the same bits wherever it is inlined (see Note [no FMA contraction]).
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # -fno-trapping-math lets it compute both sides of a select (if-conversion), needed to vectorize
    # rules with options (see Note [flags as numbers] in math.h). The user's extra flags come last, so they win.
    extra_cxx = _extra_flags("FUSEDTRAIN_EXTRA_CXXFLAGS")
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"] + openmp + extra_cxx
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    kwargs = {}
    if with_cuda:
        arch_list, nvcc_version = _cuda_arch_list(cpp_extension, cuda_home)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        print(f"fusedtrain: compiling the CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list}", file=sys.stderr)
        sources += sorted(os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        define += [("FUSEDTRAIN_WITH_CUDA", None), ("FUSEDTRAIN_CUDA_ARCHS", f'"{arch_list}"'),
                   ("FUSEDTRAIN_CUDA_VERSION", '"%d.%d"' % nvcc_version)]
        if os.environ.get("FUSEDTRAIN_CUDA_ILP"):  # tuning knob: vectors in flight per thread
            define.append(("FUSEDTRAIN_CUDA_ILP", str(int(os.environ["FUSEDTRAIN_CUDA_ILP"]))))
        include_dirs += _nvidia_wheel_includes()
        # The host compiler nvcc calls gets the extra C++ flags too (sanitizers must cover the host code).
        nvcc_host = [f"-Xcompiler={flag}" for flag in extra_cxx]
        kwargs["extra_compile_args"] = {
            "cxx": cxx,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"] + nvcc_host,
        }
        ext_cls = cpp_extension.CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = cpp_extension.CppExtension
    # Headers: a change to one makes setuptools run the build (ninja then rebuilds only its dependents).
    headers = sorted(glob.glob(os.path.join(ROOT, "csrc", "include", "**", "*.h*"), recursive=True))
    ext = ext_cls(
        name="fusedtrain._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define,
        depends=[os.path.relpath(h, ROOT) for h in headers],
        extra_link_args=openmp + _extra_flags("FUSEDTRAIN_EXTRA_LDFLAGS"),
        **kwargs,
    )

    tag = f"{'cuda' if with_cuda else 'cpu'}-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch_version}"
    build_dir = os.environ.get("FUSEDTRAIN_BUILD_DIR") or os.path.join(ROOT, "build", f"temp-{tag}")

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """torch's BuildExtension with a persistent object directory.

        ``pip install -e .`` (and ``pip wheel``) hand build_ext a fresh temporary build_temp, so every
        install recompiled everything. Keeping the objects and ninja's log in one place per configuration
        makes a rebuild with unchanged sources a no-op compile plus a link; ninja is the judge of what is
        stale (it tracks header dependencies and each object's command line), so setuptools' own
        timestamp shortcut, which knows neither, is switched off (force).
        """

        def finalize_options(self) -> None:
            super().finalize_options()
            self.build_temp = os.path.abspath(build_dir)
            self.force = True

        def swig_sources(self, sources: list[str], extension) -> list[str]:
            """CUDA units first. Each costs several C++ units (nvcc parses it once per architecture), and ninja
            starts jobs in the order of its build file, which follows this list; distutils sorts the list just
            before this hook, which would start the CUDA units last, so that a big one ran alone at the end of
            a cold build while the other cores idled."""
            sources = super().swig_sources(sources, extension)
            return sorted(sources, key=lambda s: not s.endswith(".cu"))  # stable: each group stays sorted

    return ext, BuildExt, torch_version


def main() -> None:
    ext, build_ext, torch_built = _extension()
    torch_series = ".".join(torch_built.split(".")[:2])
    setup(
        name="fusedtrain",
        version=VERSION,
        description="Fused, fast, drop-in training parts for PyTorch: optimizers, dropout, augmentation, ensembles",
        package_dir={"": "python"},
        packages=find_packages("python"),
        ext_modules=[ext],
        cmdclass={"build_ext": build_ext},
        python_requires=">=3.9",
        # The compiled library works with the torch release it was built against only (torch's C++ ABI).
        install_requires=[f"torch=={torch_series}.*"],
        entry_points={"console_scripts": ["fusedtrain-bench=fusedtrain.bench.cli:main"]},
        zip_safe=False,
    )


if __name__ == "__main__":  # pip and setuptools' build backend run this file as __main__; tests import its helpers
    main()
