"""fusedtrain optimizers in a Lightning module: configure_optimizers, bf16-mixed with clipping, resume.

An MLP learns a synthetic task (which of 4 Gaussian clusters a point in 20 dimensions comes from). Its
``configure_optimizers`` returns a fusedtrain AdamW (with an EMA of the weights updated inside the step's
kernel) and a cosine schedule stepped every batch. Two runs:

1. ``precision="bf16-mixed"`` with ``gradient_clip_val=1.0``: Lightning clips, as with any optimizer.
   (bf16 needs no GradScaler. With ``"16-mixed"`` a GradScaler hands fusedtrain its scale, which the kernel
   divides out in registers; Lightning then refuses ``gradient_clip_val`` with "does not allow for gradient
   clipping because it performs unscaling of gradients internally", as it does for torch's fused optimizers:
   clip with fusedtrain's ``max_grad_norm=`` instead, which sees the unscaled norm.)
2. The same training stopped after the first epochs with a checkpoint, then resumed from it with
   ``trainer.fit(..., ckpt_path=...)``: the final weights are bit-identical to the uninterrupted run (the
   optimizer's and the scheduler's state travel in Lightning's checkpoint, the EMA's through the module's
   on_save_checkpoint / on_load_checkpoint hooks).

    pip install pytorch-lightning
    python examples/lightning_fusedtrain.py [--epochs 6] [--quick] [--out DIR]

Prints the training loss per epoch, the test accuracy of the weights and of their EMA, and whether the
resumed run matches; checkpoints go to ``--out``. Seconds on a CPU.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fusedtrain
from _report import add_out, parser

DIM, CLASSES = 20, 4


def clusters(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Points around 4 fixed centres (unit noise), labelled by their centre."""
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0)) * 0.45
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return torch.utils.data.TensorDataset(centres[y] + torch.randn(n, DIM, generator=g), y)


def make_module(steps_per_epoch: int, epochs: int) -> Any:
    import pytorch_lightning as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(DIM, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, CLASSES))
            self.ema = fusedtrain.ensemble.EMA(self.net, decay=0.9)
            self.epoch_losses: list[float] = []
            self._sum, self._count = 0.0, 0

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self._sum, self._count = self._sum + float(loss.detach()), self._count + 1
            return loss

        def on_train_epoch_end(self) -> None:
            self.epoch_losses.append(self._sum / max(self._count, 1))
            self._sum, self._count = 0.0, 0

        # The EMA is not a submodule: its averages travel in the checkpoint through these two hooks.
        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["ema"] = self.ema.state_dict()

        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            self.ema.load_state_dict(checkpoint["ema"])

        def configure_optimizers(self) -> Any:
            opt = fusedtrain.optim.AdamW(self.net.parameters(), lr=1e-2, weight_decay=0.05, ema=self.ema)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps_per_epoch * epochs)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Classifier()


def fit(module: Any, epochs: int, out: Path, ckpt_path: str | None = None, save: bool = False) -> Any:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    callbacks = [ModelCheckpoint(dirpath=str(out), save_top_k=-1, every_n_epochs=1)] if save else []
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, precision="bf16-mixed",
                         gradient_clip_val=1.0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=save, callbacks=callbacks, default_root_dir=str(out))
    loader = torch.utils.data.DataLoader(clusters(2048, seed=1), batch_size=64, shuffle=False)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def accuracy(net: nn.Module, data: torch.utils.data.TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((net(x).argmax(-1) == y).float().mean())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser(__doc__)
    ap.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    ap.add_argument("--quick", action="store_true", help="2 epochs (a smoke test)")
    add_out(ap, "Lightning's checkpoints (a subfolder lightning/)")
    args = ap.parse_args(argv)
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError:
        raise SystemExit("lightning_fusedtrain.py needs Lightning: pip install pytorch-lightning")
    for message in (".*does not have many workers.*", ".*dirpath has changed.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):  # its info lines and tips
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting
    epochs = 2 if args.quick else args.epochs
    out = args.out / "lightning"
    shutil.rmtree(out, ignore_errors=True)
    steps_per_epoch = 2048 // 64
    test = clusters(1024, seed=2)

    whole = make_module(steps_per_epoch, epochs)
    fit(whole, epochs, out, save=True)
    acc, acc_ema = accuracy(whole.net, test), 0.0
    with whole.ema.average_parameters():
        acc_ema = accuracy(whole.net, test)
    print("bf16-mixed, gradient_clip_val=1.0, fusedtrain AdamW(ema=) + cosine schedule per step")
    print("  training loss per epoch: " + ", ".join(f"{v:.4f}" for v in whole.epoch_losses))
    print(f"  test accuracy {acc * 100:.1f} %, its EMA {acc_ema * 100:.1f} %")

    first = sorted(out.glob("epoch=0-*.ckpt"))[0]
    resumed = make_module(steps_per_epoch, epochs)
    fit(resumed, epochs, out / "resumed", ckpt_path=str(first), save=True)
    pairs = list(zip(whole.state_dict().values(), resumed.state_dict().values()))
    pairs += zip(whole.ema.module.state_dict().values(), resumed.ema.module.state_dict().values())
    same = all(torch.equal(a, b) for a, b in pairs)
    print(f"resumed from {first.name} with ckpt_path: weights and EMA bit-identical to the uninterrupted run: "
          f"{'yes' if same else 'NO'}")
    return {"losses": whole.epoch_losses, "accuracy": acc, "ema_accuracy": acc_ema, "resume_bit_identical": same}


if __name__ == "__main__":
    main()
