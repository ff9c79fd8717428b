"""The benchmark CLI: argument handling and the JSON it writes (a tiny run, not a timing test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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
    # the header says what the probe column is; the table names it "% probe", never an unexplained "% BW"
    assert "bandwidth probe (in-place add" in proc.stdout and "% probe" in proc.stdout
    assert "% BW" not in proc.stdout


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


def test_lowbit_family_rows(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The state-bits rows: each names its state bytes per parameter, measured from the optimizer's state."""
    from fusedtrain.bench import lowbit
    from fusedtrain.bench import optim as optim_bench

    monkeypatch.setitem(optim_bench.PARAM_SETS, "tiny", lambda: [(3, 4096), (37, 5), (1,)])
    results = lowbit.run(torch.device("cpu"), ["tiny"], reps=2, warmup=1, bandwidth=0.0, progress=False)
    rows = {r.impl: r for r in results}
    assert {"torch fused (32-bit states)", "fusedtrain 32-bit states", "fusedtrain 8-bit states"} <= set(rows)
    numel = 4096 * 3 + 37 * 5 + 1
    # float32 states: 8 B per parameter; 8-bit: the 3x4096 matrix in codes (2 B) plus an absmax per 256 per state,
    # the two small tensors in float32 (below min_8bit_size)
    want8 = (2 * 4096 * 3 + 2 * 4 * 48 + 8 * (37 * 5 + 1)) / numel
    assert rows["fusedtrain 32-bit states"].extra["state_bytes_per_param"] == pytest.approx(8.0)
    assert rows["fusedtrain 8-bit states"].extra["state_bytes_per_param"] == pytest.approx(want8)
    assert rows["fusedtrain 8-bit states"].note.startswith(f"state {want8:.3f} B/param, ")
    assert all(r.median_ms > 0 and r.family == "lowbit" for r in results)
    assert rows["fusedtrain 8-bit states"].vs_best_torch is not None


