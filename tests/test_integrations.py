"""fusedtrain inside the training frameworks people use: Hugging Face Trainer, Lightning, timm.

Every test builds a tiny model from a config (no download: the hub is set offline before transformers is
imported) and trains it a few steps on random data on the CPU, then compares with the same run using the
torch.optim class of the same name, or with an uninterrupted run (checkpoint and resume), or with what the
framework's own feature does (clipping, layer-wise learning rates).
"""

from __future__ import annotations

import inspect

import copy
import importlib
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import fusedtrain

# No network: the hub is offline before transformers (or timm) is imported; models come from configs.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_name] = "1"


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


transformers = _optional("transformers")
pl = _optional("pytorch_lightning") or _optional("lightning.pytorch")
timm = _optional("timm")
needs_transformers = pytest.mark.skipif(transformers is None, reason="scripts/dev.sh installs transformers")
needs_lightning = pytest.mark.skipif(pl is None, reason="scripts/dev.sh installs pytorch-lightning")
needs_timm = pytest.mark.skipif(timm is None, reason="scripts/dev.sh installs timm")

# float32 fused vs torch for-loop steps differ by a few ulps per step; a few steps of a small network
# keep parameters within this of each other.
CLOSE = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """The models are tiny: one thread runs them in a fraction of the time two take on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], **CLOSE, msg=lambda m, k=k: f"{k}: {m}")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- the closure rule of amp scaling
def test_amp_scaling_declared_outside_closures_only() -> None:
    """Note [amp scaling and closures]: GradScaler's steps (no closure) see the in-kernel unscale declared; a
    closure's gradients are unscaled, so inside one the optimizer declares nothing (Lightning may clip)."""
    p = nn.Parameter(torch.randn(5))
    opt = fusedtrain.optim.AdamW([p], lr=0.1)
    assert opt._step_supports_amp_scaling is True
    seen = []

    def closure() -> torch.Tensor:
        seen.append(opt._step_supports_amp_scaling)
        loss = (p * p).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert seen == [False] and opt._step_supports_amp_scaling is True

    def failing() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt.step(failing)
    assert opt._step_supports_amp_scaling is True and "_step_supports_amp_scaling" not in opt.__dict__


