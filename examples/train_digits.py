"""A small CNN on scikit-learn's digits: the optimizers' loss curves, and what fusedtrain's dropout and
augmentation change.

Every run trains the same network from the same initialization on the same 1000 training images (the
other 797 are the test set), with the same batch order, for the same number of epochs:

- the six classic optimizers (SGD, Momentum, Nesterov, Adagrad, RMSprop, Adam; ``fusedtrain.optim``),
  each at a learning rate that suits it (below);
- Adam again with ``fusedtrain.nn.Dropout(0.3)`` before the classifier (a dropout that stores no mask),
- and Adam with dropout plus ``fusedtrain.augment.BatchAugment`` on every training batch: a random
  resized crop (scale 0.6-1, per image), brightness and contrast jitter, normalization — one fused op per
  batch on the uint8 images (no horizontal flip: a flipped digit is another symbol).

It prints the final training loss and test accuracy of each run and writes ``train_digits.png``: training
loss per epoch (left), test accuracy per epoch (right).

    python examples/train_digits.py [--epochs 30] [--seed 0] [--quick] [--out DIR]

About a minute on 2 CPU cores (``--quick``: seconds). Needs scikit-learn (data) and matplotlib (plot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import fusedtrain
from _report import add_out, parser, pyplot

# (label, optimizer class, keyword arguments, dropout p, augment)
RUNS: list[tuple[str, str, dict[str, Any], float, bool]] = [
    ("SGD", "SGD", dict(lr=0.05), 0.0, False),
    ("Momentum", "SGD", dict(lr=0.02, momentum=0.9), 0.0, False),
    ("Nesterov", "SGD", dict(lr=0.02, momentum=0.9, nesterov=True), 0.0, False),
    ("Adagrad", "Adagrad", dict(lr=0.02), 0.0, False),
    ("RMSprop", "RMSprop", dict(lr=1e-3), 0.0, False),
    ("Adam", "Adam", dict(lr=1e-3), 0.0, False),
    ("Adam + dropout", "Adam", dict(lr=1e-3), 0.3, False),
    ("Adam + dropout + augment", "Adam", dict(lr=1e-3), 0.3, True),
]


def load_digits(seed: int, train_size: int) -> tuple[torch.Tensor, ...]:
    """uint8 images (N, 1, 8, 8) scaled from the 0-16 range to 0-255, and labels; a seeded split."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = (torch.tensor(data.images, dtype=torch.float32) * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:train_size], perm[train_size:]
    return x[tr], y[tr], x[te], y[te]


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0 - 0.5) / 0.5


def make_model(dropout: float) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), fusedtrain.nn.Dropout(dropout), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def train(label: str, cls: str, kw: dict[str, Any], dropout: float, augment: bool, data: tuple[torch.Tensor, ...],
          epochs: int, seed: int, batch: int = 32) -> dict[str, list[float]]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = make_model(dropout)
    opt = getattr(fusedtrain.optim, cls)(model.parameters(), **kw)
    aug = fusedtrain.augment.BatchAugment(8, scale=(0.6, 1.0), ratio=(0.8, 1.25), hflip=0.0, brightness=0.3,
                                          contrast=0.3, mean=[0.5], std=[0.5]) if augment else None
    order = torch.Generator().manual_seed(seed + 1)  # the same batches for every run
    loss_fn = nn.CrossEntropyLoss()
    history: dict[str, list[float]] = {"loss": [], "acc": []}
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        perm = torch.randperm(len(xtr), generator=order)
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            x = aug(xtr[idx]) if aug is not None else normalize(xtr[idx])
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), ytr[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        model.eval()
        with torch.no_grad():
            acc = float((model(normalize(xte)).argmax(1) == yte).float().mean())
        history["loss"].append(total / count)
        history["acc"].append(acc)
    print(f"  {label:28s} {history['acc'][-1] * 100:5.1f} %   final training loss {history['loss'][-1]:.4f}")
    return history


def plot(results: dict[str, dict[str, list[float]]], path: Path) -> None:
    plt = pyplot("train_digits.py")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, h in results.items():
        epochs = range(1, len(h["loss"]) + 1)
        style = "--" if "dropout" in label else "-"
        ax1.plot(epochs, h["loss"], style, label=label)
        ax2.plot(epochs, [a * 100 for a in h["acc"]], style, label=label)
    ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss (log scale)")
    ax1.set_title("Training loss")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("Test accuracy (797 held-out digits)")
    ax2.set_ylim(80, 100)
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle("Small CNN on scikit-learn digits: fusedtrain optimizers, dropout and augmentation")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    ap = parser(__doc__)
    ap.add_argument("--epochs", type=int, default=30, help="training epochs of every run (default 30)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the split, the initialization and the batch order (default 0)")
    ap.add_argument("--train-size", type=int, default=1000,
                    help="training images; the rest of the 1797 digits are the test set (default 1000)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the network is tiny)")
    ap.add_argument("--quick", action="store_true", help="3 epochs (a smoke test, not the numbers of docs/optim.md)")
    add_out(ap, "train_digits.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = 3 if args.quick else args.epochs
    data = load_digits(args.seed, args.train_size)
    print(f"digits: {len(data[0])} training / {len(data[2])} test images, {epochs} epochs, seed {args.seed}")
    print("  run                          test accuracy")
    results = {label: train(label, cls, kw, p, aug, data, epochs, args.seed) for label, cls, kw, p, aug in RUNS}
    plot(results, args.out / "train_digits.png")
    return results


if __name__ == "__main__":
    main()
