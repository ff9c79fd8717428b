"""Drop-in hygiene for the optimizers beyond torch.optim's element-wise set (Lion, LAMB, LARS, schedule-free,
Muon, Adafactor), the checks tests/test_regressions_13.py runs for torch's twins: copies (deepcopy, pickle,
torch.save) keep every option and step like the original; a parameter listed twice gives the reference
implementation's result; expanded, sparse-gradient and changed-gradient steps are refused before anything is
written; meta parameters step like the reference or are refused clearly. ``test_every_class_is_covered``
fails when a new class is in neither this file's registry nor tests/_helpers.py's OPTIMIZERS."""

from __future__ import annotations

import copy
import io
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import fusedtrain
from _helpers import CONFIGS, OPTIMIZERS, assert_same_values, roundtrip

timm_optim = pytest.importorskip("timm.optim")
schedulefree = pytest.importorskip("schedulefree")


def _timm(name: str) -> Callable[..., torch.optim.Optimizer]:
    return lambda params, **kw: getattr(timm_optim, name)(params, foreach=False, **kw)


# name -> (constructor kwargs, reference constructor or None, whether the parameters must be matrices)
REGISTRY: dict[str, tuple[dict[str, Any], Callable[..., torch.optim.Optimizer] | None, bool]] = {
    "Lion": (dict(lr=1e-3, weight_decay=0.1), _timm("Lion"), False),
    "Lamb": (dict(lr=1e-2, weight_decay=0.01, max_grad_norm=None), _timm("Lamb"), False),
    "Lars": (dict(lr=0.1, momentum=0.9, weight_decay=1e-4), _timm("Lars"), False),
    "ScheduleFreeAdamW": (dict(lr=1e-2, warmup_steps=2, weight_decay=0.01),
                          lambda params, **kw: schedulefree.AdamWScheduleFree(params, foreach=False, **kw), False),
    "ScheduleFreeSGD": (dict(lr=0.1, warmup_steps=2, weight_decay=0.01),
                        lambda params, **kw: schedulefree.SGDScheduleFree(params, foreach=False, **kw), False),
    "Muon": (dict(lr=0.02, weight_decay=0.01, ns_dtype=torch.float32), None, True),
    "Adafactor": (dict(lr=1e-2, weight_decay=0.01),
                  lambda params, **kw: torch.optim.Adafactor(params, foreach=False, **kw), False),
    # 8-bit states on every tensor of >= 2 dims (min_8bit_size=1; 0-D and 1-D ones keep float states, Note [8-bit
    # states in the optimizers]); no reference rounds like them: a duplicate is checked
    # against the same class stepping the parameter twice with one gradient
    "Adam8bit": (dict(lr=1e-2, min_8bit_size=1), None, False),
    "AdamW8bit": (dict(lr=1e-2, weight_decay=0.1, min_8bit_size=1), None, False),
}

# The low-bit states of every class that has them (state_bits=8; Adam's 4-bit too), on every tensor of >= 2 dims:
# their own rules and block drivers behind the same plan, so the same hygiene. No reference rounds like them (the
# duplicate check steps the same class twice). name -> class
CLASS_OF: dict[str, str] = {}
_LOWBIT: dict[str, dict[str, Any]] = {
    "SGD": dict(lr=0.1, momentum=0.9, weight_decay=0.01), "Adagrad": dict(lr=0.1),
    "RMSprop": dict(lr=0.01, momentum=0.9, centered=True), "Adam": dict(lr=1e-2, weight_decay=0.1),
    "NAdam": dict(lr=1e-2), "RAdam": dict(lr=1e-2), "Adamax": dict(lr=1e-2), "Adadelta": dict(lr=1.0),
    **{n: REGISTRY[n][0] for n in ("Lion", "Lamb", "Lars", "ScheduleFreeAdamW", "Muon")},
}
for _cls, _kw in _LOWBIT.items():
    for _bits in (8, 4) if _cls == "Adam" else (8,):
        CLASS_OF[f"{_cls}-{_bits}bit"] = _cls
        REGISTRY[f"{_cls}-{_bits}bit"] = (dict(_kw, state_bits=_bits, min_8bit_size=1), None, REGISTRY.get(
            _cls, (None, None, False))[2])
NAMES = list(REGISTRY)


