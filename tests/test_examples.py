"""The examples run end to end in a tiny mode: each writes its PNG and prints sane numbers.

They run as scripts (as a user runs them), each in its own process, with a few epochs or steps only: these
check that the examples work, not the numbers the docs report (those come from the full runs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib", reason="the examples' plots need matplotlib (scripts/dev.sh installs it)")


def run_example(name: str, *args: str) -> str:
    import fusedtrain

    env = dict(os.environ)
    # the examples import the fusedtrain these tests import: the checkout's in-place build, or an installed one
    # (scripts/dev.sh sanitize installs its sanitized build into site-packages; the checkout has no library then)
    home = str(Path(fusedtrain.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, f"{path} is not a plausible PNG ({len(data)} bytes)"


def percentages(out: str) -> dict[str, float]:
    """The ``  <row name>   95.1 % [± 0.3]`` rows of an accuracy table."""
    return {m[1].strip(): float(m[2]) for m in re.finditer(r"^  (\S.*?)\s+(\d+\.\d) %", out, re.M)}


def test_snapshot_ensemble(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = run_example("snapshot_ensemble.py", "--quick", "--seeds", "2", "--epochs", "4", "--cycles", "2",
                      "--train-size", "300", "--out", str(tmp_path))
    assert_png(tmp_path / "snapshot_ensemble.png")
    rows = percentages(out)
    assert {"single model, lr 0.2", "snapshot ensemble, M=2", "cyclic run, last snapshot alone"} <= set(rows), out
    # 4 epochs on 300 noisy images: far from the full run's numbers, but far above chance (10 %)
    assert all(30.0 < v <= 100.0 for v in rows.values()), rows
    m = re.search(r"ensemble wins (\d+), ties (\d+), loses (\d+) of (\d+) seeds", out)
    assert m is not None and sum(map(int, m.groups()[:3])) == int(m[4]) == 2, out
    assert re.search(r"seed 1: single lr 0.2 \d+\.\d %; snapshots \d+\.\d \d+\.\d -> ensemble", out), out


def test_transfer(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = run_example("transfer.py", "--quick", "--steps", "20", "--out", str(tmp_path))
    assert_png(tmp_path / "transfer.png")
    rows = percentages(out)
    assert len(rows) == 5 and "from scratch (few images)" in rows, out
    assert all(0.0 <= v <= 100.0 for v in rows.values()), rows
    assert rows["from scratch (few images)"] > 30.0, rows  # 5 classes: chance is 20 %


def test_optimizer_paths(tmp_path: Path) -> None:
    out = run_example("optimizer_paths.py", "--quick", "--out", str(tmp_path))
    assert_png(tmp_path / "optimizer_paths.png")
    diff = float(re.search(r"largest difference from torch.optim's path over all points: (\S+)", out)[1])
    assert diff < 1e-9, out  # float64 paths of fusedtrain and torch.optim agree
    finals = {}
    for surface in re.split(r"^(?=\S)", out, flags=re.M):
        name = surface.split(":")[0]
        for m in re.finditer(r"^  (\w+)\s+lr \S+\s+.*?\(\s*([-+]?\d+\.\d+),\s*([-+]?\d+\.\d+)\), f = ([^;\s]+)",
                             surface, re.M):
            finals[(name, m[1])] = (float(m[2]), float(m[3]), float(m[4]))
    assert len(finals) == 18, out
    # what the picture is for, already after the quick run's 60 steps:
    assert finals[("ravine", "Momentum")][2] < finals[("ravine", "SGD")][2] / 10  # momentum crosses the ravine
    assert finals[("local minimum", "Momentum")][0] < 0 < finals[("local minimum", "SGD")][0]  # over the barrier
    assert finals[("saddle", "Momentum")][2] < -1 < finals[("saddle", "SGD")][2]  # escapes the saddle sooner


def test_train_digits(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = run_example("train_digits.py", "--quick", "--out", str(tmp_path))
    assert_png(tmp_path / "train_digits.png")
    rows = percentages(out)
    assert {"SGD", "Adam", "Adam + dropout", "Adam + dropout + augment"} <= set(rows), out
    # 3 epochs: every adaptive or momentum run is far above chance (10 %)
    assert all(v > 60.0 for k, v in rows.items() if k != "SGD"), rows


def test_hf_trainer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = run_example("hf_trainer.py", "--quick", "--out", str(tmp_path))
    assert (tmp_path / "hf_trainer" / "whole" / "checkpoint-6" / "optimizer.pt").is_file()
    before = float(re.search(r"before training: test loss (\S+),", out)[1])
    after = [float(v) for v in re.findall(r"^\d\. .*test loss (\S+),", out, re.M)]
    assert len(after) == 2 and all(v < before for v in after), out  # both ways learn
    assert "Trainer's groups (tensors, weight decay): [(17, 0.01), (24, 0.0)]" in out
    assert "bit-identical to the uninterrupted run: yes" in out, out


def test_lightning(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    out = run_example("lightning_fusedtrain.py", "--quick", "--out", str(tmp_path))
    losses = [float(v) for v in re.search(r"training loss per epoch: (.*)$", out, re.M)[1].split(", ")]
    assert len(losses) == 2 and losses[1] < losses[0], out
    accuracy = float(re.search(r"test accuracy (\S+) %", out)[1])
    assert accuracy > 50.0, out  # 4 classes: chance is 25 %
    assert "weights and EMA bit-identical to the uninterrupted run: yes" in out, out


def test_timm_optimizer() -> None:
    pytest.importorskip("timm")
    out = run_example("timm_optimizer.py", "--quick")
    assert "1. create_optimizer(model, 'adamw'): 18 tensors wd 0.05; 38 tensors wd 0" in out, out
    assert "weights bit-identical to 1: yes" in out, out
    assert re.search(r"3\. .*: 12 groups", out), out
    for first, last in re.findall(r"loss (\S+) -> (\S+),", out):
        assert float(last) < float(first), out


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("[!_]*.py")))
def test_help_is_complete(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--help prints the example's whole docstring and a description of every option; --out defaults to a
    folder outside the repository's committed figures."""
    import argparse
    import importlib.util

    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name[:-3]}", EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    seen: list[argparse.ArgumentParser] = []

    def record(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", record)
    with pytest.raises(SystemExit):
        module.main([])
    (ap,) = seen
    assert ap.description == module.__doc__ and isinstance(ap.formatter_class, type)
    assert issubclass(ap.formatter_class, argparse.RawDescriptionHelpFormatter)  # printed as written, whole
    assert all(action.help for action in ap._actions), [a.dest for a in ap._actions if not a.help]
    out = next((a for a in ap._actions if a.dest == "out"), None)
    if out is not None:
        assert Path(out.default).resolve() != (EXAMPLES / "figures").resolve()
        assert not Path(out.default).is_absolute()  # relative to where the user runs it
