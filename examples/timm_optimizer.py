"""fusedtrain optimizers with timm: its parameter groups, layer-wise learning-rate decay, its schedulers.

A small Vision Transformer from timm (built from arguments, no pretrained weights, nothing downloaded)
learns a synthetic task: which colour tint (red, green, blue or grey) lies over a 32x32 noise image. Three
ways to build the optimizer, each trained the same number of steps from the same initialization:

1. ``fusedtrain.optim.create_optimizer(model, "adamw", lr=..., weight_decay=...)``: fusedtrain's factory,
   with timm's rule for weight decay (none on biases, norms and the names in ``model.no_weight_decay()``,
   here the position embedding and the class token).
2. ``fusedtrain.optim.AdamW(timm.optim.param_groups_weight_decay(model, wd, model.no_weight_decay()))``:
   timm's groups handed to fusedtrain's class: the same groups as 1.
3. ``timm.optim.param_groups_layer_decay(model, wd, layer_decay=0.75)``: one group per depth with an
   ``lr_scale`` (0.75 per block from the head down), which timm's schedulers apply: here
   ``timm.scheduler.CosineLRScheduler`` with warmup, stepped every update with ``step_update``.

    pip install timm
    python examples/timm_optimizer.py [--steps 150] [--quick]

Prints the groups each way makes, the training loss at the start and end, and the test accuracy.
Seconds on a CPU (``--quick``: a few).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import fusedtrain
from _report import parser

SIZE, BATCH = 32, 32


# The tint of each class: red, green, blue, grey.
TINTS = torch.tensor([[0.25, 0.0, 0.0], [0.0, 0.25, 0.0], [0.0, 0.0, 0.25], [0.1, 0.1, 0.1]])


def tinted_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images (3, 32, 32) in [0, 0.75] with their class's tint added, and the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.75 + TINTS[y][:, :, None, None], y


def tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=4)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, sched: Any = None) -> tuple[float, float]:
    x, y = tinted_images(BATCH * 16, seed=1)
    g = torch.Generator().manual_seed(3)
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step_update(step + 1)
        losses.append(float(loss.detach()))
    k = max(1, steps // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def accuracy(model: nn.Module) -> float:
    x, y = tinted_images(512, seed=2)
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def describe(opt: torch.optim.Optimizer) -> str:
    parts = []
    for g in opt.param_groups:
        scale = f", lr x{g['lr_scale']:.3f}" if "lr_scale" in g else ""
        parts.append(f"{len(g['params'])} tensors wd {g['weight_decay']:g}{scale}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of each run (default 150)")
    ap.add_argument("--quick", action="store_true", help="25 steps (a smoke test)")
    args = ap.parse_args(argv)
    try:
        from timm.optim import param_groups_layer_decay, param_groups_weight_decay
        from timm.scheduler import CosineLRScheduler
    except ImportError:
        raise SystemExit("timm_optimizer.py needs timm: pip install timm")
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting
    steps = 25 if args.quick else args.steps
    lr, wd = 2e-3, 0.05
    report: dict[str, Any] = {}

    model = tiny_vit()
    opt = fusedtrain.optim.create_optimizer(model, "adamw", lr=lr, weight_decay=wd)
    print(f"1. create_optimizer(model, 'adamw'): {describe(opt)}")
    first, last = train(model, opt, steps)
    report["create_optimizer"] = (first, last, accuracy(model))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"   loss {first:.3f} -> {last:.3f}, test accuracy {report['create_optimizer'][2] * 100:.1f} %")

    model = tiny_vit()
    opt = fusedtrain.optim.AdamW(param_groups_weight_decay(model, wd, no_weight_decay_list=model.no_weight_decay()),
                                 lr=lr)
    print(f"2. AdamW(timm param_groups_weight_decay): {describe(opt)}")
    first, last = train(model, opt, steps)
    report["timm_groups"] = (first, last, accuracy(model))
    same = all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    report["same_as_create_optimizer"] = same
    print(f"   loss {first:.3f} -> {last:.3f}, test accuracy {report['timm_groups'][2] * 100:.1f} %; the same groups "
          f"as 1 (in another order), weights bit-identical to 1: {'yes' if same else 'NO'}")

    model = tiny_vit()
    groups = param_groups_layer_decay(model, weight_decay=wd, layer_decay=0.75,
                                      no_weight_decay_list=model.no_weight_decay())
    opt = fusedtrain.optim.AdamW(groups, lr=lr)
    sched = CosineLRScheduler(opt, t_initial=steps, warmup_t=max(1, steps // 10), warmup_lr_init=lr / 10,
                              t_in_epochs=False)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    print(f"3. AdamW(timm param_groups_layer_decay(layer_decay=0.75)) + CosineLRScheduler: {len(groups)} groups, "
          f"lr from {lrs[0]:.2e} to {lrs[-1]:.2e} at the first step")
    first, last = train(model, opt, steps, sched)
    report["layer_decay"] = (first, last, accuracy(model))
    print(f"   loss {first:.3f} -> {last:.3f}, test accuracy {report['layer_decay'][2] * 100:.1f} %")
    return report


if __name__ == "__main__":
    main()