def _make(name: str, params: Any, **extra: Any) -> torch.optim.Optimizer:
    kw, _, _ = REGISTRY[name]
    opt = getattr(fusedtrain.optim, CLASS_OF.get(name, name))(params, **{**kw, **extra})
    if hasattr(opt, "train"):
        opt.train()  # schedule-free: the y sequence (training mode)
    return opt


def _reference(name: str, params: Any, **extra: Any) -> torch.optim.Optimizer:
    kw, ref, _ = REGISTRY[name]
    assert ref is not None
    kw = {k: v for k, v in {**kw, **extra}.items() if k != "ns_dtype"}
    opt = ref(params, **kw)
    if hasattr(opt, "train"):
        opt.train()
    return opt


def _params(name: str, seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (6, 4), (9, 3), (5, 5)] if REGISTRY[name][2] else [(7, 5), (6,), (9, 3), (13,), ()]
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(params: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[Any]:
    out: list[Any] = [p.detach().clone() for p in params]
    for p in params:
        for k in sorted(opt.state.get(p, {})):
            v = opt.state[p][k]
            out.append(v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
    for g in opt.param_groups:
        out.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"})
    return out




def test_every_class_is_covered() -> None:
    classes = {n for n in fusedtrain.optim.__all__
               if isinstance(getattr(fusedtrain.optim, n), type)
               and issubclass(getattr(fusedtrain.optim, n), torch.optim.Optimizer)}
    covered = (set(REGISTRY) - set(CLASS_OF)) | set(OPTIMIZERS)
    aliases = {n for n in classes - covered if any(getattr(fusedtrain.optim, n) is getattr(fusedtrain.optim, c)
                                                   for c in covered)}
    assert classes - covered - aliases == set(), "add the new optimizer classes to a hygiene registry"


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch_save"])
@pytest.mark.parametrize("name", NAMES)
def test_copies_keep_options_and_step_like_the_original(name: str, how: str) -> None:
    params = _params(name)
    opt = _make(name, params, max_grad_norm=0.5)
    for i in range(2):
        _grads(params, i)
        opt.step()
    params2, opt2 = roundtrip((params, opt), how)
    # torch.optim.Optimizer.__setstate__ adds 'differentiable' (False) where a class has no such option
    def options(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k != "params" and not (k == "differentiable" and v is False)}

    assert options(opt2.defaults) == options(opt.defaults)
    assert [options(g) for g in opt2.param_groups] == [options(g) for g in opt.param_groups]
    for attr in ("max_grad_norm", "master_weights", "stochastic_rounding", "state_dtype", "l1"):
        assert getattr(opt2, attr, None) == getattr(opt, attr, None), attr
    for i in range(2, 5):
        _grads(params, i)
        _grads(params2, i)
        opt.step()
        opt2.step()
    assert_same_values(_snapshot(opt, params), _snapshot(opt2, params2), "copy vs original")


class _SfAdamWLoop(torch.optim.Optimizer):
    """schedulefree.AdamWScheduleFree's for-loop step (train mode) on an unmodified copy of each gradient:
    schedulefree normalizes p.grad in place, so its second visit of a parameter listed twice would see the
    normalized gradient; fusedtrain leaves gradients alone."""

    def __init__(self, params: Any, lr: float, warmup_steps: int, weight_decay: float) -> None:
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, r=0.0,
                                      k=0, warmup_steps=warmup_steps, weight_lr_power=2.0, lr_max=0.0,
                                      weight_sum=0.0))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            k, beta1, beta2 = group["k"], *group["betas"]
            lr = group["lr"] * ((k + 1) / group["warmup_steps"] if k < group["warmup_steps"] else 1.0)
            lr_max = group["lr_max"] = max(lr, group["lr_max"])
            weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
            weight_sum = group["weight_sum"] = group["weight_sum"] + weight
            ckp1 = weight / weight_sum if weight_sum else 0.0
            for p in group["params"]:
                state = self.state[p]
                if "z" not in state:
                    state["z"], state["exp_avg_sq"] = p.clone(), torch.zeros_like(p)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = state["exp_avg_sq"].div(1 - beta2 ** (k + 1)).sqrt_().add_(group["eps"])
                g = p.grad.div(denom)
                if group["weight_decay"] != 0:
                    g.add_(p, alpha=group["weight_decay"])
                p.lerp_(end=state["z"], weight=ckp1)
                p.add_(g, alpha=lr * (beta1 * (1 - ckp1) - 1))
                state["z"].sub_(g, alpha=lr)
            group["k"] = k + 1


