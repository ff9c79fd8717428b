"""The build's promises: torch-version check at import, CUDA architecture coverage, build_info, setup.py's lists."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedtrain
from fusedtrain import _build

ROOT = Path(__file__).resolve().parents[1]


# --- CUDA architecture coverage (csrc/cuda_arch.cpp; the run-time check picks its message with it) ---

@pytest.mark.parametrize("archs, capability, expected", [
    ("7.5;8.0;9.0+PTX", (7, 0), "none"),    # older than every entry
    ("7.5;8.0;9.0+PTX", (7, 5), "cubin"),
    ("7.5;8.0;9.0+PTX", (8, 6), "cubin"),   # an sm_80 cubin runs on 8.6 (same major, higher minor)
    ("7.5;8.0;9.0+PTX", (8, 9), "cubin"),
    ("7.5;8.0;9.0+PTX", (9, 0), "cubin"),
    ("7.5;8.0;9.0+PTX", (10, 0), "ptx"),    # Blackwell JIT-compiles compute_90 PTX
    ("7.5;8.0;9.0+PTX", (12, 0), "ptx"),
    ("7.5;8.0;9.0", (12, 0), "none"),       # no PTX: nothing runs on a later major
    ("8.6", (8, 0), "none"),                # a cubin never runs on a lower minor
    ("9.0", (9, 0), "cubin"),
    ("8.0+PTX", (7, 5), "none"),            # PTX never runs backwards either
    ("9.0a", (9, 0), "cubin"),              # architecture-specific: that capability only
    ("9.0a+PTX", (10, 0), "none"),
    ("10.0f", (10, 3), "cubin"),            # family-specific: later minors of the family
    ("10.0f+PTX", (12, 0), "none"),
    ("7.5 8.0", (8, 0), "cubin"),           # torch also accepts spaces as separators
    ("7.5;8.0;8.6;9.0;10.0;12.0+PTX", (7, 5), "cubin"),  # setup.py's default with nvcc 13
    ("7.5;8.0;8.6;9.0;10.0;12.0+PTX", (10, 3), "cubin"),
    ("7.5;8.0;8.6;9.0;10.0;12.0+PTX", (12, 1), "cubin"),
    ("7.5;8.0;8.6;9.0;10.0;12.0+PTX", (13, 0), "ptx"),
    ("7.5;8.0;8.6;9.0;10.0;12.0+PTX", (11, 0), "none"),  # Jetson Thor: only an 11.0 cubin (aarch64 builds)
    ("", (9, 0), "none"),
])
def test_cuda_arch_coverage(archs: str, capability: tuple[int, int], expected: str) -> None:
    assert _build.cuda_arch_coverage(archs, capability) == expected


@pytest.mark.parametrize("bad", ["9", "sm_90", "9.0+ptx", "9.0b", "Hopper", "9.0;;x"])
def test_cuda_arch_coverage_rejects_malformed_lists(bad: str) -> None:
    with pytest.raises(RuntimeError, match="malformed CUDA architecture"):
        _build.cuda_arch_coverage(bad, (9, 0))


def test_describe_cuda_archs() -> None:
    text = _build.library().describe_cuda_archs("7.5;9.0+PTX")
    assert text == "cubins for sm_75, sm_90; PTX for compute_90 (JIT for 9.0 and newer)"


def test_check_cuda_device_refuses_what_it_cannot_check() -> None:
    with pytest.raises(ValueError, match="expected a CUDA device"):
        _build.check_cuda_device("cpu")
    if not fusedtrain.has_cuda_kernels():
        with pytest.raises(RuntimeError, match="built without CUDA kernels"):
            _build.check_cuda_device("cuda:0")


@pytest.mark.cuda
def test_check_cuda_device_passes_on_this_gpu() -> None:
    """The GPU the tests run on is covered by the build (else every CUDA test would fail with the message)."""
    capability = torch.cuda.get_device_capability()
    assert _build.cuda_arch_coverage(fusedtrain.build_info()["cuda_archs"], capability) != "none"
    _build.check_cuda_device(torch.cuda.current_device())
    _build.check_cuda_device("cuda")


# --- torch version check at import ---

@pytest.mark.parametrize("built, runtime", [("2.14.1", "2.14.1"), ("2.14.1", "2.14.0+cpu"), ("2.6.0", "2.6.3+cu124")])
def test_check_torch_version_accepts_the_same_release(built: str, runtime: str) -> None:
    _build.check_torch_version(built, runtime)


@pytest.mark.parametrize("built, runtime", [("2.14.1", "2.13.0"), ("2.6.0", "2.14.1+cu130"), ("2.14.1", "3.14.1")])
def test_check_torch_version_refuses_another_release(built: str, runtime: str) -> None:
    with pytest.raises(ImportError) as info:
        _build.check_torch_version(built, runtime)
    message = str(info.value)
    assert built in message and runtime in message and "rebuild" in message


def test_import_refuses_a_mismatched_torch() -> None:
    """The real import path: torch reports another release than the one the library was built against."""
    built = fusedtrain.build_info()["torch_built"]
    fake = "1.99.0"
    code = f"import torch; torch.__version__ = {fake!r}; import fusedtrain"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(fusedtrain.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert f"built against torch {built}" in result.stderr and f"torch {fake} is installed" in result.stderr


# --- build_info ---

def test_build_info_matches_this_torch_and_build() -> None:
    info = fusedtrain.build_info()
    assert info["torch_built"] == torch.__version__.split("+")[0]
    assert info["torch_runtime"] == torch.__version__
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_archs"]
        # Every entry is canonical (what the run-time check parses) and of a capability the kernels support.
        for arch in info["cuda_archs"].split(";"):
            major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", arch).groups())
            assert major >= 7
            assert _build.cuda_arch_coverage(arch, (major, minor)) == "cubin"
    else:
        assert info["cuda_version"] == "" and info["cuda_archs"] == ""


# --- setup.py's architecture lists (pure functions; setup.py is loaded without running setup()) ---

def _setup_module():
    spec = importlib.util.spec_from_file_location("fusedtrain_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


def test_setup_compiled_archs_from_gencode_flags() -> None:
    setup = _setup_module()
    flags = ["-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_120,code=compute_120",
             "-gencode=arch=compute_120,code=sm_120", "-gencode=arch=compute_90a,code=sm_90a",
             "-gencode=arch=compute_100,code=sm_100"]
    assert setup._compiled_archs(flags) == "7.5;9.0a;10.0;12.0+PTX"


def test_setup_default_arch_list_follows_nvcc() -> None:
    setup = _setup_module()
    from torch.utils import cpp_extension

    nvcc_13 = ["7.5", "8.0", "8.6", "8.7", "8.8", "8.9", "9.0", "10.0", "10.3", "11.0", "12.0", "12.1"]
    expected = "7.5;8.0;8.6;9.0;10.0;" + ("11.0;" if "11.0" in setup.DEFAULT_ARCHS else "") + "12.0+PTX"
    assert setup._default_arch_list(cpp_extension, nvcc_13) == expected
    nvcc_12_4 = ["5.0", "5.2", "5.3", "6.0", "6.1", "6.2", "7.0", "7.2", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0"]
    assert setup._default_arch_list(cpp_extension, nvcc_12_4) == "7.5;8.0;8.6;9.0+PTX"


def _fake_toolkit(root: Path, release: str, codes: list[str]) -> str:
    """A CUDA_HOME whose bin/nvcc answers --version and --list-gpu-code like a real one of that release."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    listing = "\\n".join(f"sm_{c.replace('.', '')}" for c in codes)
    nvcc.write_text(f'#!/bin/sh\ncase "$1" in\n  --version) echo "Cuda compilation tools, release {release}, '
                    f'V{release}.0";;\n  --list-gpu-code) printf "{listing}\\n";;\nesac\n')
    nvcc.chmod(0o755)
    return str(root)


