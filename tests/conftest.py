from __future__ import annotations

import os

import pytest
import torch

import fusedtrain

CUDA_OK = torch.cuda.is_available() and fusedtrain.has_cuda_kernels()
DEVICES = ["cpu", "cuda"]  # CUDA cases are skipped (and marked) without a GPU


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="more examples in the property-based tests "
                     "(same as FUSEDTRAIN_SLOW=1; see tests/_hypothesis.py)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--slow"):
        os.environ["FUSEDTRAIN_SLOW"] = "1"  # read by tests/_hypothesis.py when the test modules are imported


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA device and fusedtrain's CUDA kernels")
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_cuda = callspec is not None and "cuda" in (str(v) for v in callspec.params.values())
        if on_cuda:
            item.add_marker(pytest.mark.cuda)
        if (on_cuda or "cuda" in item.keywords) and not CUDA_OK:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


def pytest_report_header(config: pytest.Config) -> str:
    return f"fusedtrain build: {fusedtrain.build_info()}"