def test_sf_adamw_loop_is_schedulefree_without_duplicates() -> None:
    """The stand-in reference above equals schedulefree on distinct parameters (to rounding)."""
    runs = []
    for cls in (_SfAdamWLoop, lambda ps, **kw: schedulefree.AdamWScheduleFree(ps, foreach=False, **kw)):
        ps = _params("ScheduleFreeAdamW")
        opt = cls(ps, lr=1e-2, warmup_steps=2, weight_decay=0.01)
        if hasattr(opt, "train"):
            opt.train()
        for i in range(4):
            _grads(ps, 20 + i)
            opt.step()
        runs.append([p.detach().clone() for p in ps])
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in CLASS_OF])
def test_duplicate_parameter_gives_the_reference_result(name: str) -> None:
    """A parameter listed twice in a group: torch warns, and for-loop optimizers update it twice per step.
    fusedtrain gives the reference implementation's result (Muon, whose bfloat16 Newton-Schulz torch runs
    cannot be matched bit for bit, and Adam8bit / AdamW8bit: the same class stepping the parameter twice per
    step with one gradient, which their zero-initialized states make the same thing)."""
    overrides: dict[str, Any] = {}
    if name == "Lamb":
        # fusedtrain counts LAMB's steps per parameter, timm per group (documented in lamb.py): a parameter
        # listed twice takes two steps of its own; without bias correction the counters do not matter
        overrides = dict(bias_correction=False)
    if name == "ScheduleFreeSGD":
        # schedulefree's SGD adds the weight decay to p.grad in place (its second visit of a duplicate sees
        # the decayed gradient); fusedtrain leaves gradients alone
        overrides = dict(weight_decay=0.0)
    runs = []
    for side in ("ours", "reference"):
        p = _params(name)[0]
        q = _params(name, seed=1)[2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the duplicate warning; the result is what is tested
            if side == "ours":
                opt = _make(name, [{"params": [p, q, p]}], **overrides)
            elif name == "ScheduleFreeAdamW":
                opt = _SfAdamWLoop([{"params": [p, q, p]}], **REGISTRY[name][0])
            elif REGISTRY[name][1] is not None:
                opt = _reference(name, [{"params": [p, q, p]}], **overrides)
            else:
                opt = _make(name, [{"params": [p, q]}], **overrides)
        for i in range(3):
            _grads([p, q], 10 + i)
            opt.step()
            if side == "reference" and REGISTRY[name][1] is None:
                q.grad = None
                opt.step()  # p's second update of the step, with the same gradient
        runs.append([p.detach().clone(), q.detach().clone()])
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CLASS_OF))
def test_low_bit_duplicate_is_updated_as_the_float_class_does(name: str) -> None:
    """A parameter listed twice with low-bit states follows the float class's duplicate semantics (tested
    against the references above). Where the float class's duplicate is two steps with one gradient (states
    that start at zero), the low-bit class's is too, bit for bit; where it is not (torch's SGD initializes
    the momentum of both visits of a first step from the gradient; schedule-free's c_{k+1} is per step), the
    low-bit result is much nearer the float class's duplicate than the float class's single listing."""
    def run(bits: int, duplicate: bool, twice: bool = False) -> torch.Tensor:
        p = _params(name)[0]
        q = _params(name, seed=1)[2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the duplicate warning; the result is what is tested
            opt = _make(name, [{"params": [p, q, p] if duplicate else [p, q]}], state_bits=bits)
        for i in range(3):
            _grads([p, q], 10 + i)
            opt.step()
            if twice:
                q.grad = None
                opt.step()  # p's second update of the step, with the same gradient
        return torch.cat([p.detach().flatten(), q.detach().flatten()])

    bits = REGISTRY[name][0]["state_bits"]
    low, float_dup, float_once = run(bits, True), run(32, True), run(32, False)
    gap = (float_dup - float_once).abs().max().item()
    assert gap > 1e-4, gap  # (the test can tell the two apart)
    if torch.equal(float_dup, run(32, False, twice=True)):
        assert_same_values(low, run(bits, False, twice=True), "duplicate vs two steps")
    else:
        err = (low - float_dup).abs().max().item()
        assert err < 0.1 * gap, (err, gap)


@pytest.mark.parametrize("name", NAMES)
def test_expanded_parameter_is_refused_before_anything_changes(name: str) -> None:
    params = _params(name)
    expanded = torch.randn(1, 6).expand(5, 6).requires_grad_()
    opt = _make(name, [{"params": params[:2]}, {"params": params[2:] + [expanded]}])
    _grads(params, 0)
    opt.step()
    _grads(params, 1)
    expanded.grad = torch.randn(5, 6)
    everything = params + [expanded]
    before = _snapshot(opt, everything)
    with pytest.raises((RuntimeError, ValueError)):
        opt.step()
    assert_same_values(before, _snapshot(opt, everything), "after the refused step")


_GROUP_1_PARAM_0 = (re.compile(r"group\S*\s*\[?\s*1\b", re.IGNORECASE),
                    re.compile(r"param\w*'?\]?\s*\[?\s*0\b", re.IGNORECASE))


@pytest.mark.parametrize("change", ["dtype", "shape", "sparse"])
@pytest.mark.parametrize("name", NAMES)
def test_changed_gradient_is_refused_before_any_group(name: str, change: str) -> None:
    """After two steps (the checks are cached), a gradient of another dtype or shape, or a sparse one, in
    the second group: refused before any group is updated; the dtype and shape messages name the group and
    the parameter."""
    params = _params(name)
    opt = _make(name, [{"params": params[:2]}, {"params": params[2:]}])
    for i in range(2):
        _grads(params, i)
        opt.step()
    _grads(params, 2)
    victim = opt.param_groups[1]["params"][0]
    if change == "dtype":
        victim.grad.data = victim.grad.data.double()
    elif change == "shape":
        victim.grad.data = torch.randn(victim.numel() + 3)
    else:
        victim.grad = victim.grad.to_sparse()
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError) as err:
        opt.step()
    if change != "sparse":
        assert all(r.search(str(err.value)) for r in _GROUP_1_PARAM_0), str(err.value)
    else:
        assert "sparse" in str(err.value)
    assert_same_values(before, _snapshot(opt, params), "after the refused step")