NVCC_13 = ["7.5", "8.0", "8.6", "8.7", "8.8", "8.9", "9.0", "10.0", "10.3", "11.0", "12.0", "12.1"]


def test_setup_refuses_nvcc_older_than_12_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = _setup_module()
    from torch.utils import cpp_extension

    home = _fake_toolkit(tmp_path, "12.0", ["7.0", "7.5", "8.0", "9.0"])
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with pytest.raises(SystemExit, match=r"nvcc at .* is 12\.0; the CUDA kernels need CUDA 12\.1 or newer"):
        setup._cuda_arch_list(cpp_extension, home)


def test_setup_default_and_requested_lists_with_a_toolkit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = _setup_module()
    from torch.utils import cpp_extension

    home = _fake_toolkit(tmp_path, "13.0", NVCC_13)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    expected = "7.5;8.0;8.6;9.0;10.0;" + ("11.0;" if "11.0" in setup.DEFAULT_ARCHS else "") + "12.0+PTX"
    assert setup._cuda_arch_list(cpp_extension, home) == (expected, (13, 0))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Turing 9.0+PTX")  # torch's names and separators, made canonical
    assert setup._cuda_arch_list(cpp_extension, home) == ("7.5+PTX;9.0+PTX", (13, 0))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0")  # CUDA 13 dropped Volta
    with pytest.raises(SystemExit, match=r"asks for 7\.0, which nvcc 13\.0 .* cannot compile for"):
        setup._cuda_arch_list(cpp_extension, home)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "6.1")
    with pytest.raises(SystemExit, match=r"asks for 6\.1, but the kernels need compute capability 7\.0"):
        setup._cuda_arch_list(cpp_extension, home)


# --- scripts/build_stamp.py: what makes scripts/dev.sh rebuild ---

def _stamp_module():
    spec = importlib.util.spec_from_file_location("fusedtrain_build_stamp", ROOT / "scripts" / "build_stamp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_stamp_tracks_build_settings_not_parallelism(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stamp = _stamp_module()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setenv("MAX_JOBS", "2")
    library = str(tmp_path / "_C*.so")
    inputs, missing = stamp.fingerprint(False, library).split()
    monkeypatch.setenv("MAX_JOBS", "7")  # parallelism changes no output
    assert stamp.fingerprint(False, library) == f"{inputs} {missing}"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert stamp.fingerprint(False, library).split()[0] != inputs
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert stamp.fingerprint(True, library).split()[0] != inputs  # --python: the Python sources count too
    (tmp_path / "_C.cpython-311.so").write_bytes(b"built")
    assert stamp.fingerprint(False, library) != f"{inputs} {missing}"  # a library appeared (or changed)
