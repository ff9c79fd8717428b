"""Shared by the examples: the mean ± spread table of accuracies over seeds."""

from __future__ import annotations

import statistics


def print_accuracies(title: str, runs: list[dict[str, float]]) -> None:
    """Prints ``title`` and, per row of the first run, the mean accuracy over runs ± its std. dev."""
    print(title)
    for key in runs[0]:
        vals = [r[key] for r in runs]
        spread = f" ± {statistics.stdev(vals) * 100:.1f}" if len(vals) > 1 else ""
        print(f"  {key:32s} {statistics.mean(vals) * 100:5.1f} %{spread}")
