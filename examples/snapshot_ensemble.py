"""Snapshot ensemble vs a single model of the same training budget, on scikit-learn's digits with noisy labels.

Huang et al. (2017), "Snapshot Ensembles: Train 1, get M for free": train one network with a cyclic cosine
learning rate that restarts at a large alpha0, keep a snapshot at the end of each of M cycles, and average
the snapshots' softmax outputs at test time. The large restarts push the weights out of the minimum the
previous cycle converged to, so the snapshots disagree where the data are ambiguous, and averaging them
removes part of each one's errors.

Protocol (every seed run is reported, none dropped; the defaults were picked on pilot runs of this same
data, including the weight decay: 5e-4 and 2e-3 were both run with 8 seeds and both results are in the
docs/ensemble.md, as is the noise-free task on which the ensemble does not help):

* Data: scikit-learn's bundled digits (1797 8x8 images). For seed s: a random split into ``--train-size``
  (default 1000) training and the rest (797) test images; then ``--noise`` (default 20 %) of the TRAINING
  labels are replaced by a different class drawn uniformly (symmetric label noise). Test labels are clean.
  Noisy labels are the harder task on which one network, trained to the end, memorizes part of the noise.
* Network: MLP 64-256-256-10 with ReLU, the same initialization (seed s) for every run of seed s.
* Optimizer: ``fusedtrain.optim.SGD``, momentum 0.9, weight decay ``--weight-decay`` (2e-3), batch 32,
  ``--epochs`` (60) epochs = T steps, the same minibatch order for every run of seed s (a paired
  comparison).
* Snapshot ensemble: ``fusedtrain.ensemble.SnapshotEnsemble`` (``CyclicCosineLR``, Eq. 2 of the paper)
  with alpha0 = ``--lr`` (0.2) and M = ``--cycles`` (5) cycles of T/M steps; the prediction is the mean
  softmax of the M snapshots.
* Single model: the same network, initialization, batches and T steps with one cosine annealing
  (``CyclicCosineLR`` with one cycle) from each alpha0 in ``--single-lrs`` (0.05, 0.1, 0.2); predicts
  with its final weights. The compared single model is the alpha0 with the best MEAN test accuracy over
  the seeds, i.e. chosen on the test set, which favours the baseline. An EMA of its weights (decay 0.99,
  fused into the optimizer step) is reported too.
* Report: mean +- std over seeds of every row, the paired difference ensemble - single (mean +- std) and
  on how many seeds the ensemble wins / ties / loses. For reference, also the snapshots alone and the
  single model's best epoch picked on the test set (an upper bound on early stopping, which has no such
  oracle in practice).

The plot (``--out`` folder, ``snapshot_ensemble.png``) shows, averaged over the seeds, test accuracy per
epoch of the single model, of the cyclic run's current weights and of the ensemble of the snapshots taken
so far, and both learning-rate schedules.

    pip install scikit-learn matplotlib
    python examples/snapshot_ensemble.py [--seeds 8] [--cycles 5] [--noise 0.2] [--quick] [--out DIR]

About 1-2 minutes on 2 CPU cores (``--quick``: seconds). With ``--noise 0`` the task is easy, every
run converges to nearly the same solution, and the ensemble ties the single model (see docs/ensemble.md).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fusedtrain
from _report import add_out, parser, print_accuracies, pyplot
from fusedtrain.ensemble import EMA, CyclicCosineLR, SnapshotEnsemble

BATCH = 32
MOMENTUM = 0.9


def load_digits(seed: int, train_size: int, noise: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A seeded split of scikit-learn's digits; ``noise`` of the training labels flipped to another class."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:train_size], perm[train_size:]
    ytr = y[tr].clone()
    flip = torch.rand(len(tr), generator=g) < noise
    ytr[flip] = (ytr[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=g)) % 10
    return x[tr], ytr, x[te], y[te]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def accuracy(probs: Tensor, y: Tensor) -> float:
    return float((probs.argmax(-1) == y).float().mean())


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    acc = accuracy(model(x), y)
    model.train()
    return acc


def train(model: nn.Module, opt: torch.optim.Optimizer, data: tuple[Tensor, ...], epochs: int, seed: int,
          after_step: Any) -> list[float]:
    """Minibatch training; ``after_step()`` runs after every optimizer step. Returns the test accuracy
    after each epoch. The batch order depends on ``seed`` only, so paired runs see the same batches."""
    xtr, ytr, xte, yte = data
    g = torch.Generator().manual_seed(seed + 10_000)
    curve = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            after_step()
        curve.append(evaluate(model, xte, yte))
    return curve


def run_single(seed: int, lr: float, wd: float, data: tuple[Tensor, ...], epochs: int) -> dict[str, Any]:
    """One cosine annealing over the whole budget, with an EMA of the weights fused into the step."""
    steps = epochs * math.ceil(len(data[0]) / BATCH)
    model = make_model(seed)
    ema = EMA(model, decay=0.99, warmup=10)
    opt = fusedtrain.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=wd, ema=ema)
    sched = CyclicCosineLR(opt, steps, cycles=1)
    curve = train(model, opt, data, epochs, seed, after_step=sched.step)
    with ema.average_parameters():
        ema_acc = evaluate(model, data[2], data[3])
    return {"final": curve[-1], "ema": ema_acc, "best_epoch": max(curve), "curve": curve}


def run_snapshots(seed: int, lr: float, wd: float, cycles: int, data: tuple[Tensor, ...],
                  epochs: int) -> dict[str, Any]:
    """The cyclic schedule with a snapshot at each cycle end; accuracy of the ensemble so far per snapshot."""
    xte, yte = data[2], data[3]
    steps = epochs * math.ceil(len(data[0]) / BATCH)
    model = make_model(seed)
    opt = fusedtrain.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=wd)
    ens = SnapshotEnsemble(model, opt, total_steps=steps, cycles=cycles)
    lrs: list[float] = []
    snap_accs: list[float] = []
    ens_points: list[tuple[float, float]] = []  # (epoch, accuracy of the ensemble of the snapshots so far)
    steps_per_epoch = math.ceil(len(data[0]) / BATCH)

    def after_step() -> None:
        lrs.append(opt.param_groups[0]["lr"])
        if ens.step():
            snap_accs.append(evaluate(model, xte, yte))
            ens_points.append((ens.iteration / steps_per_epoch, accuracy(ens.predict(xte), yte)))

    curve = train(model, opt, data, epochs, seed, after_step)
    return {"ensemble": accuracy(ens.predict(xte), yte), "last": curve[-1], "snapshots": snap_accs,
            "curve": curve, "ens_points": ens_points, "lrs": lrs}


def plot(path: Path, singles: list[dict[str, Any]], snaps: list[dict[str, Any]], single_lr: float,
         lr: float, cycles: int, title: str) -> None:
    plt = pyplot("snapshot_ensemble.py")

    def mean_curve(curves: list[list[float]]) -> list[float]:
        return [100 * statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]

    epochs = len(singles[0]["curve"])
    ep = list(range(1, epochs + 1))
    fig, (ax, axlr) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    ax.plot(ep, mean_curve([r["curve"] for r in singles]), color="tab:blue",
            label=f"single model (one cosine, $\\alpha_0$={single_lr:g})")
    ax.plot(ep, mean_curve([r["curve"] for r in snaps]), color="tab:orange", alpha=0.8,
            label=f"cyclic run, current weights ($\\alpha_0$={lr:g}, M={cycles})")
    xs = [p[0] for p in snaps[0]["ens_points"]]
    ys = [100 * statistics.mean(r["ens_points"][i][1] for r in snaps) for i in range(len(xs))]
    ax.plot(xs, ys, "o-", color="tab:red", label="ensemble of the snapshots so far")
    ax.plot(xs, [100 * statistics.mean(r["snapshots"][i] for r in snaps) for i in range(len(xs))], "s",
            color="tab:orange", mfc="none", label="each snapshot alone")
    lo = min(min(mean_curve([r["curve"] for r in singles])[epochs // 4:]), min(ys)) - 3
    ax.set_ylim(max(lo, 0), 100)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test accuracy, % (mean of {len(snaps)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    steps = len(snaps[0]["lrs"])
    t = [(i + 1) * epochs / steps for i in range(steps)]
    axlr.plot(t, snaps[0]["lrs"], color="tab:orange", label="cyclic cosine (snapshot ensemble)")
    axlr.plot(t, [single_lr / 2 * (math.cos(math.pi * i / steps) + 1) for i in range(steps)], color="tab:blue",
              label="one cosine annealing (single model)")
    axlr.set_xlabel("epoch")
    axlr.set_ylabel("learning rate")
    axlr.grid(alpha=0.3)
    axlr.legend(loc="upper right", fontsize=8)
    axlr.set_title("schedules (same number of steps)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser(__doc__)
    ap.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1, all reported (default 8)")
    ap.add_argument("--cycles", type=int, default=5, help="M: cycles of the schedule and snapshots (default 5)")
    ap.add_argument("--epochs", type=int, default=60, help="training epochs of every run (default 60)")
    ap.add_argument("--lr", type=float, default=0.2, help="alpha0 of the cyclic schedule (default 0.2)")
    ap.add_argument("--single-lrs", default="0.05,0.1,0.2",
                    help="comma-separated alpha0 grid of the single model (default 0.05,0.1,0.2)")
    ap.add_argument("--weight-decay", type=float, default=2e-3, help="SGD weight decay of every run (default 2e-3)")
    ap.add_argument("--noise", type=float, default=0.2,
                    help="fraction of training labels flipped to another class (default 0.2)")
    ap.add_argument("--train-size", type=int, default=1000,
                    help="training images; the rest of the 1797 digits are the test set (default 1000)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the matrices are tiny, a second thread only adds waiting)")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 15 epochs, single-model lr = --lr only")
    add_out(ap, "snapshot_ensemble.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.single_lrs = min(args.seeds, 2), min(args.epochs, 15), str(args.lr)
    single_lrs = [float(s) for s in args.single_lrs.split(",")]
    torch.set_num_threads(args.threads)

    singles: dict[float, list[dict[str, Any]]] = {lr: [] for lr in single_lrs}
    snaps: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        data = load_digits(seed, args.train_size, args.noise)
        for lr in single_lrs:
            singles[lr].append(run_single(seed, lr, args.weight_decay, data, args.epochs))
        snaps.append(run_snapshots(seed, args.lr, args.weight_decay, args.cycles, data, args.epochs))
        print(f"seed {seed}: single " + ", ".join(f"lr {lr:g} {100 * singles[lr][-1]['final']:.1f} %"
                                                  for lr in single_lrs)
              + f"; snapshots {' '.join(f'{100 * a:.1f}' for a in snaps[-1]['snapshots'])}"
              f" -> ensemble {100 * snaps[-1]['ensemble']:.1f} %", flush=True)

    best_lr = max(single_lrs, key=lambda lr: statistics.mean(r["final"] for r in singles[lr]))
    best = singles[best_lr]
    n_test = 1797 - args.train_size
    runs = []
    for seed in range(args.seeds):
        row = {f"single model, lr {lr:g}": singles[lr][seed]["final"] for lr in single_lrs}
        row[f"single model (lr {best_lr:g}), EMA weights"] = best[seed]["ema"]
        row[f"single model (lr {best_lr:g}), best epoch*"] = best[seed]["best_epoch"]
        row["cyclic run, each snapshot alone (mean)"] = statistics.mean(snaps[seed]["snapshots"])
        row["cyclic run, last snapshot alone"] = snaps[seed]["last"]
        row[f"snapshot ensemble, M={args.cycles}"] = snaps[seed]["ensemble"]
        runs.append(row)
    title = (f"digits, {args.train_size} train images with {100 * args.noise:.0f} % flipped labels / {n_test} "
             f"clean test images, MLP, SGD momentum, {args.epochs} epochs, {args.seeds} seeds: test accuracy")
    print_accuracies(title, runs)

    diffs = [s["ensemble"] - b["final"] for s, b in zip(snaps, best)]
    # a tie: the same number of correctly classified test images
    wins = sum(d * n_test > 0.5 for d in diffs)
    losses = sum(d * n_test < -0.5 for d in diffs)
    spread = f" ± {100 * statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
    print(f"paired, same seed, split, init and batches: ensemble - single (lr {best_lr:g}) = "
          f"{100 * statistics.mean(diffs):+.1f}{spread} points; ensemble wins {wins}, ties "
          f"{len(diffs) - wins - losses}, loses {losses} of {len(diffs)} seeds")
    print("* best epoch picked on the test set itself: an upper bound on early stopping, not a fair model")

    path = args.out / "snapshot_ensemble.png"
    plot(path, best, snaps, best_lr, args.lr, args.cycles,
         f"digits, {100 * args.noise:.0f} % label noise, {args.train_size} train images")
    print(f"wrote {path}")
    return {"single": statistics.mean(r["final"] for r in best),
            "ensemble": statistics.mean(s["ensemble"] for s in snaps), "wins": wins, "losses": losses,
            "best_lr": best_lr}


if __name__ == "__main__":
    main()