def test_grad_scaler_still_unscales_in_the_kernel() -> None:
    """torch.amp.GradScaler hands the step its scale (no separate unscale pass): the gradients stay scaled."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(7))
    ref = nn.Parameter(p.detach().clone())
    opt = fusedtrain.optim.AdamW([p], lr=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.1, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        for q, o, s in ((p, opt, scaler), (ref, ref_opt, ref_scaler)):
            o.zero_grad()
            s.scale((q * q).sum()).backward()
            s.step(o)
            s.update()
    # ours kept the scaled gradient (unscaled in registers); torch's for-loop Adam had it unscaled in place
    torch.testing.assert_close(p.grad, ref.grad * 1024.0)
    torch.testing.assert_close(p, ref, **CLOSE)


# ------------------------------------------------------------------------------------ Hugging Face Trainer


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences with random class labels."""

    def __init__(self, n: int = 24, length: int = 8, vocab: int = 50, classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert(seed: int = 0) -> nn.Module:
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


def hf_args(out: Path, **kw: Any) -> Any:
    base = dict(output_dir=str(out), use_cpu=True, per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
                weight_decay=0.01, warmup_steps=2, seed=0, report_to=[], save_strategy="no", logging_strategy="no",
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def hf_train(out: Path, opt_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
             resume: str | None = None, model: nn.Module | None = None, **kw: Any) -> tuple[Any, nn.Module]:
    """Trains tiny_bert with the Trainer; ``opt_factory`` builds the optimizer passed as ``optimizers=``."""
    model = tiny_bert() if model is None else model
    args = hf_args(out, **kw.pop("args", {}))
    extra: dict[str, Any] = {}
    if opt_factory is not None:
        opt = opt_factory(model)
        sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2,
                                                             num_training_steps=args.max_steps)
        extra["optimizers"] = (opt, sched)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), **extra, **kw)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def hf_groups(model: nn.Module, wd: float = 0.01) -> list[dict[str, Any]]:
    """The Trainer's own grouping: no weight decay on biases and LayerNorm weights."""
    names = set(transformers.Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    return [{"params": [p for n, p in model.named_parameters() if n in names], "weight_decay": wd},
            {"params": [p for n, p in model.named_parameters() if n not in names], "weight_decay": 0.0}]


@needs_transformers
def test_trainer_optimizers_argument(tmp_path: Path) -> None:
    _, ours = hf_train(tmp_path / "a", lambda m: fusedtrain.optim.AdamW(hf_groups(m), lr=1e-2))
    _, ref = hf_train(tmp_path / "b", lambda m: torch.optim.AdamW(hf_groups(m), lr=1e-2, foreach=False))
    assert not torch.equal(snapshot(ours)["classifier.weight"], snapshot(tiny_bert())["classifier.weight"])
    assert_params(snapshot(ours), snapshot(ref))


@needs_transformers
def test_trainer_optimizer_cls_and_kwargs(tmp_path: Path) -> None:
    kw = {"lr": 1e-2, "betas": (0.8, 0.99)}
    t_ours, ours = hf_train(tmp_path / "a", optimizer_cls_and_kwargs=(fusedtrain.optim.AdamW, kw))
    t_ref, ref = hf_train(tmp_path / "b", optimizer_cls_and_kwargs=(torch.optim.AdamW, {**kw, "foreach": False}))
    assert isinstance(t_ours.optimizer.optimizer, fusedtrain.optim.AdamW)  # accelerate wraps it
    # the Trainer still makes its two groups with args.weight_decay
    assert [g["weight_decay"] for g in t_ours.optimizer.param_groups] == [0.01, 0.0]
    assert_params(snapshot(ours), snapshot(ref))


@needs_transformers
def test_trainer_optimizer_cls_and_kwargs_ignores_learning_rate(tmp_path: Path) -> None:
    """The trap: with optimizer_cls_and_kwargs, TrainingArguments.learning_rate is not passed on."""
    trainer, _ = hf_train(tmp_path, optimizer_cls_and_kwargs=(fusedtrain.optim.AdamW, {}),
                          args=dict(learning_rate=0.5, max_steps=1, warmup_steps=0))
    assert trainer.optimizer.defaults["lr"] == 1e-3  # AdamW's default, not 0.5


@needs_transformers
def test_trainer_gradient_accumulation(tmp_path: Path) -> None:
    args = dict(gradient_accumulation_steps=3, max_steps=4)
    _, ours = hf_train(tmp_path / "a", lambda m: fusedtrain.optim.AdamW(hf_groups(m), lr=1e-2), args=args)
    _, ref = hf_train(tmp_path / "b", lambda m: torch.optim.AdamW(hf_groups(m), lr=1e-2, foreach=False), args=args)
    assert_params(snapshot(ours), snapshot(ref))


@needs_transformers
def test_trainer_clipping_by_fusedtrain(tmp_path: Path) -> None:
    """max_grad_norm=0 for the Trainer and max_grad_norm= on the optimizer: the same update as Trainer's clip."""
    t_ours, ours = hf_train(tmp_path / "a", lambda m: fusedtrain.optim.AdamW(hf_groups(m), lr=1e-2, max_grad_norm=0.05),
                            args=dict(max_grad_norm=0.0))
    _, ref = hf_train(tmp_path / "b", lambda m: torch.optim.AdamW(hf_groups(m), lr=1e-2, foreach=False),
                      args=dict(max_grad_norm=0.05))
    norm = t_ours.optimizer.optimizer.last_grad_norm
    assert norm is not None and float(norm) > 0.05  # clipping acted
    assert_params(snapshot(ours), snapshot(ref))


@needs_transformers
def test_trainer_resume_from_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    def factory(m: nn.Module) -> torch.optim.Optimizer:
        return fusedtrain.optim.AdamW(hf_groups(m), lr=1e-2, max_grad_norm=1.0)

    args = dict(save_strategy="steps", save_steps=3, gradient_accumulation_steps=2)
    _, whole = hf_train(tmp_path / "whole", factory, args=args)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file()
    _, resumed = hf_train(tmp_path / "resumed", factory, resume=str(checkpoint), args=args)
    assert_params(snapshot(whole), snapshot(resumed), exact=True)


# ------------------------------------------------------------------------------------------------- Lightning
def lightning_data(n: int = 48, batch: int = 8) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 10, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def lightning_module(make_opt: Callable[[Any], torch.optim.Optimizer]) -> Any:
    """A small MLP whose configure_optimizers returns ``make_opt(params)`` and a per-step StepLR."""

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 3))

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = make_opt(self.parameters())
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Net()


