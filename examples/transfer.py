"""Transfer learning on scikit-learn's digits: pretrain on 0-4, fine-tune on 5-9 with little data.

A small CNN is trained on all training images of digits 0-4. For digits 5-9 only `--shots` labelled
images per class are available; each fine-tuning strategy of `fusedtrain.transfer.finetune` starts from
the pretrained weights, trains a fixed number of steps, and is scored on the held-out images of 5-9,
next to the same network trained from scratch on the few images.

    pip install scikit-learn matplotlib
    python examples/transfer.py [--shots 10] [--seeds 3] [--steps 300] [--quick] [--out DIR]

Prints the accuracy of each strategy (mean and spread over the seeds) and writes ``transfer.png`` (a bar
chart of the same numbers) to ``--out``.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch
from torch import nn

import fusedtrain
from _report import add_out, parser, print_accuracies, pyplot
from fusedtrain.transfer import finetune, replace_head


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def cnn(classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes))


def train(model: nn.Module, param_groups, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
          seed: int) -> None:
    opt = fusedtrain.optim.Adam(param_groups, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(64, len(x)),), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def run(seed: int, shots: int, steps: int = 300) -> dict[str, float]:
    x, y = digits()
    g = torch.Generator().manual_seed(seed)
    src = (y < 5).nonzero().squeeze(1)
    tgt = (y >= 5).nonzero().squeeze(1)
    tgt = tgt[torch.randperm(len(tgt), generator=g)]
    few = torch.cat([tgt[y[tgt] == c][:shots] for c in range(5, 10)])
    test = torch.tensor([i for i in tgt.tolist() if i not in set(few.tolist())])
    xs, ys = x[src], y[src]
    xf, yf, xt, yt = x[few], y[few] - 5, x[test], y[test] - 5

    torch.manual_seed(seed)
    pretrained = cnn(5)
    train(pretrained, pretrained.parameters(), xs, ys, steps=steps, lr=3e-3, seed=seed)

    results = {}
    torch.manual_seed(seed)
    scratch = cnn(5)
    train(scratch, scratch.parameters(), xf, yf, steps=steps, lr=3e-3, seed=seed)
    results["from scratch (few images)"] = accuracy(scratch, xt, yt)
    for data, sim in (("small", "similar"), ("small", "different"), ("large", "similar"), ("large", "different")):
        model = copy.deepcopy(pretrained)
        torch.manual_seed(seed)
        replace_head(model, 5)
        model, groups = finetune(model, data, sim, lr=3e-3, num_classes=5 if sim == "different" and data == "small"
                                 else None, example_input=xf[:2])
        train(model, groups, xf, yf, steps=steps, lr=3e-3, seed=seed)
        results[f"finetune({data}, {sim})"] = accuracy(model, xt, yt)
    return results


def plot(path: Path, runs: list[dict[str, float]], title: str) -> None:
    plt = pyplot("transfer.py")

    names = list(runs[0])
    means = [100 * statistics.mean(r[k] for r in runs) for k in names]
    errs = [100 * statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0 for k in names]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    colors = ["tab:gray"] + ["tab:blue"] * (len(names) - 1)
    ax.barh(range(len(names)), means, xerr=errs, color=colors, capsize=3)
    for i, (m, e) in enumerate(zip(means, errs)):
        ax.text(m + e + 1.5, i, f"{m:.1f} %", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel(f"test accuracy, % (mean ± std over {len(runs)} seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = parser(__doc__)
    ap.add_argument("--shots", type=int, default=10, help="labelled images per new class (default 10)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, all reported (default 3)")
    ap.add_argument("--steps", type=int, default=300, help="Adam steps of each training run (default 300)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the tensors are tiny, a second thread only adds waiting)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 60 steps")
    add_out(ap, "transfer.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, min(args.steps, 60)
    torch.set_num_threads(args.threads)
    runs = [run(s, args.shots, args.steps) for s in range(args.seeds)]
    title = (f"digits: CNN pretrained on 0-4, {args.shots} images per class of 5-9, {args.seeds} seeds: "
             "test accuracy on the other images of 5-9")
    print_accuracies(title, runs)
    path = args.out / "transfer.png"
    plot(path, runs, f"CNN pretrained on digits 0-4, fine-tuned on {args.shots} images per class of 5-9")
    print(f"wrote {path}")
    return runs


if __name__ == "__main__":
    main()
