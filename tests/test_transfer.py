"""Transfer learning on torchvision models built with random weights (no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusedtrain
from fusedtrain.transfer import (EarlyFeatureClassifier, GradualUnfreezer, extract_features, finetune, freeze,
                                 layer_groups, replace_head, unfreeze)

models = pytest.importorskip("torchvision.models")

FAMILIES = ["resnet18", "vgg11", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "vit_b_16"]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"image_size": 32} if name == "vit_b_16" else {}
    return getattr(models, name)(weights=None, **kwargs)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_groups_cover_every_parameter_once(name: str) -> None:
    model = _model(name)
    groups = layer_groups(model)
    ids = [id(p) for g in groups for p in g.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert len(groups) >= 3
    head_ids = {id(p) for p in groups[-1].parameters()}
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert id(last_linear.weight) in head_ids


def test_layer_groups_generic_and_errors() -> None:
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    groups = layer_groups(seq)
    assert [g.name for g in groups] == ["0", "2", "4"]
    x = torch.randn(3, 4)
    y = x
    for g in groups:
        y = g(y)
    torch.testing.assert_close(y, seq(x))
    with pytest.raises(ValueError, match="cannot find stages"):
        layer_groups(nn.Linear(3, 3))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_strategies_train_exactly_the_expected_parameters(name: str) -> None:
    model = _model(name)
    groups = layer_groups(model)
    head = {n for n, p in model.named_parameters() if any(p is q for q in groups[-1].parameters())}

    m, pgs = finetune(model, "small", "similar", lr=0.01)
    assert m is model and _trainable(model) == head
    assert [pg["lr"] for pg in pgs] == [0.01]

    model = _model(name)
    groups = layer_groups(model)
    last = {n for n, p in model.named_parameters()
            if any(p is q for g in groups[-2:] for q in g.parameters())}
    m, pgs = finetune(model, "large", "similar", lr=0.01)
    assert _trainable(model) == last and [pg["lr"] for pg in pgs] == [0.01, 0.01]

    model = _model(name)
    m, pgs = finetune(model, "large", "different", lr=0.01, lr_decay=2.0)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    n = len(layer_groups(model))
    assert [pg["lr"] for pg in pgs] == pytest.approx([0.01 / 2.0 ** (n - 1 - i) for i in range(n)])
    assert sum(len(pg["params"]) for pg in pgs) == len(list(model.parameters()))

    model = _model(name)
    m, pgs = finetune(model, "small", "different", lr=0.01, num_classes=7,
                      example_input=torch.zeros(2, 3, 64, 64))
    assert isinstance(m, EarlyFeatureClassifier)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert [len(pg["params"]) for pg in pgs] == [2]
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode() -> None:
    model = _model("resnet18")
    freeze(model.layer1)  # bn="freeze_stats"
    frozen_bn, free_bn = model.layer1[0].bn1, model.layer2[0].bn1
    before = frozen_bn.running_mean.clone(), free_bn.running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(frozen_bn.running_mean, before[0])
    assert not torch.equal(free_bn.running_mean, before[1])
    assert frozen_bn.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    unfreeze(model.layer1)
    model.train()
    model(torch.randn(4, 3, 64, 64))
    assert not torch.equal(frozen_bn.running_mean, before[0])
    assert all(p.requires_grad for p in model.layer1.parameters())


@pytest.mark.parametrize("bn,stats_move,affine_trains", [("freeze_stats", False, True), ("train", True, True),
                                                          ("freeze_all", False, False)])
def test_bn_switches(bn: str, stats_move: bool, affine_trains: bool) -> None:
    model = _model("resnet18")
    freeze(model, bn=bn)
    before = model.bn1.running_var.clone()
    model.train()
    model(torch.randn(2, 3, 64, 64))
    assert (not torch.equal(model.bn1.running_var, before)) == stats_move
    assert model.bn1.weight.requires_grad == affine_trains
    assert not model.conv1.weight.requires_grad


@pytest.mark.parametrize("name,path", [("resnet18", "fc"), ("vgg11", "classifier.6"), ("mobilenet_v3_small",
                                       "classifier.3"), ("densenet121", "classifier"), ("vit_b_16", "heads.head")])
def test_replace_head(name: str, path: str) -> None:
    model = _model(name).to(torch.float64)
    old = model.get_submodule(path)
    new = replace_head(model, 5)
    assert model.get_submodule(path) is new
    assert (new.in_features, new.out_features) == (old.in_features, 5)
    assert new.weight.dtype == torch.float64
    size = 32 if name == "vit_b_16" else 64
    assert model.eval()(torch.randn(2, 3, size, size, dtype=torch.float64)).shape == (2, 5)


def test_replace_head_errors() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        replace_head(_model("resnet18"), 0)
    with pytest.raises(ValueError, match="no nn.Linear classifier.*head="):
        replace_head(nn.Sequential(nn.Conv2d(3, 4, 3)), 3)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        replace_head(_model("resnet18"), 3, head="layer4")


def test_gradual_unfreezing_order_and_rates() -> None:
    model = _model("resnet18")
    model, pgs = finetune(model, "small", "similar", lr=0.1)
    opt = fusedtrain.optim.SGD(pgs, lr=0.1)
    unfreezer = GradualUnfreezer(model, opt, schedule="epoch", lr_decay=2.0)
    order = [unfreezer.step().name for _ in range(5)]
    assert order == ["layer4", "layer3", "layer2", "layer1", "stem"]
    assert unfreezer.step() is None
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.05, 0.025, 0.0125, 0.00625, 0.003125])
    assert _trainable(model) == {n for n, _ in model.named_parameters()}

    model = _model("resnet18")
    model, pgs = finetune(model, "small", "similar")
    stepper = GradualUnfreezer(model, torch.optim.SGD(pgs, lr=0.1), schedule=[2, 4])
    got = [stepper.step() for _ in range(5)]
    assert [g.name if g else None for g in got] == [None, "layer4", None, "layer3", None]


def test_fused_optimizer_allocates_nothing_for_frozen_parameters() -> None:
    model = _model("resnet18")
    replace_head(model, 3)
    finetune(model, "small", "similar")
    opt = fusedtrain.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert {id(p) for p in opt.state} == {id(model.fc.weight), id(model.fc.bias)}


def test_extract_features_and_bad_arguments() -> None:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))
    loader = [(torch.randn(5, 3, 8, 8), torch.arange(5)), (torch.randn(3, 3, 8, 8), torch.arange(3))]
    feats, labels = extract_features(backbone, loader)
    assert feats.shape == (8, 4) and labels.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    model = _model("resnet18")
    with pytest.raises(ValueError, match="data must be"):
        finetune(model, "tiny", "similar")
    with pytest.raises(ValueError, match="similarity must be"):
        finetune(model, "small", "same")
    with pytest.raises(ValueError, match="pass num_classes"):
        finetune(model, "small", "different")
    with pytest.raises(ValueError, match="stages run one after another"):
        finetune(_model("vit_b_16"), "small", "different", num_classes=3)
    with pytest.raises(ValueError, match="bn must be"):
        freeze(model, bn="eval")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224", "convnext_atto"])
def test_timm_models(name: str) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=4)
    groups = layer_groups(model)
    ids = [id(p) for g in groups for p in g.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups[-1].name == "head"
    head = {id(p) for p in groups[-1].parameters()}
    assert id(model.get_classifier().weight) in head
    finetune(model, "small", "similar")
    assert {id(p) for p in model.parameters() if p.requires_grad} == head
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        before = bns[0].running_mean.clone()
        model.train()
        model(torch.randn(2, 3, 64 if "vit" not in name else 224, 64 if "vit" not in name else 224))
        assert torch.equal(bns[0].running_mean, before)
