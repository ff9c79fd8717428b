"""fusedtrain's 8-bit AdamW against bitsandbytes' AdamW8bit (its CPU build) and float32 AdamW: the same MLP
on sklearn's digits, same init and batches; prints final losses and how far each 8-bit run's parameters drift
from the float32 run (a report, not a gate; benchmarks/NOTES.md, "8-bit optimizer states").

    PYTHONPATH=python:/path/to/bitsandbytes python benchmarks/compare_bnb_8bit.py --steps 300
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import fusedtrain
import torch
from sklearn.datasets import load_digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float32) / 16.0
    y = torch.tensor(y_np)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 10))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, x.shape[0], (128,), generator=g) for _ in range(args.steps)]
    makers: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
        "torch AdamW (float32 states)": lambda m: torch.optim.AdamW(m.parameters(), lr=args.lr),
        "fusedtrain AdamW (32-bit)": lambda m: fusedtrain.optim.AdamW(m.parameters(), lr=args.lr),
        "fusedtrain AdamW8bit": lambda m: fusedtrain.optim.AdamW8bit(m.parameters(), lr=args.lr),
    }
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]

        makers["bitsandbytes AdamW8bit"] = lambda m: bnb.optim.AdamW8bit(m.parameters(), lr=args.lr)
    except ImportError:
        print("bitsandbytes is not importable: its row is left out")
    models = {}
    for name, make in makers.items():
        model = copy.deepcopy(base)
        opt = make(model)
        for idx in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(model(x), y))
            acc = float((model(x).argmax(1) == y).float().mean())
        models[name] = model
        print(f"{name:32s} final loss {loss:.5f}  accuracy {acc:.4f}")
    ref = models["torch AdamW (float32 states)"]
    for name, model in models.items():
        drift = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), ref.parameters()))
        print(f"{name:32s} max |param - float32 run| {drift:.2e}")


if __name__ == "__main__":
    main()