def lightning_fit(module: Any, tmp: Path, ckpt_path: str | None = None, callbacks: list[Any] | None = None,
                  **kw: Any) -> Any:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=callbacks,
                         default_root_dir=str(tmp), **kw)
    trainer.fit(module, lightning_data(), ckpt_path=ckpt_path)
    return trainer


@needs_lightning
def test_lightning_configure_optimizers(tmp_path: Path) -> None:
    ours = lightning_module(lambda ps: fusedtrain.optim.AdamW(ps, lr=1e-2, weight_decay=0.1))
    ref = lightning_module(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False))
    start = snapshot(ours)
    for m in (ours, ref):
        lightning_fit(m, tmp_path, max_steps=7)
    assert not torch.equal(start["net.0.weight"], snapshot(ours)["net.0.weight"])
    assert_params(snapshot(ours), snapshot(ref))


@needs_lightning
def test_lightning_bf16_mixed_with_gradient_clip_val(tmp_path: Path) -> None:
    """bf16-mixed has no GradScaler: Lightning's clipping works and equals torch's optimizer under it."""
    kw = dict(max_steps=5, precision="bf16-mixed", gradient_clip_val=0.05)
    ours = lightning_module(lambda ps: fusedtrain.optim.AdamW(ps, lr=1e-2))
    ref = lightning_module(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False))
    for m in (ours, ref):
        lightning_fit(m, tmp_path, **kw)
    assert_params(snapshot(ours), snapshot(ref))


@needs_lightning
def test_lightning_grad_scaler_keeps_in_kernel_unscale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a GradScaler (16-mixed), Lightning leaves the unscale to the step (no separate pass), as for torch's
    fused optimizers; clipping is then fusedtrain's ``max_grad_norm=`` (Lightning refuses gradient_clip_val)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    unscales: list[torch.optim.Optimizer] = []
    original = torch.amp.GradScaler.unscale_

    def counting_unscale(self: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        unscales.append(optimizer)
        original(self, optimizer)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", counting_unscale)

    def fit(make_opt: Callable[[Any], torch.optim.Optimizer], **kw: Any) -> Any:
        module = lightning_module(make_opt)
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256.0))
        lightning_fit(module, tmp_path, max_steps=5, plugins=[plugin], **kw)
        return module

    ours = fit(lambda ps: fusedtrain.optim.AdamW(ps, lr=1e-2, max_grad_norm=0.05))
    assert unscales == []
    ref = fit(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), gradient_clip_val=0.05)
    assert len(unscales) == 5  # Lightning unscaled torch's for-loop AdamW's gradients itself, then clipped
    assert_params(snapshot(ours), snapshot(ref))
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit(lambda ps: fusedtrain.optim.AdamW(ps, lr=1e-2), gradient_clip_val=0.05)


