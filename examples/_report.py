"""Shared by the examples: their command line (the full docstring as --help, an --out folder), the mean ± spread
table of accuracies over seeds, and matplotlib for the plots."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

# Where the examples write their figures unless --out says otherwise: a folder in the current directory, never
# examples/figures (the committed figures the docs show; regenerate those with --out examples/figures).
DEFAULT_OUT = Path("fusedtrain-figures")


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose --help prints the example's whole docstring (what it does, how to read it)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_out(ap: argparse.ArgumentParser, files: str) -> None:
    """The --out option: the folder the example writes ``files`` to (created when missing)."""
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"folder for {files} (created if missing; default: ./{DEFAULT_OUT}; the docs' "
                         "figures are examples/figures)")


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