@pytest.mark.parametrize("name", NAMES)
def test_meta_parameters_step_like_the_reference_or_are_refused_clearly(name: str) -> None:
    """Parameters on the meta device (model building): the step creates the reference's state keys, shapes
    and dtypes, or (where the reference cannot step them either, or fusedtrain does not) a clear error that
    says so."""
    def run(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> tuple[list[torch.Tensor], Any]:
        with torch.device("meta"):
            params = [nn.Parameter(torch.empty(s)) for s in ((7, 5), (6, 4))]
        opt = make(params)
        for _ in range(2):
            for p in params:
                p.grad = torch.empty_like(p)
            opt.step()
        return params, opt

    try:
        pa, a = run(lambda ps: _make(name, ps))
    except (RuntimeError, NotImplementedError, ValueError) as e:
        assert "meta" in str(e), str(e)
        return
    assert all(p.device.type == "meta" for p in pa)
    if REGISTRY[name][1] is None:
        return
    pb, b = run(lambda ps: _reference(name, ps))
    for x, y in zip(pa, pb):
        assert set(a.state[x]) >= set(b.state[y]), (set(a.state[x]), set(b.state[y]))
        for key, value in b.state[y].items():
            if isinstance(value, torch.Tensor):
                mine = a.state[x][key]
                assert (mine.dtype, mine.shape) == (value.dtype, value.shape), key


@pytest.mark.parametrize("name", NAMES)
def test_skipped_step_changes_nothing(name: str) -> None:
    """A step GradScaler skips (an inf gradient): no parameter, state, group value or EMA average changes, and
    the next step proceeds (the skipped one is not counted)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.ps = nn.ParameterList(_params(name))
    params = list(model.parameters())
    ema = fusedtrain.ensemble.EMA(model, decay=0.9)
    opt = _make(name, params, ema=ema)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    weights = [torch.randn(p.shape) for p in params]
    for i in range(5):
        opt.zero_grad()
        scaler.scale(sum((p * w).square().sum() for p, w in zip(params, weights))).backward()
        skip = i in (2, 3)
        if skip:
            params[0].grad.view(-1)[0] = float("inf")
        before = (_snapshot(opt, params), copy.deepcopy(ema.module.state_dict()), ema.num_updates)
        scaler.step(opt)
        scaler.update()
        after = (_snapshot(opt, params), copy.deepcopy(ema.module.state_dict()), ema.num_updates)
        if skip:
            assert_same_values(before, after, "skipped step")
        else:
            assert not torch.equal(before[0][0], after[0][0]), "a step that was not skipped changed nothing"
    assert ema.num_updates == 3 and scaler.get_scale() == 2.0**6


_TWINS = {name: kw for name, kw in reversed(CONFIGS)}  # torch.optim's twins: a configuration each (the first)


_RESUME_CASES = [(name, dtype) for name in NAMES + [n for n in _TWINS if n not in NAMES]
                 for dtype in (torch.float32, torch.bfloat16, torch.float16)]
_RESUME_CASES += [(name, "bf16-states") for name in _TWINS]  # float32 parameters, state_dtype=torch.bfloat16


@pytest.mark.parametrize("name,dtype", _RESUME_CASES,
                         ids=[f"{n}-{str(d).replace('torch.', '')}" for n, d in _RESUME_CASES])
def test_state_dict_resumes_bit_exactly(name: str, dtype: torch.dtype | str) -> None:
    """state_dict() of a stepped optimizer (through torch.save) loaded into a fresh one on copies of the
    parameters: the two continue bit for bit (stochastic rounding's bits drawn alike), and the fresh one's
    state_dict is the original's. For float16 / bfloat16 parameters torch's load_state_dict casts every state
    to the parameter's dtype; the resumed run must not be the less exact for it (NAdam's mu_product and ASGD's
    eta / mu could not be stepped at all after that cast)."""
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}]
        without_sr = ("Muon", "Adafactor")  # (they refuse stochastic_rounding)
        extra: dict[str, Any] = {}
        if dtype == torch.bfloat16 and CLASS_OF.get(name, name) not in without_sr:
            extra = dict(stochastic_rounding=True)
        if dtype == "bf16-states":
            extra = dict(state_dtype=torch.bfloat16)
        if name in REGISTRY:
            return _make(name, groups, max_grad_norm=1.0, **extra)
        return getattr(fusedtrain.optim, name)(groups, **{**_TWINS[name], **extra}, max_grad_norm=1.0)

    param_dtype = torch.float32 if dtype == "bf16-states" else dtype
    params = [nn.Parameter(p.detach().to(param_dtype)) for p in _params(name if name in REGISTRY else "Lion")]
    opt = make(params)
    for i in range(2):
        _grads(params, i)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make(params2)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    if dtype == torch.float32:
        assert_same_values(opt.state_dict(), opt2.state_dict(), "loaded state_dict")
    for i in range(2, 5):
        _grads(params, i)
        _grads(params2, i)
        torch.manual_seed(i)
        opt.step()
        torch.manual_seed(i)
        opt2.step()
    assert_same_values(_snapshot(opt, params), _snapshot(opt2, params2), "resumed vs original")


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_mid_training(name: str) -> None:
    """A group added after two steps (the cached plan must take it): its parameters step as under an optimizer
    of their own, created then; the first group's continue as if nothing had been added."""
    params = _params(name)
    first, second = params[:2], params[2:]
    alone_first = [nn.Parameter(p.detach().clone()) for p in first]
    alone_second = [nn.Parameter(p.detach().clone()) for p in second]
    opt = _make(name, [{"params": first}])
    ref_first = _make(name, [{"params": alone_first}])
    for i in range(2):
        _grads(first, i)
        _grads(alone_first, i)
        opt.step()
        ref_first.step()
    opt.add_param_group({"params": second})
    if hasattr(opt, "train"):
        opt.train()
    ref_second = _make(name, [{"params": alone_second}])
    for i in range(2, 5):
        _grads(params, i)
        _grads(alone_first + alone_second, i)
        opt.step()
        ref_first.step()
        ref_second.step()
    assert_same_values([p.detach() for p in params], [p.detach() for p in alone_first + alone_second],
                       "after add_param_group")


def _through_bytes(state_dict: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n][1] is not None])
def test_checkpoints_move_to_the_reference_and_back(name: str) -> None:
    """A fusedtrain checkpoint loads into the reference implementation (timm, schedulefree, torch), which
    continues as fusedtrain does; the reference's checkpoint of that run loads back and continues too (e.g.
    LAMB: fusedtrain's per-parameter step counters and timm's per-group one)."""
    pa = _params(name)
    a = _make(name, pa)
    for i in range(2):
        _grads(pa, i)
        a.step()
    for first, make in ((2, _reference), (4, _make)):  # to the reference, then back
        pb = [nn.Parameter(p.detach().clone()) for p in pa]
        b = make(name, pb)
        b.load_state_dict(_through_bytes(a.state_dict()))
        for i in range(first, first + 2):
            _grads(pa, i)
            _grads(pb, i)
            a.step()
            b.step()
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
        pa, a = pb, b


