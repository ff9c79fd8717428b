"""Shared helpers of the optimizer tests: parameter sets, paired runs against torch.optim."""

from __future__ import annotations

import copy
import functools
import inspect
import io
import pickle
from typing import Any

import pytest
import torch

import fusedtrain

OPTIMIZERS = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam"]

# (optimizer, options): every option combination that changes the kernel's arithmetic.
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, weight_decay=0.01, maximize=True)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1, maximize=True)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, centered=True, weight_decay=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, maximize=True)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, alpha=0.9)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), maximize=True, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, amsgrad=True, maximize=True, weight_decay=0.05)),
    ("NAdam", dict(lr=0.01)),
    ("NAdam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, momentum_decay=0.01, maximize=True)),
    ("NAdam", dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True)),
]

# torch.optim's other element-wise optimizers (issue 15). RAdam: 12 steps cross its rectification threshold
# (rho_t > 5 from step 6); ASGD with t0=5: the averaging (mu < 1) starts at step 7.
OPTIMIZERS += ["RAdam", "Adamax", "Adadelta", "ASGD", "Rprop"]
CONFIGS += [
    ("RAdam", dict(lr=0.01)),
    ("RAdam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1, maximize=True)),
    ("RAdam", dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True)),
    ("Adamax", dict(lr=0.01)),
    ("Adamax", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1, maximize=True)),
    ("Adadelta", dict(lr=1.0)),
    ("Adadelta", dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.1, maximize=True)),
    ("ASGD", dict(lr=0.01)),
    ("ASGD", dict(lr=0.01, lambd=0.01, alpha=0.6, t0=5, weight_decay=0.1, maximize=True)),
    ("Rprop", dict(lr=0.01)),
    ("Rprop", dict(lr=0.01, etas=(0.3, 1.5), step_sizes=(1e-3, 0.05), maximize=True)),
]


def config_id(cfg: tuple[str, dict[str, Any]]) -> str:
    name, kw = cfg
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items() if k != "lr")


def make_params(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Odd sizes, empty, 0-dim, a transposed (dense, non-contiguous) and a strided (not dense) parameter."""
    ps = [torch.randn(s, dtype=torch.float64).to(dtype) for s in [(1,), (7,), (4097,), (0,), (), (33, 17)]]
    ps.append(torch.randn(9, 6, dtype=torch.float64).to(dtype).t())
    ps = [p.to(device) for p in ps]
    ps.append(torch.randn(8, 10, dtype=torch.float64).to(dtype).to(device)[:, ::3])
    return [p.requires_grad_() for p in ps]


def make_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh random gradients; the (33, 17) parameter gets a transposed-layout gradient."""
    grads = []
    for p in params:
        if p.shape == (33, 17) and p.is_contiguous():
            g = torch.randn(17, 33, dtype=torch.float64).to(p.dtype).to(p.device).t()
        else:
            wide = torch.complex128 if p.is_complex() else torch.float64
            g = torch.randn(p.shape, dtype=wide).to(p.dtype).to(p.device)
            if p.dim() == 2 and not p.is_contiguous() and p.stride(0) == 1:
                g = g.t().contiguous().t()  # same layout as a transposed parameter
        grads.append(g)
    return grads


def clone_params(params: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def ours(name: str) -> type[torch.optim.Optimizer]:
    return getattr(fusedtrain.optim, name)


def theirs(name: str) -> type[torch.optim.Optimizer]:
    return getattr(torch.optim, name)


_TORCH_ADAM_DECOUPLED = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam.__init__).parameters


def torch_kwargs(name: str, kw: dict[str, Any]) -> dict[str, Any]:
    """torch.optim keyword arguments of a config (single-tensor reference implementation).

    torch < 2.7 has no Adam(decoupled_weight_decay=...): such a config has no reference there and the
    test is skipped (the AdamW configs cover the same arithmetic)."""
    if name == "Adam" and kw.get("decoupled_weight_decay") and not _TORCH_ADAM_DECOUPLED:
        pytest.skip("torch.optim.Adam of this torch version has no decoupled_weight_decay")
    out = dict(kw)
    out["foreach"] = False
    return out


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype).clone()


