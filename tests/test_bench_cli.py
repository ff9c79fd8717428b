"""The benchmark CLI: argument handling and the JSON it writes (a tiny run, not a timing test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fusedtrain.bench import cli


def test_unknown_option_and_device_fail_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--no-such-option"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit, match="unknown device"):
        cli.main(["--device", "nonsense"])
    with pytest.raises(SystemExit, match="unknown parameter set"):
        cli.main(["--device", "cpu", "--sizes", "huge"])


def test_tiny_run_writes_json(tmp_path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "fusedtrain.bench", "--device", "cpu", "--quick", "--reps", "2",
                           "--family", "optim", "--sizes", "small-2004", "--optimizers", "SGD momentum", "--json",
                           str(out), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {"env", "results"} <= set(data)
    assert data["env"]["bandwidth_gbps"] > 0
    impls = {r["impl"]: r for r in data["results"]}
    assert set(impls) == {"torch for-loop", "torch foreach", "torch fused", "fusedtrain"}
    ours = impls["fusedtrain"]
    assert ours["median_ms"] > 0 and ours["vs_best_torch"] > 0 and ours["bytes_moved"] == 20 * sum(
        int(s) for s in __import__("fusedtrain.bench.optim", fromlist=["x"]).param_shapes("small-2004")
        for s in s)
    assert "fusedtrain" in proc.stdout


def test_ema_family_rows(tmp_path) -> None:
    out = tmp_path / "ema.json"
    proc = subprocess.run([sys.executable, "-m", "fusedtrain.bench", "--device", "cpu", "--reps", "2", "--family",
                           "ema", "--sizes", "small-2004", "--json", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"torch _foreach_lerp_", "fusedtrain", "torch fused Adam + _foreach_lerp_",
                         "fusedtrain Adam alone (no EMA)", "fusedtrain Adam(ema=)"}
    assert rows["fusedtrain Adam(ema=)"]["note"].endswith("over the step alone")
    assert all(r["median_ms"] > 0 for r in rows.values())
