"""fusedtrain's AdamW inside Hugging Face's Trainer: optimizer, clipping, gradient accumulation, resume.

A tiny BERT built from a config (nothing is downloaded: the hub is set offline) learns a synthetic task: the
label of a random token sequence is its first token modulo 3. Two ways to hand Trainer a fusedtrain optimizer:

1. ``optimizers=(optimizer, scheduler)``: you build both. Here fusedtrain also clips the gradients inside its
   step: ``max_grad_norm=1.0`` on the optimizer and ``max_grad_norm=0`` in TrainingArguments (else Trainer
   clips first, in a pass of its own, and fusedtrain's clip finds nothing left to do).
2. ``optimizer_cls_and_kwargs=(fusedtrain.optim.AdamW, {"lr": ...})``: Trainer builds it with its own
   param groups (no weight decay on biases and LayerNorm weights) and scheduler. The trap: Trainer does NOT
   pass TrainingArguments.learning_rate to the class; without "lr" in the kwargs the optimizer runs at
   AdamW's default 1e-3. This example passes it. Ways 1 and 2 make the same updates here (the same groups,
   schedule and clipping: Trainer's clip_grad_norm_ before the step, or fusedtrain's inside it), so their
   results agree.

Then it trains half the steps, saves a checkpoint, resumes from it in a new Trainer with
``resume_from_checkpoint`` and checks that the result is bit-identical to the uninterrupted run (the
optimizer's state_dict, torch.optim's format, travels in the checkpoint).

    pip install transformers accelerate
    python examples/hf_trainer.py [--steps 60] [--quick] [--out DIR]

Prints the loss and accuracy on held-out sequences before training and after each run, and whether the
resumed run matches; checkpoints go to ``--out``. Seconds on a CPU.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_name] = "1"  # nothing to download: the model comes from a config

import torch

import fusedtrain
from _report import add_out, parser

VOCAB, LENGTH, CLASSES = 30, 8, 3


class FirstTokenDataset(torch.utils.data.Dataset):
    """Random token sequences; the label is the first token modulo 3."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.labels = self.ids[:, 0] % CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert() -> torch.nn.Module:
    import transformers

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=LENGTH, num_labels=CLASSES)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def args_for(out: Path, steps: int, **kw: Any) -> Any:
    import transformers

    base = dict(output_dir=str(out), use_cpu=True, per_device_train_batch_size=16, gradient_accumulation_steps=2,
                max_steps=steps, learning_rate=3e-3, weight_decay=0.01, warmup_steps=steps // 10, seed=0,
                report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainer's own grouping (no weight decay on biases and LayerNorm weights), for optimizers= ."""
    import transformers

    names = set(transformers.Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    return [{"params": [p for n, p in model.named_parameters() if n in names], "weight_decay": weight_decay},
            {"params": [p for n, p in model.named_parameters() if n not in names], "weight_decay": 0.0}]


def evaluate(model: torch.nn.Module, data: FirstTokenDataset) -> tuple[float, float]:
    """(loss, accuracy) on ``data``."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=data.ids, labels=data.labels)
    return float(out.loss), float((out.logits.argmax(-1) == data.labels).float().mean())


def train_with_optimizers(out: Path, steps: int, resume: str | None = None, **kw: Any) -> tuple[Any, torch.nn.Module]:
    """Way 1: optimizers=(fusedtrain AdamW clipping inside its step, a linear schedule); Trainer does not clip."""
    import transformers

    model = tiny_bert()
    opt = fusedtrain.optim.AdamW(decay_groups(model, 0.01), lr=3e-3, max_grad_norm=1.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=steps // 10,
                                                         num_training_steps=steps)
    trainer = transformers.Trainer(model=model, args=args_for(out, steps, max_grad_norm=0.0, **kw),
                                   train_dataset=FirstTokenDataset(1024, seed=1), optimizers=(opt, sched))
    trainer.remove_callback(transformers.PrinterCallback)  # this example prints its own summary
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of each run (default 60)")
    ap.add_argument("--quick", action="store_true", help="12 steps (a smoke test)")
    add_out(ap, "the Trainer's checkpoints (a subfolder hf_trainer/)")
    args = ap.parse_args(argv)
    try:
        import transformers
    except ImportError:
        raise SystemExit("hf_trainer.py needs transformers and accelerate: pip install transformers accelerate")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting
    steps = 12 if args.quick else args.steps
    steps -= steps % 2  # the checkpoint sits halfway
    out = args.out / "hf_trainer"
    shutil.rmtree(out, ignore_errors=True)
    test = FirstTokenDataset(512, seed=2)
    report: dict[str, Any] = {"before": evaluate(tiny_bert(), test)}
    print(f"{steps} steps of 2 x 16 sequences; before training: test loss {report['before'][0]:.4f}, "
          f"accuracy {report['before'][1] * 100:.1f} %")

    trainer, model = train_with_optimizers(out / "whole", steps, save_strategy="steps", save_steps=steps // 2)
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    report["optimizers"] = evaluate(model, test)
    norm = float(trainer.optimizer.optimizer.last_grad_norm)
    print(f"1. optimizers=(fusedtrain AdamW(max_grad_norm=1.0), linear schedule), Trainer max_grad_norm=0: test loss "
          f"{report['optimizers'][0]:.4f}, accuracy {report['optimizers'][1] * 100:.1f} %; last gradient norm "
          f"{norm:.3f}")

    model = tiny_bert()
    trainer = transformers.Trainer(model=model, args=args_for(out / "cls", steps),
                                   train_dataset=FirstTokenDataset(1024, seed=1),
                                   optimizer_cls_and_kwargs=(fusedtrain.optim.AdamW, {"lr": 3e-3}))
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    report["optimizer_cls_and_kwargs"] = evaluate(model, test)
    groups = [(len(g["params"]), g["weight_decay"]) for g in trainer.optimizer.param_groups]
    print(f"2. optimizer_cls_and_kwargs=(fusedtrain.optim.AdamW, {{'lr': 3e-3}}), Trainer clips (max_grad_norm=1): "
          f"test loss {report['optimizer_cls_and_kwargs'][0]:.4f}, accuracy "
          f"{report['optimizer_cls_and_kwargs'][1] * 100:.1f} %; Trainer's groups (tensors, weight decay): {groups}")

    checkpoint = out / "whole" / f"checkpoint-{steps // 2}"
    _, resumed = train_with_optimizers(out / "resumed", steps, resume=str(checkpoint))
    same = all(torch.equal(whole[k], v) for k, v in resumed.state_dict().items())
    report["resume_bit_identical"] = same
    print(f"resumed from {checkpoint.name} with resume_from_checkpoint: bit-identical to the uninterrupted run: "
          f"{'yes' if same else 'NO'}")
    return report


if __name__ == "__main__":
    main()
