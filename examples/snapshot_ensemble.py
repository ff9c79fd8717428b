"""Snapshot ensemble vs a single model with the same training budget, on scikit-learn's digits.

Huang et al. (2017): train one network with a cyclic cosine learning rate, keep a snapshot at the end of
each of M cycles, and average the snapshots' softmax outputs at test time. The baseline trains the same
network for the same number of steps with one cosine annealing cycle and predicts with its final
weights; an EMA of the baseline's weights is shown too.

    pip install scikit-learn
    python examples/snapshot_ensemble.py [--cycles 5] [--epochs 60] [--seeds 3] [--quick]

Runs on the CPU in well under a minute.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fusedtrain
from _report import print_accuracies
from fusedtrain.ensemble import EMA, SnapshotEnsemble


def load_digits(seed: int, train_size: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    # a small training set makes the gap between one model and an ensemble visible
    tr, te = perm[:train_size], perm[train_size:]
    return x[tr], y[tr], x[te], y[te]


def make_model(seed: int, dropout: float, arch: str = "mlp") -> nn.Module:
    torch.manual_seed(seed)
    if arch == "cnn":
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Dropout(dropout), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(dropout), nn.Linear(256, 256), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(256, 10))


def batches(x: torch.Tensor, y: torch.Tensor, bs: int, g: torch.Generator):
    perm = torch.randperm(len(x), generator=g)
    for i in range(0, len(x), bs):
        idx = perm[i:i + bs]
        yield x[idx], y[idx]


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int, bs: int,
          seed: int, after_step) -> None:
    """Minibatch training; ``after_step()`` runs after every optimizer step (scheduler, snapshots)."""
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for xb, yb in batches(x, y, bs, g):
            model.train()
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
            after_step()


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((probs.argmax(-1) == y).float().mean())


def run(seed: int, cycles: int, epochs: int, lr: float, dropout: float, train_size: int, arch: str = "mlp",
        bs: int = 50) -> dict[str, float]:
    xtr, ytr, xte, yte = load_digits(seed, train_size)
    steps_per_epoch = (len(xtr) + bs - 1) // bs
    total = epochs * steps_per_epoch

    # single model: one cosine annealing cycle over the whole budget, plus an EMA of its weights
    model = make_model(seed, dropout, arch)
    opt = fusedtrain.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    ema = EMA(model, decay=0.99, warmup=10)
    opt.ema = ema
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    train(model, opt, xtr, ytr, epochs, bs, seed, after_step=sched.step)
    model.eval()
    with torch.no_grad():
        single = accuracy(model(xte), yte)
        with ema.average_parameters():
            ema_acc = accuracy(model(xte), yte)

    # snapshot ensemble: same network, same budget, M cosine cycles
    model = make_model(seed, dropout, arch)
    opt = fusedtrain.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    ens = SnapshotEnsemble(model, opt, total_steps=total, cycles=cycles)
    train(model, opt, xtr, ytr, epochs, bs, seed, after_step=ens.step)
    model.eval()
    with torch.no_grad():
        last_snapshot = accuracy(model(xte), yte)
    snapshot = accuracy(ens.predict(xte), yte)
    with torch.no_grad():
        last3 = accuracy(sum(torch.softmax(m(xte), -1) for m in ens.models()[-3:]), yte)
    return {"single model (cosine)": single, "single model, EMA weights": ema_acc,
            "last snapshot alone": last_snapshot, f"snapshot ensemble (all M={cycles})": snapshot,
            "snapshot ensemble (last 3)": last3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--train-size", type=int, default=500)
    ap.add_argument("--arch", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 20 epochs")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs = 2, 20
    runs = [run(seed, args.cycles, args.epochs, args.lr, args.dropout, args.train_size, args.arch)
            for seed in range(args.seeds)]
    title = (f"digits ({args.train_size} train / {1797 - args.train_size} test images), {args.arch.upper()} "
             f"(dropout {args.dropout}), SGD momentum lr {args.lr}, {args.epochs} epochs, {args.seeds} seeds: "
             "test accuracy")
    print_accuracies(title, runs)


if __name__ == "__main__":
    main()
