"""The train benchmark family (fusedtrain.bench.train): its torch side and its fusedtrain side compute the same
training. With every dropout off and the augmentation a fixed central crop, the losses, weights and EMA weights
of the two sides agree to float32 rounding; with dropout on, both train alike. Tiny sizes, a few iterations."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from fusedtrain.bench import train

TINY_GPT = train.TransformerSize(vocab=97, seq=16, d=32, layers=2, heads=2, batch=3)
# A small learning rate: this tiny CNN's training is chaotic at 1e-2 (BatchNorm over 8 samples at 1x1 in the last
# stage): a 1e-7 difference in the weights (one rounding) grows 50-fold per step, torch against torch included
# when one weight is nudged, so the comparison would test the chaos and not the implementations.
TINY_CNN = train.VisionSize(batch=8, in_size=40, out_size=32, width=8, classes=5, lr=1e-3)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One thread: the results do not depend on it, and on a loaded 2-core machine every parallel region of a
    tiny op can wait a scheduler tick for the second thread (100x slower tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(sides: list[train.Side], iterations: int) -> dict[str, list[float]]:
    times = train.measure_sides(sides, warmup=iterations, rounds=0, per_round=0)
    return {impl: t.losses for impl, t in times.items()}


def _assert_same_training(sides: list[train.Side], losses: dict[str, list[float]], rtol: float) -> None:
    a, b = losses["torch"], losses["fusedtrain"]
    assert a[-1] < a[0] - 0.05, f"the run did not train: {a}"  # a comparison of a run that learns
    for i, (x, y) in enumerate(zip(a, b)):
        assert math.isclose(x, y, rel_tol=rtol), f"iteration {i}: torch loss {x}, fusedtrain loss {y}"
    ta, fa = sides
    for name, p in ta.model.named_parameters():
        q = dict(fa.model.named_parameters())[name]
        torch.testing.assert_close(q, p, rtol=rtol, atol=rtol, msg=lambda m, name=name: f"{name}: {m}")
    for p, q in zip(ta.averages, fa.averages, strict=True):
        torch.testing.assert_close(q, p, rtol=rtol, atol=rtol)
    for (name, p), (_, q) in zip(ta.model.named_buffers(), fa.model.named_buffers(), strict=True):
        torch.testing.assert_close(q, p, rtol=rtol, atol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def test_transformer_sides_match_without_dropout() -> None:
    sides = train.transformer_sides(TINY_GPT, CPU, amp="off", p=0.0, seed=3)
    assert [s.impl for s in sides] == ["torch", "fusedtrain"]
    # same initial weights, different objects
    for (n, p), (_, q) in zip(sides[0].model.named_parameters(), sides[1].model.named_parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
    losses = _run(sides, 6)
    _assert_same_training(sides, losses, rtol=2e-5)


def test_fused_loss_matches_torch_loss() -> None:
    """The fusedtrain side's loss (fused cross-entropy) and the torch side's (F.cross_entropy on float32 logits):
    the same value and logits gradient, and a finite time difference for the dropout-by-difference column."""
    logits = torch.randn(3, 16, 97, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 97, (3, 16))
    a = train._lm_loss(logits, targets)
    (ga,) = torch.autograd.grad(a, logits)
    b = train._lm_loss_fused(logits.float(), targets)
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)  # both float32
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-8)
    assert math.isfinite(train.loss_delta_ms(TINY_GPT, CPU, None, reps=2))


def test_vision_sides_match_without_augmentation() -> None:
    pytest.importorskip("torchvision")
    sides = train.vision_sides(TINY_CNN, CPU, amp="off", augment=False, seed=4)
    losses = _run(sides, 6)
    # the inputs already differ by an ulp (torchvision's resize + normalize vs the fused op), and training
    # amplifies that: 1e-6 relative at the first loss, ~2e-5 at the sixth; dropout or augmentation move it 1e-2
    _assert_same_training(sides, losses, rtol=1e-4)  # BatchNorm running statistics (buffers) included


def test_dropout_is_on_both_sides_and_they_train_alike() -> None:
    torch.manual_seed(0)
    plain = _run(train.transformer_sides(TINY_GPT, CPU, amp="off", p=0.0, seed=5), 1)
    dropped_sides = train.transformer_sides(TINY_GPT, CPU, amp="off", p=0.1, seed=5)
    # the first forward sees the same weights and batch: dropout (and only dropout) moves each side's loss
    first = _run(dropped_sides, 1)
    for impl in ("torch", "fusedtrain"):
        assert first[impl][0] != plain[impl][0], impl
        assert abs(first[impl][0] - plain[impl][0]) < 0.1, impl
    more = _run(dropped_sides, 40)
    start = plain["torch"][0]
    tail = {impl: statistics.mean(ls[-8:]) for impl, ls in more.items()}
    for impl, value in tail.items():
        assert value < start - 0.5, (impl, start, more[impl])  # both learn the synthetic text
    assert abs(tail["torch"] - tail["fusedtrain"]) < 0.15 * (start - min(tail.values())), (tail, start)


def test_vision_with_augmentation_trains_alike() -> None:
    pytest.importorskip("torchvision")
    torch.manual_seed(1)
    losses = _run(train.vision_sides(TINY_CNN, CPU, amp="off", augment=True, seed=6), 12)
    for impl, ls in losses.items():
        assert all(math.isfinite(x) for x in ls), impl
    first = losses["torch"][0]
    tail = {impl: statistics.mean(ls[-4:]) for impl, ls in losses.items()}
    assert abs(losses["fusedtrain"][0] - first) < 0.5  # same weights, differently augmented images
    assert abs(tail["torch"] - tail["fusedtrain"]) < 0.5, (tail, losses)


def test_rows_breakdown_and_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("torchvision")
    from fusedtrain.bench.plot import plot_breakdown

    rows = train.run(CPU, reps=2, warmup=1, progress=False, quick=True)
    assert [(r.extra["workload"], r.impl) for r in rows] == [
        ("transformer", "torch"), ("transformer", "fusedtrain"), ("transformer", "torch, no dropout (reference)"),
        ("vision", "torch"), ("vision", "fusedtrain")]
    for r in rows:
        phases = r.extra["phases_ms"]
        assert set(phases) == set(train.PHASES) and all(v >= 0 for v in phases.values())
        assert r.p20_ms <= r.median_ms <= r.p80_ms
        assert r.extra["iterations"] == 2 and abs(sum(r.extra["share_pct"].values()) - 100) < 1e-6
        assert (r.vs_best_torch is not None) == (r.impl == "fusedtrain")
    for r in rows[:2]:
        assert "optimizer_dropout_ema_pct" in r.extra and "dropout_ms" in r.extra
    assert math.isfinite(rows[1].extra["loss_delta_ms"])  # the fusedtrain side's loss against torch's
    table = train.format_breakdown(rows)
    assert table.count("\n") == len(rows) + 2 and "optimizer" in table
    png = tmp_path / "b.png"
    assert plot_breakdown(rows, png, title="unit") == len(rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no row has a per-phase breakdown"):
        plot_breakdown([], png)
    with pytest.raises(ValueError, match="unknown train workloads"):
        train.run(CPU, quick=True, workloads=("llm",))


def test_cli_train_family(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("torchvision")
    js, png = tmp_path / "t.json", tmp_path / "t.png"
    proc = subprocess.run([sys.executable, "-m", "fusedtrain.bench", "--device", "cpu", "--quick", "--reps", "2",
                           "--family", "train", "--json", str(js), "--plot", str(png), "--no-progress"],
                          check=False, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert "per-phase medians" in proc.stdout
    rows = json.loads(js.read_text())["results"]
    assert {r["family"] for r in rows} == {"train"} and len(rows) == 5
    assert (tmp_path / "t-breakdown.png").read_bytes()[:4] == b"\x89PNG"
    assert png.read_bytes()[:4] == b"\x89PNG"