def step_together(runs: list[tuple[torch.optim.Optimizer, list[torch.Tensor]]], n_steps: int,
                  after_step: Any = None) -> None:
    """n_steps times: the same fresh random gradients (cast to each run's dtype) for every
    (optimizer, params) run, then one step of each; ``after_step()`` runs after each round."""
    for _ in range(n_steps):
        grads = make_grads(runs[0][1])
        for opt, params in runs:
            set_grads(params, grads)
            opt.step()
        if after_step is not None:
            after_step()


def assert_close_ulps(x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float) -> None:
    """assert_close with atol scaled by the tensor's largest magnitude: a few ulps of the operands, so a
    state that cancels to near zero (momentum buffers) is judged by the size of what cancelled."""
    y = y.detach().to(x.dtype)
    scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
    torch.testing.assert_close(x.detach(), y, rtol=rtol, atol=atol * scale)


def assert_same_state(a: torch.optim.Optimizer, pa: list[torch.Tensor], b: torch.optim.Optimizer,
                      pb: list[torch.Tensor], **tol: float) -> None:
    for x, y in zip(pa, pb):
        assert_close_ulps(x, y, **tol)
        sx, sy = a.state[x], b.state[y]
        assert set(sx) == set(sy), (set(sx), set(sy))
        for key in sx:
            vx, vy = sx[key], sy[key]
            if key == "step":
                assert float(vx) == float(vy)
                assert vx.device.type == "cpu" and vx.dtype == vy.dtype
            else:
                assert_close_ulps(vx, vy, **tol)


def snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[str, Any]:
    """Everything a step could touch, cloned: the parameters' values and gradients, every state entry of
    every parameter (step counters included), the number of state entries, and the param groups'
    hyperparameters. Compare two with :func:`assert_same_values` ("a refused call mutates nothing")."""
    def clone(v: Any) -> Any:
        return v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)

    return dict(
        params=[p.detach().clone() for p in params],
        grads=[None if p.grad is None else p.grad.detach().clone() for p in params],
        state=[{k: clone(v) for k, v in opt.state[p].items()} if p in opt.state else None for p in params],
        n_state=len(opt.state),
        groups=[{k: clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
    )


def assert_same_values(a: Any, b: Any, where: str = "") -> None:
    """Recursive equality of nested dicts/lists/tuples of tensors (bitwise, NaN equal to NaN, same dtype
    and shape; sparse tensors by value) and plain values; the message names the path of the difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_sparse or b.is_sparse:
            assert a.is_sparse == b.is_sparse, where
            a, b = a.to_dense(), b.to_dense()
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, a.keys(), getattr(b, "keys", lambda: b)())
        for k in a:
            assert_same_values(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_values(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def run_grads(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    """One ``opt.step()`` per entry of ``grads``, with a copy of its gradients set on ``params`` first."""
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def assert_cuda_matches_cpu_8bit(cpu: list[torch.Tensor], gpu: list[torch.Tensor], opts: list[Any],
                                 state_atol: float = 0.0) -> None:
    """float64 parameters and their states after the same steps on the CPU (``opts[0]``) and CUDA (``opts[1]``):
    parameters and float states to 1e-12; 8-bit codes equal but for rare neighbours (a bias correction's pow may
    differ by an ulp between the devices: a value on a midpoint flips), at most 1 % of them one code apart."""
    from fusedtrain.optim import _quant
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-12, atol=1e-14)
        for key, value in opts[0].state[p].items():
            other = opts[1].state[q][key].cpu()
            if _quant.is_codes(value):
                diff = (other.long() - value.long()).abs()
                assert diff.numel() == 0 or (int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01), key
            else:
                torch.testing.assert_close(other, value, rtol=1e-12, atol=state_atol)


def step_scaled_and_clipped(a: torch.optim.Optimizer, pa: list[torch.Tensor], b: torch.optim.Optimizer,
                            pb: list[torch.Tensor], max_norm: float, steps: int = 3) -> None:
    """``steps`` steps of ``a`` (made with ``max_grad_norm=max_norm``) on gradients multiplied by a GradScaler
    scale of 1024 handed to it as ``grad_scale`` / ``found_inf``, and of ``b`` on the same gradients unscaled and
    clipped by ``torch.nn.utils.clip_grad_norm_``: the two must then agree."""
    scale = torch.tensor(1024.0)
    for _ in range(steps):
        grads = [torch.randn(p.shape) for p in pa]
        for p, q, g in zip(pa, pb, grads):
            p.grad, q.grad = g * scale, g.clone()
        a.grad_scale, a.found_inf = scale, torch.tensor(0.0)  # type: ignore[attr-defined]
        a.step()
        torch.nn.utils.clip_grad_norm_(pb, max_norm)
        b.step()


def step_cpu_and_cuda(cls: Any, cpu: list[torch.Tensor], kw: dict[str, Any], steps: int = 3, seed: int = 17
                      ) -> tuple[list[torch.Tensor], list[torch.optim.Optimizer]]:
    """CUDA twins of the CPU parameters ``cpu`` and one ``cls(params, **kw)`` per device, stepped ``steps``
    times with the same float64-drawn gradients; returns the CUDA parameters and the two optimizers."""
    gpu = [p.detach().cuda().requires_grad_() for p in cpu]
    opts = [cls(ps, **kw) for ps in (cpu, gpu)]
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, q in zip(cpu, gpu):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            q.grad = p.grad.cuda()
        for opt in opts:
            opt.step()
    return gpu, opts


def roundtrip(obj: Any, how: str) -> Any:
    """``obj`` through ``copy.deepcopy``, ``pickle`` or ``torch.save`` / ``torch.load`` (``how``)."""
    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ---------------------------------------------------------------------------------- low-bit convergence
# The digits MLP of the low-bit convergence tests (test_optim_8bit.py, test_optim_4bit.py; the same run as
# benchmarks/convergence_lowbit.py): 64-256-256-10, AdamW lr 2e-3, weight decay 1e-2, 100 batches of 128 drawn
# with torch.Generator().manual_seed(order), one initialization for every run.
DIGITS_ORDERS = (1, 2, 3, 4, 5)


@functools.cache
def digits_loss(state_bits: int, order: int, steps: int = 100, optimizer: str = "AdamW") -> float:
    """The whole-set cross-entropy after training the digits MLP with ``fusedtrain.optim.<optimizer>(state_bits=...)``
    (AdamW by default; Muon trains the two hidden matrices, its AdamW groups the rest) on the batch order
    ``order``; cached, so the float32 runs serve every test. A schedule-free optimizer trains in train mode and is
    evaluated in eval mode (at x)."""
    sklearn = pytest.importorskip("sklearn.datasets")
    xs, ys = sklearn.load_digits(return_X_y=True)
    x, y = torch.tensor(xs, dtype=torch.float32) / 16.0, torch.tensor(ys)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    g = torch.Generator().manual_seed(order)
    batches = [torch.randint(0, x.shape[0], (128,), generator=g) for _ in range(steps)]
    if optimizer == "Muon":
        hidden = [model[0].weight, model[2].weight]
        rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
        opt: torch.optim.Optimizer = fusedtrain.optim.Muon(
            [dict(params=hidden), dict(params=rest, use_muon=False, lr=2e-3)], lr=0.02, weight_decay=1e-2,
            state_bits=state_bits)
    else:
        opt = getattr(fusedtrain.optim, optimizer)(model.parameters(), lr=2e-3, weight_decay=1e-2,
                                                   state_bits=state_bits)
    schedule_free = hasattr(opt, "eval")
    if schedule_free:
        opt.train()
    for idx in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    if state_bits != 32:  # the hidden matrix's states really are codes
        key, codes = {"Muon": ("momentum_buffer", torch.int8)}.get(
            optimizer, ("exp_avg_sq", torch.uint8) if schedule_free else ("exp_avg", torch.int8))
        assert opt.state[model[2].weight][key].dtype == codes
    if schedule_free:
        opt.eval()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))
