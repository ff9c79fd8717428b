"""Training curves of AdamW with float32, 8-bit and 4-bit states (and bitsandbytes' AdamW8bit when importable) on
one run: the digits MLP of tests/test_optim_8bit.py (64-256-256-10, batches of 128, lr 2e-3, weight decay 1e-2),
same initialization and batches for every optimizer. Prints the full-data loss every 25 steps and writes the
curves as a PNG (README "8-bit states").

    PYTHONPATH=python python benchmarks/convergence_lowbit.py --steps 300 --png docs/images/lowbit-convergence.png
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import fusedtrain
import torch
from torch import nn


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--png", default=None, help="write the curves here (needs matplotlib)")
    args = ap.parse_args()
    x, y = _digits()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, x.shape[0], (128,), generator=g) for _ in range(args.steps)]
    kw = dict(lr=2e-3, weight_decay=1e-2)
    runs: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        "fusedtrain float32 states": lambda m: fusedtrain.optim.AdamW(m.parameters(), **kw),
        "fusedtrain 8-bit states": lambda m: fusedtrain.optim.AdamW(m.parameters(), **kw, state_bits=8),
        "fusedtrain 4-bit states": lambda m: fusedtrain.optim.AdamW(m.parameters(), **kw, state_bits=4),
    }
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]

        runs["bitsandbytes AdamW8bit"] = lambda m: bnb.optim.AdamW8bit(m.parameters(), **kw)
    except Exception:  # noqa: BLE001 - not installed, or no backend for this machine
        pass
    every = 5
    curves: dict[str, list[float]] = {}
    final_params: dict[str, list[torch.Tensor]] = {}
    for name, make in runs.items():
        model = copy.deepcopy(base)
        try:
            opt = make(model)
        except ValueError as exc:  # a build without these states
            print(f"{name}: skipped ({exc})")
            continue
        losses = []
        for step, idx in enumerate(batches):
            if step % every == 0:
                with torch.no_grad():
                    losses.append(float(nn.functional.cross_entropy(model(x), y)))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            losses.append(float(nn.functional.cross_entropy(model(x), y)))
        curves[name] = losses
        final_params[name] = [p.detach().clone() for p in model.parameters()]
    ref = "fusedtrain float32 states"
    print(f"{'optimizer':28s} " + " ".join(f"{s:>8d}" for s in range(0, args.steps + 1, 25)) +
          "   final vs float32   max |param - float32 run|")
    for name, losses in curves.items():
        picked = [losses[s // every] for s in range(0, args.steps + 1, 25)]
        gap = (losses[-1] - curves[ref][-1]) / curves[ref][-1]
        dist = max(float((a - b).abs().max()) for a, b in zip(final_params[name], final_params[ref]))
        print(f"{name:28s} " + " ".join(f"{v:8.4f}" for v in picked) + f"   {gap:+8.1%}        {dist:.3f}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        steps = [min(i * every, args.steps) for i in range(len(curves[ref]))]
        for name, losses in curves.items():
            ax.plot(steps, losses, label=name, linewidth=1.4)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy on the whole digits set")
        ax.set_title(f"AdamW states: float32 vs low-bit (digits MLP, torch {torch.__version__.split('+')[0]})",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
