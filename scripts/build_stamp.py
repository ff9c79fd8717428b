"""Print a fingerprint of everything fusedtrain's build depends on, so scripts/dev.sh can skip a rebuild.

Two digests: one of the inputs (the C++/CUDA sources and headers, the build files, the Python and torch
versions, the compilers found, every environment variable setup.py reads; with ``--python`` the Python
sources too, which a non-editable install copies), one of the library a build left (path, size and time;
"missing" when there is none). scripts/dev.sh records the inputs taken before a build with the library
after it, and skips the next build while both still match. Used as:

    python scripts/build_stamp.py [--python] [--library PATH_GLOB]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Every variable setup.py or torch's cpp_extension reads to decide what and how to compile.
ENV = ("FUSEDTRAIN_CPU_ONLY", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH", "FUSEDTRAIN_CUDA_ILP",
       "FUSEDTRAIN_EXTRA_CXXFLAGS", "FUSEDTRAIN_EXTRA_LDFLAGS", "FUSEDTRAIN_BUILD_DIR", "CC", "CXX", "CFLAGS",
       "CXXFLAGS", "LDFLAGS", "NVCC_FLAGS")  # not MAX_JOBS: parallelism changes no output


def fingerprint(with_python: bool, library: str) -> str:
    """Two hex digests, "INPUTS LIBRARY": what a build reads, and the state of the library it left."""
    h = hashlib.sha256()

    def add(*parts: object) -> None:
        for part in parts:
            h.update(repr(part).encode())
            h.update(b"\0")

    trees = ["csrc"] + (["python"] if with_python else [])
    files = sorted(p for tree in trees for p in (ROOT / tree).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc"))
    files += [ROOT / name for name in ("setup.py", "pyproject.toml", "MANIFEST.in") if (ROOT / name).is_file()]
    for path in files:
        add(str(path.relative_to(ROOT)), hashlib.sha256(path.read_bytes()).hexdigest())
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    add(sys.version, sys.prefix, torch_version)
    add(*(shutil.which(tool) for tool in ("nvcc", "c++", "g++", "ninja")))
    add(*((name, os.environ.get(name)) for name in ENV))
    lib = hashlib.sha256()
    built = sorted(glob.glob(os.path.join(ROOT, library)))  # an absolute `library` stays as it is
    for part in ((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in built) if built else ("missing",):
        lib.update(repr(part).encode())
    return f"{h.hexdigest()} {lib.hexdigest()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="store_true", help="also fingerprint python/ (non-editable installs)")
    parser.add_argument("--library", default="python/fusedtrain/_C*.so",
                        help="glob of the built library to include (relative to the repository, or absolute)")
    args = parser.parse_args()
    print(fingerprint(args.python, args.library))


if __name__ == "__main__":
    main()
