"""The host-time benchmark family (issue 14): rows for both timings, per-tensor notes, ratios."""

from __future__ import annotations

import torch

from fusedtrain.bench import host


def test_host_family_rows() -> None:
    rows = host.run(torch.device("cpu"), reps=3, warmup=1, progress=False, counts=(5,))
    cases = {(r.case, r.impl) for r in rows}
    impls = ["fusedtrain", "torch fused", "torch foreach", "torch for-loop"]
    for timing in ("interleaved", "back to back"):
        for impl in impls:
            assert (f"Adam step, 5 one-element tensors, {timing}", impl) in cases
    assert len(rows) == 2 * len(impls)
    for r in rows:
        assert r.median_ms is not None and r.median_ms > 0
        assert r.extra["tensors"] == 5 and r.extra["timing"] in ("interleaved", "back to back")
        assert abs(r.extra["us_per_tensor"] - r.median_ms * 1e3 / 5) < 1e-9
        assert (r.vs_best_torch is not None) == (r.impl == "fusedtrain")


def test_back_to_back_times_all_but_the_first_call_of_each_run() -> None:
    calls: dict[str, int] = {"a": 0, "b": 0}

    def step(name: str) -> None:
        calls[name] += 1

    times = host._back_to_back({"a": lambda: step("a"), "b": lambda: step("b")}, torch.device("cpu"),
                               warmup=2, reps=7, run_length=4)
    rounds = -(-7 // 3)
    assert {k: len(v) for k, v in times.items()} == {"a": 3 * rounds, "b": 3 * rounds}
    assert calls == {"a": 2 + 4 * rounds, "b": 2 + 4 * rounds}
