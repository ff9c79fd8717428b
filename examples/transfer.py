"""Transfer learning on scikit-learn's digits: pretrain on 0-4, fine-tune on 5-9 with little data.

A small CNN is trained on all training images of digits 0-4. For digits 5-9 only `--shots` labelled
images per class are available; each fine-tuning strategy of `fusedtrain.transfer.finetune` starts from
the pretrained weights, trains a fixed number of steps, and is scored on the held-out images of 5-9,
next to the same network trained from scratch on the few images.

    pip install scikit-learn
    python examples/transfer.py [--shots 10] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import fusedtrain
from _report import print_accuracies
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


def run(seed: int, shots: int) -> dict[str, float]:
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
    train(pretrained, pretrained.parameters(), xs, ys, steps=300, lr=3e-3, seed=seed)

    results = {}
    torch.manual_seed(seed)
    scratch = cnn(5)
    train(scratch, scratch.parameters(), xf, yf, steps=300, lr=3e-3, seed=seed)
    results["from scratch (few images)"] = accuracy(scratch, xt, yt)
    for data, sim in (("small", "similar"), ("small", "different"), ("large", "similar"), ("large", "different")):
        model = copy.deepcopy(pretrained)
        torch.manual_seed(seed)
        replace_head(model, 5)
        model, groups = finetune(model, data, sim, lr=3e-3, num_classes=5 if sim == "different" and data == "small"
                                 else None, example_input=xf[:2])
        train(model, groups, xf, yf, steps=300, lr=3e-3, seed=seed)
        results[f"finetune({data}, {sim})"] = accuracy(model, xt, yt)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shots", type=int, default=10, help="labelled images per new class")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    runs = [run(s, args.shots) for s in range(args.seeds)]
    print_accuracies(f"digits: CNN pretrained on 0-4, {args.shots} images per class of 5-9, {args.seeds} seeds: "
                     "test accuracy on the other images of 5-9", runs)


if __name__ == "__main__":
    main()
