"""Trajectories of SGD, Momentum, Nesterov, Adagrad, RMSprop and Adam on three 2-D test surfaces.

The classic picture of why momentum and adaptive learning rates help, drawn with fusedtrain's optimizers
(every path is recomputed with torch.optim and the largest difference is printed). On each surface SGD,
Momentum and Nesterov share one learning rate and Adagrad, RMSprop and Adam share another, so within a
family the picture shows the effect of momentum or of the adaptive rule alone. What the default run shows:

* saddle, f = x*y, started almost on the attracting diagonal x = y: the gradient leads into the saddle
  point (0, 0), and the escape direction x = -y starts with a tiny gradient component that SGD only
  multiplies by (1 + lr) per step (f < -1 after 109 steps). Momentum and Nesterov accumulate it and leave
  three times sooner (32 and 29 steps). The adaptive methods take steps of about lr per coordinate
  whatever the gradient's size: RMSprop leaves early (42; without bias correction its first steps are
  about 3 lr, as its average of squared gradients starts at (1 - alpha) g^2), Adam later (89), and
  Adagrad's ever-growing sum of squared gradients shrinks its steps until it stalls near the saddle.
* ravine, f = x^2/200 + y^2/2: curvatures 0.01 and 1 (condition number 100). The steep direction bounds
  the learning rate (SGD diverges above 2), so SGD drops to the valley floor and crawls along it (still
  at x = -0.80 after 200 steps). With the same rate momentum swings across the valley (the heavy ball
  overshoots in the steep direction) but accumulates the small, consistent gradient along it and reaches
  the minimum. The adaptive methods divide each coordinate by its own gradient scale and head straight
  for it, except Adagrad, whose effective rate has decayed long before it arrives.
* local minimum, f = (x^2 - 1)^2 + x/2 + y^2/2: a tilted double well, shallow minimum near x = +0.93,
  global one near x = -1.06, started on the side of the shallow one. SGD and the adaptive methods settle
  in the nearest (local) minimum; momentum carries the heavy ball over the barrier into the global one.
  This depends on the step sizes: with lr 0.05 Momentum stays in the shallow well and Adam at lr 0.3
  crosses; the picture is an illustration, not a law.

    pip install matplotlib
    python examples/optimizer_paths.py [--steps 200] [--out DIR] [--quick]

Prints, per surface and optimizer, the learning rate, the final point and its loss, and writes
``optimizer_paths.png`` to ``--out``. Runs in a few seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import fusedtrain
from _report import add_out, parser, pyplot


@dataclass(frozen=True)
class Surface:
    name: str
    formula: str
    f: Callable[[Tensor, Tensor], Tensor]
    start: tuple[float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    lr_sgd: float  # SGD, Momentum and Nesterov share it: the difference is momentum alone
    lr_adaptive: float  # Adagrad, RMSprop and Adam share it
    minima: tuple[tuple[float, float], ...] = ()
    escape: float | None = None  # report the first step with f below this (the saddle)

    def lr(self, opt_name: str) -> float:
        return self.lr_sgd if OPTIMIZERS[opt_name][0] == "SGD" else self.lr_adaptive


# name -> (class in fusedtrain.optim / torch.optim, fixed keyword arguments)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "SGD": ("SGD", {}),
    "Momentum": ("SGD", {"momentum": 0.9}),
    "Nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "Adagrad": ("Adagrad", {}),
    "RMSprop": ("RMSprop", {"alpha": 0.9}),
    "Adam": ("Adam", {}),
}

SURFACES = [
    Surface("saddle", "f = x·y", lambda x, y: x * y, start=(1.0, 0.99), xlim=(-1.0, 2.5), ylim=(-2.5, 1.5),
            lr_sgd=0.05, lr_adaptive=0.05, escape=-1.0),
    Surface("ravine", "f = x²/200 + y²/2", lambda x, y: x * x / 200 + y * y / 2, start=(-9.0, 2.0),
            xlim=(-10.0, 2.0), ylim=(-2.5, 2.5), lr_sgd=1.2, lr_adaptive=0.1, minima=((0.0, 0.0),)),
    Surface("local minimum", "f = (x²−1)² + x/2 + y²/2", lambda x, y: (x * x - 1) ** 2 + x / 2 + y * y / 2,
            start=(1.8, 1.5), xlim=(-2.0, 2.0), ylim=(-1.6, 1.8), lr_sgd=0.02, lr_adaptive=0.1,
            minima=((-1.0574, 0.0), (0.9304, 0.0))),
]
BOUND = 10.0  # a path stops when |x| or |y| exceeds it (the saddle is unbounded below)


def path(surface: Surface, opt_name: str, steps: int, lib: Any = fusedtrain.optim) -> Tensor:
    """The points visited by ``opt_name`` from the surface's start in float64, shape (k + 1, 2) with
    k = ``steps``, or fewer when the path leaves the box ``|x|, |y| <= BOUND``."""
    cls_name, kwargs = OPTIMIZERS[opt_name]
    p = torch.tensor(surface.start, dtype=torch.float64, requires_grad=True)
    opt = getattr(lib, cls_name)([p], lr=surface.lr(opt_name), **kwargs)
    points = [p.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        surface.f(p[0], p[1]).backward()
        opt.step()
        points.append(p.detach().clone())
        if float(p.detach().abs().max()) > BOUND:
            break
    return torch.stack(points)


# Okabe-Ito colours (distinct, also for colour-blind readers); the SGD family solid, the adaptive family dashed.
STYLES: dict[str, tuple[str, str]] = {
    "SGD": ("#000000", "-"), "Momentum": ("#0072B2", "-"), "Nesterov": ("#56B4E9", "-"),
    "Adagrad": ("#009E73", "--"), "RMSprop": ("#E69F00", "--"), "Adam": ("#D55E00", "--"),
}


def plot(out: Path, paths: dict[str, dict[str, Tensor]], steps: int) -> None:
    plt = pyplot("optimizer_paths.py")
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(SURFACES), figsize=(16, 5.6))
    for ax, s in zip(axes, SURFACES):
        xs = torch.linspace(*s.xlim, 200, dtype=torch.float64)
        ys = torch.linspace(*s.ylim, 200, dtype=torch.float64)
        gx, gy = torch.meshgrid(xs, ys, indexing="xy")
        z = s.f(gx, gy)
        ax.contour(gx.numpy(), gy.numpy(), z.numpy(), levels=15, cmap="Greys_r", linewidths=0.6, alpha=0.5)
        for name, pts in paths[s.name].items():
            color, style = STYLES[name]
            ax.plot(pts[:, 0].numpy(), pts[:, 1].numpy(), style, color=color, lw=1.6)
            if float(pts[-1].abs().max()) <= BOUND:
                ax.plot(pts[-1, 0], pts[-1, 1], "o", color=color, mec="white", mew=0.8, ms=7, zorder=6)
        for m in s.minima:
            ax.plot(*m, "*", color="gold", ms=15, mec="black", zorder=5)
        ax.plot(*s.start, "s", color="white", mec="black", ms=8, zorder=5)
        ax.set_xlim(*s.xlim)
        ax.set_ylim(*s.ylim)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(f"{s.name}: {s.formula}\nlr {s.lr_sgd:g} (solid: SGD family), {s.lr_adaptive:g} "
                     "(dashed: adaptive)", fontsize=11)
    key = [Line2D([], [], color=c, ls=ls, lw=2, label=name) for name, (c, ls) in STYLES.items()]
    key += [Line2D([], [], ls="", marker="s", color="white", mec="black", ms=8, label="start"),
            Line2D([], [], ls="", marker="o", color="grey", mec="white", ms=7, label=f"after {steps} steps"),
            Line2D([], [], ls="", marker="*", color="gold", mec="black", ms=14, label="minimum")]
    fig.legend(handles=key, loc="lower center", ncol=len(key), fontsize=11, frameon=False)
    fig.suptitle("Paths of six fusedtrain optimizers from the same start on three test surfaces (grey: contours "
                 "of f)", fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "optimizer_paths.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, tuple[float, float, float]]]:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per path (default 200)")
    ap.add_argument("--quick", action="store_true", help="60 steps")
    add_out(ap, "optimizer_paths.png")
    args = ap.parse_args(argv)
    steps = min(args.steps, 60) if args.quick else args.steps

    paths: dict[str, dict[str, Tensor]] = {}
    final: dict[str, dict[str, tuple[float, float, float]]] = {}
    worst = 0.0
    for s in SURFACES:
        paths[s.name], final[s.name] = {}, {}
        print(f"{s.name}: {s.formula}, start {s.start}, {steps} steps")
        for name in OPTIMIZERS:
            pts = path(s, name, steps)
            ref = path(s, name, steps, lib=torch.optim)
            worst = max(worst, float((pts - ref).abs().max()) if pts.shape == ref.shape else float("inf"))
            x, y = float(pts[-1, 0]), float(pts[-1, 1])
            loss = float(s.f(pts[-1, 0], pts[-1, 1]))
            paths[s.name][name], final[s.name][name] = pts, (x, y, loss)
            left = float(pts[-1].abs().max()) > BOUND
            where = f"left |x|, |y| <= {BOUND:g} after {len(pts) - 1:3d} steps at" if left else "final"
            line = f"  {name:9s} lr {s.lr(name):<5g} {where} ({x:+8.4f}, {y:+8.4f}), f = {loss:+.5g}"
            if s.escape is not None:
                below = (s.f(pts[:, 0], pts[:, 1]) < s.escape).nonzero()
                line += f"; f < {s.escape:g} " + (f"from step {int(below[0])}" if len(below) else "never")
            print(line)
    print(f"largest difference from torch.optim's path over all points: {worst:.1e}")
    plot(args.out, paths, steps)
    print(f"wrote {args.out / 'optimizer_paths.png'}")
    return final


if __name__ == "__main__":
    main()
