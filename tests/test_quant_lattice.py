"""The CPU 8-bit encoder (Note [lattice encoder], csrc/include/fusedtrain/quant_cpu.h) against quant.h's binary
search on every float32 in [0, 1.001]: tests/cpp/lattice_encoder.cpp, built here with the extension's
floating-point flags (setup.py) against torch's headers (~1 minute)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform != "linux", reason="the check is built with the Linux toolchain (g++)")
def test_lattice_encoder_equals_the_search_on_every_float(tmp_path: Path) -> None:
    cxx = os.environ.get("CXX", "g++")
    assert shutil.which(cxx), f"{cxx} is needed to build the extension, and this check"
    exe = tmp_path / "lattice_encoder"
    flags = ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    includes = [f"-I{ROOT / 'csrc' / 'include'}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu"]
    rpath = [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    subprocess.run([cxx, *flags, *includes, str(ROOT / "tests" / "cpp" / "lattice_encoder.cpp"), "-o", str(exe),
                    *libs, *rpath], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    print(out.stdout)
    assert out.returncode == 0 and out.stdout.strip().endswith("mismatches 0"), out.stdout + out.stderr
    assert "values=1065361605 mismatches=0" in out.stdout or "no AVX2" in out.stdout
