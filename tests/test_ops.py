"""Op-level checks: opcheck, every CPU SIMD copy, thread counts, layouts, CPU == CUDA, functional API."""

from __future__ import annotations

import pytest
import torch

import fusedtrain
from fusedtrain import _build
from fusedtrain.optim import functional as F
from conftest import DEVICES


def _lists(device: str, dtype: torch.dtype, n_states: int, sizes=(7, 4097, 1, 33)) -> list[list[torch.Tensor]]:
    return [[torch.randn(s, device=device, dtype=dtype) for s in sizes] for _ in range(2 + n_states)]


def _steps(n: int) -> list[torch.Tensor]:
    return [torch.tensor(3.0) for _ in range(n)]


def _op_cases(device: str, dtype: torch.dtype):
    step_ = torch.ops.fusedtrain.step_.default
    sgd = [0.9, 0.0, 0.01, 1.0, 0.0, 0.0]  # momentum, dampening, weight_decay, nesterov, maximize, first_step
    p, g, b, e = _lists(device, dtype, 2)
    yield step_, ("sgd", sgd, p, g, b, [], e, [], [], 0.1), dict(ema_weight=0.1)
    p, g = _lists(device, dtype, 0)
    yield step_, ("sgd", [0.0, 0.0, 0.0, 0.0, 1.0, 0.0], p, g, [], [], [], [], [], 0.1), {}
    p, g, s = _lists(device, dtype, 1)
    s = [x.abs() for x in s]
    yield step_, ("adagrad", [0.01, 0.0, 1e-10, 0.0], p, g, s, _steps(4), [], [], [], 0.1), dict(l1=0.01)
    p, g, v, a, m, e = _lists(device, dtype, 4)
    v = [x.abs() + 1 for x in v]
    yield step_, ("rmsprop", [0.99, 1e-8, 0.0, 0.9, 1.0, 0.0], p, g, v + a + m, _steps(4), e, [], [], 0.01), \
        dict(ema_weight=0.01)
    p, g, m, v, vm, e = _lists(device, dtype, 4)
    v, vm = [x.abs() for x in v], [x.abs() for x in vm]
    yield step_, ("adam", [0.9, 0.999, 1e-8, 0.01, 1.0, 0.0, 1.0], p, g, m + v + vm, _steps(4), e, [], [], 1e-3), \
        dict(ema_weight=0.001, grad_scale=torch.tensor(4.0), clip_coef=torch.tensor(0.5))
    p, g, m, v = _lists(device, dtype, 2)
    v = [x.abs() for x in v]
    mu = [torch.tensor(0.9) for _ in p]
    yield step_, ("nadam", [0.9, 0.999, 1e-8, 0.01, 0.004, 0.0, 0.0], p, g, m + v, _steps(4), [], [], mu, 1e-3), {}
    a, p = _lists(device, dtype, 0)
    yield torch.ops.fusedtrain.ema_.default, (a, p, 0.25), {}


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    for op, args, kwargs in _op_cases(device, torch.float32):
        torch.library.opcheck(op, args, kwargs)


def _run_all_optimizers(device: str = "cpu") -> list[torch.Tensor]:
    torch.manual_seed(7)
    out = []
    for name, kw in [("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)), ("Adagrad", {}),
                     ("RMSprop", dict(centered=True, momentum=0.5)), ("Adam", dict(amsgrad=True)),
                     ("AdamW", {})]:
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            # drawn on the CPU so that both devices see the same numbers
            ps = [torch.randn(s, dtype=dtype).to(device).requires_grad_() for s in (100_003, 17, 40_000)]
            opt = getattr(fusedtrain.optim, name)(ps, **kw)
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn(p.shape, dtype=dtype).to(device)
                opt.step()
            out += [p.detach().cpu() for p in ps]
    return out


def _assert_ulps(x: torch.Tensor, y: torch.Tensor, ulps: int) -> None:
    """Within a few units in the last place of the tensor's own dtype (FMA contraction differs)."""
    eps = torch.finfo(x.dtype).eps
    torch.testing.assert_close(x.float(), y.float(), rtol=ulps * eps, atol=ulps * eps)


def test_every_cpu_isa_and_thread_count_gives_the_same_result() -> None:
    lib = _build.library()
    order = ["baseline", "avx2", "avx512"]
    usable = order[: order.index(lib.cpu_isa_detected()) + 1]
    original, threads = lib.cpu_isa(), torch.get_num_threads()
    try:
        lib.set_cpu_isa("baseline")
        torch.set_num_threads(1)
        reference = _run_all_optimizers()
        for isa in usable:
            lib.set_cpu_isa(isa)
            for n in (1, 2):
                torch.set_num_threads(n)
                got = _run_all_optimizers()
                for x, y in zip(got, reference):
                    _assert_ulps(x, y, 4)
    finally:
        lib.set_cpu_isa(original)
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="unknown CPU ISA"):
        lib.set_cpu_isa("sse9")


