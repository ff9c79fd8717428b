"""``--plot PATH``: a PNG bar chart of fusedtrain's speed-up over the best torch implementation, per row."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from .common import Result

__all__ = ["check_matplotlib", "plot_breakdown", "plot_ratios"]

_FAMILY_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def check_matplotlib() -> None:
    """Exits with a clear message when matplotlib is not installed (called before the benchmark runs,
    so a missing plotting library does not cost a minute of measurements)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("fusedtrain.bench: --plot needs matplotlib; install it (pip install matplotlib) or "
                         "leave out --plot")


def _pyplot() -> Any:
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_ratios(results: list[Result], path: str | os.PathLike[str], title: str = "") -> int:
    """Writes a horizontal bar chart of ``vs_best_torch`` (best torch median / fusedtrain median; > 1 means
    fusedtrain is faster) with one bar per row that has the ratio, grouped and coloured by family, and a
    line at 1x.

    Args:
        results: benchmark rows; those without a ratio (the torch rows) are skipped.
        path: where to write the PNG.
        title: the chart's title (e.g. the device and torch version).

    Returns:
        The number of bars drawn.
    """
    rows = [r for r in results if r.vs_best_torch is not None]
    if not rows:
        raise ValueError("plot_ratios: no row has a ratio to torch (vs_best_torch); nothing to plot")
    families = list(dict.fromkeys(r.family for r in rows))
    rows.sort(key=lambda r: families.index(r.family))  # stable: keeps the run order within a family
    color = {f: _FAMILY_COLORS[i % len(_FAMILY_COLORS)] for i, f in enumerate(families)}

    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(10, 1.3 + 0.32 * len(rows)))
    ys = list(range(len(rows)))
    ratios = [float(r.vs_best_torch) for r in rows]  # type: ignore[arg-type]
    # log scale, bars drawn from 1x: 2x faster and 2x slower are equally long, on either side of the line
    ax.set_xscale("log")
    ax.barh(ys, [q - 1.0 for q in ratios], left=1.0, color=[color[r.family] for r in rows])
    for y, ratio in zip(ys, ratios):
        ax.text(ratio, y, f" {ratio:.2f}× ", va="center", fontsize=8, ha="left" if ratio >= 1 else "right")
    labels = [r.case if r.impl == "fusedtrain" else f"{r.case}: {r.impl}" for r in rows]
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    for y in ys[1:]:
        if rows[y].family != rows[y - 1].family:
            ax.axhline(y - 0.5, color="grey", lw=0.6, ls="--")
    ax.axvline(1.0, color="black", lw=1)
    lo, hi = min(0.5, min(ratios) / 2.5), max(2.0, max(ratios) * 2.5)
    ax.set_xlim(lo, hi)
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if lo <= t <= hi]
    ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("speed-up over the best torch implementation (> 1×: fusedtrain is faster)", fontsize=9)
    ax.legend(handles=[Patch(color=color[f], label=f) for f in families], title="family", fontsize=8,
              loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return len(rows)


_PHASE_COLORS = {"data": "tab:green", "forward": "tab:blue", "backward": "tab:orange", "optimizer": "tab:red"}


def plot_breakdown(results: list[Result], path: str | os.PathLike[str], title: str = "") -> int:
    """Writes stacked horizontal bars of the train family's per-phase medians (``extra["phases_ms"]``): one
    panel per case, one bar per implementation (torch, fusedtrain, and the no-dropout reference where it
    ran), segments data / forward / backward / optimizer, the iteration's median and fusedtrain's ratio at
    the end of each bar.

    Args:
        results: benchmark rows; only those with ``extra["phases_ms"]`` are drawn.
        path: where to write the PNG.
        title: the figure's title.

    Returns:
        The number of bars drawn.
    """
    rows = [r for r in results if "phases_ms" in r.extra]
    if not rows:
        raise ValueError("plot_breakdown: no row has a per-phase breakdown (extra['phases_ms']); nothing to plot")
    cases = list(dict.fromkeys(r.case for r in rows))
    plt = _pyplot()
    from matplotlib.patches import Patch

    per_case = [[r for r in rows if r.case == c] for c in cases]
    heights = [0.9 + 0.45 * len(group) for group in per_case]
    fig, axes = plt.subplots(len(cases), 1, figsize=(10, 0.9 + sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    phases = list(_PHASE_COLORS)
    for ax, case, group in zip(axes[:, 0], cases, per_case):
        ys = list(range(len(group)))
        lefts = [0.0] * len(group)
        for phase in phases:
            widths = [float(r.extra["phases_ms"].get(phase, 0.0)) for r in group]
            ax.barh(ys, widths, left=lefts, color=_PHASE_COLORS[phase], height=0.6)
            lefts = [a + b for a, b in zip(lefts, widths)]
        for y, r, end in zip(ys, group, lefts):
            text = f" median {r.median_ms:.1f} ms" if r.median_ms is not None else ""
            if r.vs_best_torch is not None:
                text += f"  ({r.vs_best_torch:.2f}× torch)"
            if r.extra.get("compile_s") is not None:
                text += f"  compile {r.extra['compile_s']:.0f} s"
            ax.text(end, y, text, va="center", fontsize=8)
        ax.set_yticks(ys, [r.impl for r in group], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(lefts) * 1.3)
        ax.set_title(case, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("ms per iteration (bars: the median of each phase; text: the median iteration)", fontsize=8)
    # above the first panel, right of its (left-aligned) title
    axes[0, 0].legend(handles=[Patch(color=_PHASE_COLORS[p], label=p) for p in phases], fontsize=8, ncol=4,
                      loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, borderaxespad=0.1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return len(rows)
