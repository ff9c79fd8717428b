"""Shared by the examples: the mean ± spread table of accuracies over seeds, and matplotlib for the plots."""

from __future__ import annotations

import statistics
from typing import Any


def print_accuracies(title: str, runs: list[dict[str, float]]) -> None:
    """Prints ``title`` and, per row of the first run, the mean accuracy over runs ± its std. dev."""
    print(title)
    width = max(32, *(len(k) for k in runs[0]))
    for key in runs[0]:
        vals = [r[key] for r in runs]
        spread = f" ± {statistics.stdev(vals) * 100:.1f}" if len(vals) > 1 else ""
        print(f"  {key:{width}s} {statistics.mean(vals) * 100:5.1f} %{spread}")


def pyplot(script: str) -> Any:
    """``matplotlib.pyplot`` with the file-only Agg backend, or a clear exit when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"{script}: the plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