@pytest.mark.cuda
def test_cuda_matches_cpu() -> None:
    for x, y in zip(_run_all_optimizers("cuda"), _run_all_optimizers("cpu")):
        _assert_ulps(x, y, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_views_and_many_tensors(device: str) -> None:
    """Views at odd offsets take the scalar path; over a thousand tensors span several launches."""
    base = torch.randn(10_001, device=device)
    params = [base[1:5001], base[5001:]] + [torch.randn(int(n), device=device) for n in torch.randint(1, 300, (1500,))]
    grads = [torch.randn_like(p) for p in params]
    ref = [p.clone() - 0.1 * g for p, g in zip(params, grads)]
    F.sgd(params, grads, [], lr=0.1)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_groups_mixed_dtypes(device: str) -> None:
    params = [torch.randn(5, device=device, dtype=dt) for dt in (torch.float32, torch.float64, torch.float32)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.empty_like(p) for p in params]
    expected = [p - 0.1 * g for p, g in zip(params, grads)]
    F.sgd(params, grads, bufs, lr=0.1, momentum=0.9, first_step=True)
    for p, e, b, g in zip(params, expected, bufs, grads):
        torch.testing.assert_close(p, e)
        torch.testing.assert_close(b, g)


def test_op_rejects_mismatched_lists_without_mutation() -> None:
    p, g = [torch.randn(4)], [torch.randn(5)]
    before = p[0].clone()
    sgd = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(RuntimeError, match=r"grads\[0\].*must be Float with the shape and device of params\[0\]"):
        torch.ops.fusedtrain.step_("sgd", sgd, p, g, [], [], [], [], [], 0.1)
    steps = [torch.tensor(0.0)]
    with pytest.raises(RuntimeError, match="keeps 2 state lists"):
        torch.ops.fusedtrain.step_("adam", [0.9, 0.99, 1e-8, 0.0, 0.0, 0.0, 0.0], p, [torch.randn(4)], [], steps,
                                   [], [], [], 0.1)
    with pytest.raises(RuntimeError, match="takes 7 hyperparameters"):
        torch.ops.fusedtrain.step_("adam", [0.9], p, [torch.randn(4)], [], steps, [], [], [], 0.1)
    with pytest.raises(RuntimeError, match="unknown optimizer rule 'adamm'"):
        torch.ops.fusedtrain.step_("adamm", [], p, [torch.randn(4)], [], steps, [], [], [], 0.1)
    # a tensor listed twice, an expanded (overlapping) one: refused before anything is written
    twice = torch.randn(6)
    with pytest.raises(RuntimeError, match=r"params\[1\] and params\[0\] are the same memory"):
        torch.ops.fusedtrain.step_("sgd", sgd, [twice, twice], [torch.randn(6), torch.randn(6)], [], [], [], [], [],
                                   0.1)
    expanded = torch.randn(1).expand(5)
    with pytest.raises(RuntimeError, match="internally overlapping memory"):
        torch.ops.fusedtrain.step_("sgd", sgd, [p[0], expanded], [torch.randn(4), torch.randn(5)], [], [], [], [],
                                   [], 0.1)
    # check_only runs every check and writes nothing
    torch.ops.fusedtrain.step_("adam", [0.9, 0.99, 1e-8, 0.0, 0.0, 0.0, 0.0], p, [torch.randn(4)],
                               [torch.zeros(4), torch.zeros(4)], steps, [], [], [], 0.1, check_only=True)
    assert torch.equal(p[0], before) and float(steps[0]) == 0.0


def test_rules_declare_their_hyperparameters() -> None:
    rules = fusedtrain._ops.rules()
    assert {"sgd", "adagrad", "rmsprop", "adam", "ema"} <= set(rules)
    assert rules["adam"]["hyper"] == ["beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize",
                                      "decoupled_weight_decay"]
    assert rules["adam"]["counts_steps"] and not rules["sgd"]["counts_steps"]
    assert fusedtrain._ops.hyper_list("adam", dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=True,
                                                   maximize=False, decoupled_weight_decay=True, extra=5)) == \
        [0.9, 0.99, 1e-8, 0.0, 1.0, 0.0, 1.0]


def test_build_info() -> None:
    info = fusedtrain.build_info()
    assert set(info) >= {"version", "torch_built", "torch_runtime", "cuda", "cuda_archs", "cpu_isa", "threads"}
    assert info["cpu_isa"] in ("avx512", "avx2", "baseline")
    assert info["threads"] == torch.get_num_threads()
    if torch.version.cuda and info["cuda"]:
        assert info["cuda_archs"]
