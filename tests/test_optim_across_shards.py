"""Per-tensor sums across DTensor shards (Note [sums across shards] in csrc/include/fusedtrain/work.h), in this
process on a one-rank gloo group: which rows the step hands to the reduction (every parameter of the segment, empty
shards as zero rows, replicated ones left out), how many all-reduces a step makes, and that the step then equals the
same optimizer on plain tensors. The two-rank runs against the unsharded model are in tests/test_distributed.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import fusedtrain
from _helpers import assert_same_values, snapshot

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

# (optimizer, options, all-reduces per step): LAMB with caution counts the mask then reduces the norms.
CASES: list[tuple[str, dict[str, Any], int]] = [
    ("Lamb", dict(lr=0.05, weight_decay=0.1), 1),
    ("Lamb", dict(lr=0.05, weight_decay=0.1, caution=True), 2),
    ("Lamb", dict(lr=0.05, weight_decay=0.0, caution=True), 1),  # the mask count only
    ("Lamb", dict(lr=0.05, weight_decay=0.0), 0),  # no adaptation, no caution: one pass, nothing to reduce
    ("Lars", dict(lr=0.1, momentum=0.9, weight_decay=0.01), 1),
    ("Lion", dict(lr=0.01, caution=True), 1),
    ("Lion", dict(lr=0.01), 0),
]
IDS = [f"{name}-" + "-".join(f"{k}={v}" for k, v in kw.items() if k != "lr") for name, kw, _ in CASES]
SHAPES = [(7,), (0,), (33, 17), (4097,), (1,)]


@pytest.fixture(scope="module")
def mesh() -> Iterator[Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _params(mesh: Any, placement: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """float64 DTensor parameters (with DTensor gradients) and plain twins of the same values."""
    from torch.distributed.tensor import distribute_tensor
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    sharded = [torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [placement])) for v in values]
    plain = [torch.nn.Parameter(v.clone()) for v in values]
    return sharded, plain


def _grads(sharded: list[torch.Tensor], plain: list[torch.Tensor], mesh: Any, placement: Any, seed: int) -> None:
    from torch.distributed.tensor import distribute_tensor
    g = torch.Generator().manual_seed(seed)
    for s, p in zip(sharded, plain):
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        s.grad = distribute_tensor(grad.clone(), mesh, [placement])
        p.grad = grad


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_rank_reduction_rows_and_count(mesh: Any, case: tuple[str, dict[str, Any], int],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The reduced vector has one row per parameter, in order (an empty shard: a zero row), holding the local
    shard's sums and element count; each step makes the expected number of all-reduces; the parameters and states
    equal the plain-tensor run bit for bit (one rank: the sums are the whole tensors')."""
    from torch.distributed.tensor import Shard
    name, kw, per_step = case
    sharded, plain = _params(mesh, Shard(0))
    cls = getattr(fusedtrain.optim, name)
    a, b = cls(sharded, **kw), cls(plain, **kw)
    seen: list[torch.Tensor] = []
    real = torch.distributed.all_reduce

    def spy(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if t.dim() == 2:  # (LAMB's global gradient norm, max_grad_norm=1.0, reduces a 0-dim tensor)
            seen.append(t.clone())
        return real(t, *args, **kwargs)

    monkeypatch.setattr(torch.distributed, "all_reduce", spy)
    for step in range(3):
        _grads(sharded, plain, mesh, Shard(0), step)
        a.step()
        b.step()
    assert len(seen) == 3 * per_step
    for rows in seen:
        assert rows.shape == (len(SHAPES), 3) and rows.dtype == torch.float64
        assert rows[:, 2].tolist() == [float(torch.Size(s).numel()) for s in SHAPES]
        assert rows[1].tolist() == [0.0, 0.0, 0.0]
    for s, p in zip(sharded, plain):
        assert torch.equal(s.to_local(), p.detach())
        for key, value in b.state[p].items():
            mine = a.state[s][key]
            assert torch.equal(mine.to_local() if hasattr(mine, "to_local") else mine, value), key


def test_one_rank_lars_rows_hold_the_norms(mesh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """LARS reduces (|p|^2, |g|^2, numel) of each tensor before its update: the rows are exactly those sums."""
    from torch.distributed.tensor import Shard
    sharded, plain = _params(mesh, Shard(0))
    opt = fusedtrain.optim.Lars(sharded, lr=0.1, weight_decay=0.01)
    _grads(sharded, plain, mesh, Shard(0), 7)
    seen: list[torch.Tensor] = []
    real = torch.distributed.all_reduce

    def spy(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(t.clone())
        return real(t, *args, **kwargs)

    monkeypatch.setattr(torch.distributed, "all_reduce", spy)
    opt.step()
    (rows,) = seen
    expected = torch.tensor([[float(p.detach().square().sum()), float(p.grad.square().sum()), p.numel()]
                             for p in plain], dtype=torch.float64)
    torch.testing.assert_close(rows, expected, rtol=1e-14, atol=0)


def test_one_rank_replicated_parameters_reduce_nothing(mesh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicated DTensors are whole on every rank: no all-reduce, and the step equals the plain one."""
    from torch.distributed.tensor import Replicate
    sharded, plain = _params(mesh, Replicate())
    calls: list[int] = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: calls.append(1))
    a = fusedtrain.optim.Lamb(sharded, lr=0.05, weight_decay=0.1, caution=True)
    b = fusedtrain.optim.Lamb(plain, lr=0.05, weight_decay=0.1, caution=True)
    for step in range(2):
        _grads(sharded, plain, mesh, Replicate(), step)
        a.step()
        b.step()
    assert not calls
    for s, p in zip(sharded, plain):
        assert torch.equal(s.to_local(), p.detach())


@pytest.mark.parametrize("name", ["Lamb", "Lars", "Lion"])
def test_traced_step_refuses_sharded_parameters(mesh: Any, name: str) -> None:
    """The step under torch.compile (one step_ op per segment) cannot reduce across shards: refused before
    anything is written, naming the way out; Lion without caution reduces nothing and is not refused."""
    from torch.distributed.tensor import Shard
    sharded, plain = _params(mesh, Shard(0))
    kw = dict(lr=0.01, caution=True) if name == "Lion" else dict(lr=0.01, weight_decay=0.1)
    opt = getattr(fusedtrain.optim, name)(sharded, **kw)
    _grads(sharded, plain, mesh, Shard(0), 0)
    before = snapshot(opt, sharded)
    with pytest.raises(RuntimeError, match="torch.compile"):
        opt._step_traced()
    assert_same_values(before, snapshot(opt, sharded))
    if name == "Lion":
        opt.param_groups[0]["caution"] = False
        twin = fusedtrain.optim.Lion(plain, lr=0.01)
        opt._step_traced()
        twin.step()
        for s, p in zip(sharded, plain):
            assert torch.equal(s.to_local(), p.detach())


@pytest.mark.parametrize("name", ["Lamb", "Lion"])
def test_partial_parameters_refused(mesh: Any, name: str) -> None:
    """A Partial DTensor parameter holds pending sums, not elements: its norms cannot be taken; refused before any
    state is made."""
    from torch.distributed.tensor import DTensor, Partial
    p = torch.nn.Parameter(DTensor.from_local(torch.randn(5, dtype=torch.float64), mesh, [Partial()], run_check=False))
    p.grad = DTensor.from_local(torch.randn(5, dtype=torch.float64), mesh, [Partial()], run_check=False)
    kw = dict(caution=True) if name == "Lion" else {}
    opt = getattr(fusedtrain.optim, name)([p], **kw)
    before = p.to_local().clone()
    with pytest.raises(RuntimeError, match="Partial"):
        opt.step()
    assert torch.equal(p.to_local(), before) and not opt.state[p]


@pytest.mark.parametrize("name,kw", [("Adafactor", {}), ("Muon", {}), ("Muon", dict(state_bits=8, min_8bit_size=0))])
def test_whole_matrix_optimizers_refuse_dtensor_parameters_and_write_nothing(mesh: Any, name: str,
                                                                          kw: dict[str, Any]) -> None:
    """Adafactor's factors and Muon's Newton-Schulz need whole matrices, which these implementations do not gather
    across shards (torch's Adafactor fails on DTensors too): a clear error names the parameter, before any write,
    and leaves no state behind."""
    from torch.distributed.tensor import Shard
    if not hasattr(fusedtrain.optim, name):
        pytest.skip(f"fusedtrain.optim.{name} needs a newer torch")
    sharded, plain = _params(mesh, Shard(0))
    _grads(sharded, plain, mesh, Shard(0), seed=3)
    opt = getattr(fusedtrain.optim, name)([plain[2], sharded[2]], lr=0.01, **kw)
    before = [p.detach().full_tensor().clone() if hasattr(p, "full_tensor") else p.detach().clone()
              for p in (plain[2], sharded[2])]
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\] is a DTensor"):
        opt.step()
    after = [plain[2].detach(), sharded[2].detach().full_tensor()]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert len(opt.state) == 0