@needs_lightning
def test_lightning_checkpoint_and_resume_is_bit_identical(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    def make(ps: Any) -> torch.optim.Optimizer:
        return fusedtrain.optim.Adam(ps, lr=1e-2, weight_decay=0.01, amsgrad=True, max_grad_norm=1.0)

    whole = lightning_module(make)
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1)
    lightning_fit(whole, tmp_path, max_epochs=3, callbacks=[saver])
    first = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    assert first.is_file(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed = lightning_module(make)
    lightning_fit(resumed, tmp_path, max_epochs=3, ckpt_path=str(first),
                  callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt2"))])
    assert_params(snapshot(whole), snapshot(resumed), exact=True)


# ------------------------------------------------------------------------------------------------------ timm
def tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    # qkv_bias=False: the key bias gets a zero gradient in exact arithmetic (softmax ignores a constant), so in
    # float its gradient is rounding noise that Adam scales up to full steps, and two runs part ways there.
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2, num_classes=4,
                             qkv_bias=False)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 6,
                on_step: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    for i in range(steps):
        x = torch.randn(4, 3, 16, 16, generator=g)
        y = torch.randint(0, 4, (4,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if on_step is not None:
            on_step(i + 1)
    return snapshot(model)


@needs_timm
def test_timm_param_groups_weight_decay() -> None:
    from timm.optim import param_groups_weight_decay

    ours_model, ref_model = tiny_vit(), tiny_vit()
    skip = ours_model.no_weight_decay()
    ours = fusedtrain.optim.AdamW(param_groups_weight_decay(ours_model, 0.05, no_weight_decay_list=skip), lr=1e-2)
    ref = torch.optim.AdamW(param_groups_weight_decay(ref_model, 0.05, no_weight_decay_list=skip), lr=1e-2,
                            foreach=False)
    assert [g["weight_decay"] for g in ours.param_groups] == [0.0, 0.05]
    assert_params(train_steps(ours_model, ours), train_steps(ref_model, ref))


@needs_timm
def test_timm_layer_decay_groups_and_scheduler() -> None:
    """timm's layer-wise decay groups carry ``lr_scale``; timm's schedulers apply it to each group's lr."""
    from timm.optim import param_groups_layer_decay
    from timm.scheduler import CosineLRScheduler

    def run(cls: type[torch.optim.Optimizer], **kw: Any) -> tuple[dict[str, torch.Tensor], list[float]]:
        model = tiny_vit()
        groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5,
                                          no_weight_decay_list=model.no_weight_decay())
        opt = cls(groups, lr=1e-2, **kw)
        sched = CosineLRScheduler(opt, t_initial=6, warmup_t=2, warmup_lr_init=1e-3)
        lrs = sorted({g["lr"] for g in opt.param_groups})
        return train_steps(model, opt, on_step=sched.step_update), lrs

    (ours, lrs), (ref, _) = run(fusedtrain.optim.AdamW), run(torch.optim.AdamW, foreach=False)
    assert len(lrs) >= 4 and lrs[0] < lrs[-1] / 4  # one lr per depth, scaled down towards the input
    assert_params(ours, ref)


@needs_timm
def test_create_optimizer_groups_like_timm() -> None:
    from timm.optim import param_groups_weight_decay

    model = tiny_vit()
    model.head.bias.requires_grad_(False)  # frozen: left out, as timm does
    opt = fusedtrain.optim.create_optimizer(model, "adamw", lr=2e-3, weight_decay=0.05, max_grad_norm=1.0)
    timm_groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    ids = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert ids == {g["weight_decay"]: {id(p) for p in g["params"]} for g in timm_groups}
    assert isinstance(opt, fusedtrain.optim.AdamW) and opt.max_grad_norm == 1.0
    assert opt.defaults["lr"] == 2e-3 and opt.defaults["weight_decay"] == 0.05
    assert id(model.pos_embed) in ids[0.0] and id(model.head.bias) not in ids[0.0] | ids[0.05]


def test_create_optimizer_every_name_steps_as_torch() -> None:
    """Every name builds its fusedtrain class with torch's defaults (or the preset) and steps as torch."""
    torch_equivalent = {"momentum": (torch.optim.SGD, dict(momentum=0.9)),
                        "nesterov": (torch.optim.SGD, dict(momentum=0.9, nesterov=True))}
    names = fusedtrain.optim.list_optimizers()
    assert {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"} <= set(names)
    for name in names:
        cls = fusedtrain.optim.create_optimizer(nn.Linear(2, 2), name).__class__
        assert cls.__module__.startswith("fusedtrain.optim"), name
        torch.manual_seed(0)
        # the ReLU: a bias right before BatchNorm gets no gradient in exact arithmetic, only rounding noise
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 3))
        ref_model = copy.deepcopy(model)
        wd = 0.1 if "weight_decay" in inspect.signature(cls.__init__).parameters else 0.0  # Rprop has none
        ours = fusedtrain.optim.create_optimizer(model, name.upper(), lr=0.05, weight_decay=wd)
        torch_cls, preset = torch_equivalent.get(name, (getattr(torch.optim, cls.__name__, None), {}))
        if name == "muon":  # torch's Muon refuses 1-D parameters; create_optimizer gives them to Muon's AdamW
            torch_cls = None
        if torch_cls is None:  # an optimizer torch does not have (or cannot take this model): it builds and steps
            if callable(getattr(ours, "train", None)):  # schedule-free: starts in eval mode, as its reference
                ours.train()
            before = snapshot(model)
            after = train_mlp(model, ours)
            assert any(not torch.equal(before[k], after[k]) for k in before), name
            continue
        assert issubclass(cls, torch_cls), name
        ref_kw = dict(weight_decay=wd) if wd else {}
        ref = torch_cls(param_groups_by_rule(ref_model, wd) if wd else ref_model.parameters(), lr=0.05,
                        foreach=False, **ref_kw, **preset)
        assert_params(train_mlp(model, ours), train_mlp(ref_model, ref))


def param_groups_by_rule(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    """The documented rule, written out: no decay on parameters of <= 1 dimension or named *.bias."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if p.ndim > 1 and not n.endswith(".bias")], "weight_decay": wd},
            {"params": [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")], "weight_decay": 0.0}]


def train_mlp(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return snapshot(model)


def test_create_optimizer_arguments() -> None:
    model = nn.Linear(3, 2)
    opt = fusedtrain.optim.create_optimizer(model, "adam")  # no lr: the class's default; weight_decay 0: one group
    assert opt.defaults["lr"] == 1e-3 and len(opt.param_groups) == 1
    opt = fusedtrain.optim.create_optimizer(model.parameters(), "momentum", lr=0.1, momentum=0.5, weight_decay=0.01)
    assert isinstance(opt, fusedtrain.optim.SGD) and opt.defaults["momentum"] == 0.5
    assert opt.param_groups[0]["weight_decay"] == 0.01  # a parameter list: decay on all of them
    opt = fusedtrain.optim.create_optimizer(model, "sgd", lr=0.1, weight_decay=0.01, filter_bias_and_norm=False)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.01
    opt = fusedtrain.optim.create_optimizer(model, "adamw", weight_decay=0.01, no_weight_decay=["weight"])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0]
    with pytest.raises(ValueError, match=r"unknown optimizer 'no_such_optimizer'; known: .*adamw"):
        fusedtrain.optim.create_optimizer(model, "no_such_optimizer")
    with pytest.raises(ValueError, match="pass the module"):
        fusedtrain.optim.create_optimizer(model.parameters(), "adamw", no_weight_decay=["bias"])
    with pytest.raises(TypeError, match="name must be a string"):
        fusedtrain.optim.create_optimizer(model, fusedtrain.optim.AdamW)  # type: ignore[arg-type]