@pytest.mark.parametrize("name", [n for n in NAMES if n not in CLASS_OF or n in (
    "Adam-8bit", "Adam-4bit", "Lamb-8bit", "ScheduleFreeAdamW-8bit", "Muon-8bit")])
def test_compiled_training_step_equals_eager(name: str) -> None:
    """A training step (zero_grad, forward, backward, step) under torch.compile (aot_eager: the step's traced
    path, Note [step plan]'s fallback) gives eager's parameters after three steps."""
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        params = _params(name)
        weights = [torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) for p in params]
        opt = _make(name, params)

        def train_step() -> None:
            opt.zero_grad()
            sum((p * w).sin().sum() for p, w in zip(params, weights)).backward()
            opt.step()

        fn = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        for _ in range(3):
            fn()
        runs.append([p.detach().clone() for p in params])
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-6)


def _any(name: str, params: Any) -> torch.optim.Optimizer:
    """An optimizer of the registry here, or one of torch's twins with its first configuration."""
    if name in REGISTRY:
        return _make(name, params)
    return getattr(fusedtrain.optim, name)(params, **_TWINS[name])


_ALL = NAMES + [n for n in _TWINS if n not in NAMES]


@pytest.mark.parametrize("name", _ALL)
def test_step_wrapper_is_torchs(name: str) -> None:
    """Note [the step's wrapper]: a fusedtrain class's step runs the global and own step hooks in torch.optim's
    order (global pre, own pre, the step, own post, global post), a pre hook's (args, kwargs) replace the
    step's (a closure it hands is called), a bad pre hook result is refused before anything changes, the
    profiler records one "Optimizer.step#<class>.step" range per step, and grad mode is restored, also after a
    refused step."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    def run(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[str]:
        calls: list[str] = []
        handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
                   opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
                   opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
                   register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
        try:
            _grads(params, 0)
            opt.step()
        finally:
            for h in handles:
                h.remove()
        return calls

    params = _params(name if name in REGISTRY else "Lion")
    opt = _any(name, params)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.SGD(ref_params, lr=0.1)
    assert run(opt, params) == run(ref, ref_params) == ["global pre", "pre", "post", "global post"]

    # a pre hook hands a closure: the step calls it (with grad mode on) and returns its loss
    seen: list[bool] = []

    def closure() -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        return torch.tensor(2.5)

    handle = opt.register_step_pre_hook(lambda o, a, k: ((a[0],), {"closure": closure}))
    _grads(params, 1)
    assert float(opt.step()) == 2.5 and seen == [True]
    handle.remove()

    # a pre hook's bad result: refused before the step; nothing changes, grad mode is restored
    handle = opt.register_step_pre_hook(lambda o, a, k: "not a tuple")
    before = _snapshot(opt, params)
    _grads(params, 2)
    for enabled in (True, False):
        with torch.set_grad_enabled(enabled):
            with pytest.raises(RuntimeError, match="must return None or a tuple of"):
                opt.step()
            assert torch.is_grad_enabled() is enabled
    assert_same_values(before, _snapshot(opt, params), "refused step")
    handle.remove()

    # grad mode: restored after the step
    inside: list[bool] = []
    handle = opt.register_step_post_hook(lambda o, a, k: inside.append(torch.is_grad_enabled()))
    for enabled in (True, False):
        with torch.set_grad_enabled(enabled):
            opt.step()
            assert torch.is_grad_enabled() is enabled
    handle.remove()
    assert inside == [True, False]  # hooks run outside the step's no-grad region, as torch's do

    # the profiler's range, once per step, named as torch names it
    label = f"Optimizer.step#{type(opt).__name__}.step"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(2):
            _grads(params, 3 + i)
            opt.step()
    assert [e.name for e in prof.events()].count(label) == 2