def test_more_bad_arguments_fail_clearly(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--family", "nonsense"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit, match="not supported"):
        cli.main(["--device", "meta"])
    with pytest.raises(SystemExit, match="unknown optimizer"):
        cli.main(["--device", "cpu", "--optimizers", "Adam,LBFGS"])
    # output problems are reported before a minute of measurements, not after
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["--device", "cpu", "--plot", str(tmp_path / "missing" / "r.png")])
    with pytest.raises(SystemExit, match="is a folder"):
        cli.main(["--device", "cpu", "--json", str(tmp_path)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        cli.main(["--device", "cpu", "--plot", str(tmp_path / "r.png")])


def test_console_script_declared() -> None:
    from importlib import metadata
    from pathlib import Path

    setup_py = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert '"fusedtrain-bench=fusedtrain.bench.cli:main"' in setup_py
    installed = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "fusedtrain-bench"]
    for ep in installed:  # present when installed with pip install -e . (CI); maybe not in a bare checkout
        assert ep.value == "fusedtrain.bench.cli:main"
    assert cli.main is __import__("fusedtrain.bench", fromlist=["main"]).main


RESULT_FIELDS = {"family": str, "case": str, "impl": str, "device": str, "median_ms": float, "p20_ms": float,
                 "p80_ms": float, "bytes_moved": int, "gbps": float, "pct_bw": float,
                 "vs_best_torch": (float, type(None)), "note": str, "extra": dict}


def test_plot_json_schema_and_progress(tmp_path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from fusedtrain.bench import optim as optim_bench

    # a tiny parameter set: this checks the command's plumbing, the timings do not matter
    monkeypatch.setitem(optim_bench.PARAM_SETS, "tiny", lambda: [(1000,), (37, 5), (1,)])
    png, js = tmp_path / "ratios.png", tmp_path / "r.json"
    assert cli.main(["--device", "cpu", "--quick", "--reps", "2", "--family", "ema", "--family", "optim",
                     "--sizes", "tiny", "--optimizers", "Adam", "--json", str(js), "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    # the progress bar (stderr): one line per family that ends full
    assert "[" + "#" * 30 + "] 1/1" in err and "[" + "#" * 30 + "] 2/2" in err, err
    assert f"wrote {png}" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000

    doc = json.loads(js.read_text())
    assert set(doc) == {"env", "results"}
    assert set(doc["env"]) == {"date", "device", "torch", "cuda", "python", "threads", "fusedtrain", "bandwidth_gbps",
                               "warnings"}
    assert all(isinstance(w, str) and w.startswith("warning: ") for w in doc["env"]["warnings"])
    assert "\nwarning: " not in out or doc["env"]["warnings"], out  # printed lines are the recorded ones
    for line in doc["env"]["warnings"]:
        assert line in out
    assert doc["env"]["threads"] >= 1 and doc["env"]["bandwidth_gbps"] > 0
    rows = doc["results"]
    assert [r["family"] for r in rows] == ["ema"] * 5 + ["optim"] * 4  # in the order asked for
    for r in rows:
        assert set(r) == set(RESULT_FIELDS), r
        for key, typ in RESULT_FIELDS.items():
            assert isinstance(r[key], typ), (key, r)
        assert r["device"] == "cpu" and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    # exactly our rows carry the ratio, and the chart has one bar per such row
    assert sum(r["vs_best_torch"] is not None for r in rows) == 3


def test_plot_ratios_unit(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from fusedtrain.bench.common import Result
    from fusedtrain.bench.plot import plot_ratios

    rows = [Result("optim", "Adam, x", "torch fused", "cpu", 2.0),
            Result("optim", "Adam, x", "fusedtrain", "cpu", 1.0, vs_best_torch=2.0),
            Result("ema", "EMA, x", "fusedtrain", "cpu", 3.0, vs_best_torch=0.8),
            Result("dropout", "p=0.1, x", "fusedtrain", "cpu", 1.0, vs_best_torch=1.3)]
    assert plot_ratios(rows, tmp_path / "a.png", title="unit") == 3
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no row has a ratio"):
        plot_ratios(rows[:1], tmp_path / "b.png")


def test_shorten_cuts_at_words() -> None:
    from fusedtrain.bench.common import shorten

    assert shorten("short note", 60) == "short note"
    text = "not available: torch.optim.Adam got an unexpected keyword argument 'fused' on this device type"
    for width in range(5, len(text)):
        cut = shorten(text, width)
        assert len(cut) <= width and cut.endswith("…"), (width, cut)
        body = cut[:-1]
        assert text.startswith(body)
        # the cut falls between words: what follows in the original starts a new word (or punctuation ends one)
        rest = text[len(body):]
        assert rest[:1] in (" ", ",", ";", ":", ".") or not body[-1:].isalnum(), (width, cut)
    assert shorten("x" * 30, 10) == "x" * 9 + "…"  # one long word: cut inside, still within the width


def test_table_marks_rows_above_the_probe() -> None:
    from fusedtrain.bench.common import PROBE_EXPLANATION, Result, format_table

    below = Result("optim", "Adam, x", "fusedtrain", "cpu", 1.0, 0.9, 1.1, gbps=10.0, pct_bw=80.0)
    above = Result("optim", "SGD, x", "fusedtrain", "cpu", 1.0, 0.9, 1.1, gbps=20.0, pct_bw=160.0)
    table = format_table([below])
    assert "% probe" in table.splitlines()[0] and "*" not in table and PROBE_EXPLANATION not in table
    table = format_table([below, above])
    lines = table.splitlines()
    assert " 160*" in lines[3] and " 80 " in lines[2] + " "
    assert lines[-1] == "* above 100 % of the probe: " + PROBE_EXPLANATION
    assert "not a ceiling" in PROBE_EXPLANATION  # the explanation says why a row may exceed it


def test_noise_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    from fusedtrain.bench import common
    from fusedtrain.bench.common import NOISY_SPREAD, Result, noise_warnings

    monkeypatch.setattr(common, "cpu_count", lambda: 4)
    steady = Result("optim", "Adam, resnet50 (25.6 M, 161 tensors)", "fusedtrain", "cpu", 10.0, 9.9, 10.2)
    noisy = Result("optim", "SGD momentum, resnet50 (25.6 M, 161 tensors)", "torch fused", "cpu", 10.0, 8.0,
                   8.0 * NOISY_SPREAD * 1.01)
    untimed = Result("optim", "RMSprop, x", "torch fused", "cpu", None, note="not available: no fused RMSprop")
    assert noise_warnings([steady, untimed], 0.5, 2.4, threads=2) == []  # idle: 0.5 before, 0.4 besides us
    lines = noise_warnings([steady, noisy, untimed], 0.5, 2.4, threads=2)
    assert len(lines) == 1 and lines[0].startswith("warning: noisy row (optim, SGD momentum, resnet50")
    assert "torch fused" in lines[0] and "--reps" in lines[0]
    # busy before the run, or busy besides our own threads after it: one line naming the load and the CPUs
    for before, after in ((2.5, 2.5), (0.0, 4.6)):
        lines = noise_warnings([steady], before, after, threads=2)
        assert len(lines) == 1 and "machine is busy" in lines[0] and "on 4 CPUs" in lines[0], lines
    assert noise_warnings([steady], None, None, threads=2) == []  # no load average on this OS: no claim
    # many noisy rows: one line that counts them and names the worst, not a wall of warnings
    rows = [Result("optim", f"case {i}", "torch fused", "cpu", 10.0, 8.0, 8.0 * (1.3 + i / 10)) for i in range(6)]
    lines = noise_warnings([steady, *rows], 0.0, 0.0, threads=2)
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: 6 of 7 rows are noisy") and "worst 1.80: optim, case 5" in lines[0]


def test_quick_times_a_few_optimizers_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """--quick keeps the optim family under a minute on an idle CPU: four optimizers, unless --optimizers."""
    from fusedtrain.bench import optim as optim_bench

    seen: list[list[str] | None] = []
    monkeypatch.setattr(optim_bench, "run", lambda device, sets, optimizers, *a, **k: seen.append(optimizers) or [])
    monkeypatch.setattr(cli, "measure_bandwidth", lambda device, quick=False: 1.0)
    assert cli.main(["--device", "cpu", "--quick", "--family", "optim", "--no-progress"]) == 0
    assert cli.main(["--device", "cpu", "--quick", "--family", "optim", "--optimizers", "Rprop", "--no-progress"]) == 0
    assert cli.main(["--device", "cpu", "--family", "optim", "--no-progress"]) == 0
    assert seen == [optim_bench.QUICK_OPTIMIZERS, ["Rprop"], None]
