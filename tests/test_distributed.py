"""The fusedtrain optimizers, clipping and EMA inside torch.distributed: DDP, FSDP2 (DTensor parameters),
ZeroRedundancyOptimizer and torch.distributed.checkpoint.

One run of tests/_dist_worker.py per device does every case (CPU: 2 processes on gloo; CUDA: 1 process on
NCCL, since the GPU check has one GPU and NCCL takes one GPU per rank). Each test then compares a case's
results with the single-process run of the same model, data and optimizer, computed here: the engines
must give the same parameters, optimizer state and gradient norms as one process with the full batch.
Everything runs in float64, so a mismatch beyond ~1e-11 is a wrong shard, state or norm, not rounding.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import fusedtrain
from _dist_worker import (CONFIGS, DTENSOR_8BIT, DTENSOR_8BIT_KW, MAX_NORM, RESUME_AT, STEPS, backward,
                          dtensor_8bit_data, full, make_data, make_model, make_optimizer)
from conftest import DEVICES
from fusedtrain.ensemble import EMA

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

WORKER = Path(__file__).with_name("_dist_worker.py")
TIMEOUT_S = 300
RTOL, ATOL = 1e-11, 1e-13  # measured: <= 6e-14 relative after 5 steps (AdamW with l1), 2 CPU ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=DEVICES)
def dist(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Runs every distributed case once per device; returns {"device", "dir", "ranks": [results per rank]}."""
    device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    world, backend = (2, "gloo") if device == "cpu" else (1, "nccl")
    out = tmp_path_factory.mktemp(f"dist-{device}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(fusedtrain.__file__).parents[1]), str(WORKER.parent), os.environ.get("PYTHONPATH", "")]))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(port), backend, device, str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if any(codes):
        pytest.fail(f"distributed workers exited with {codes}:\n" + "\n".join(log[-4000:] for log in logs))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return {"device": device, "dir": out, "ranks": ranks, "world": world}


def _case(dist: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """A case's results on every rank (fails with the worker's traceback)."""
    if key.startswith(("fsdp", "dcp/fsdp", "norm", "partial")) and dist["ranks"][0]["fsdp_skip"]:
        pytest.skip(dist["ranks"][0]["fsdp_skip"])
    out = [r[key] for r in dist["ranks"]]
    errors = [f"rank {r}, case {key}:\n{res['error']}" for r, res in enumerate(out) if "error" in res]
    if errors:
        pytest.fail("\n".join(errors))
    return out


def _close(actual: Any, expected: Any, what: str = "") -> None:
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), what
        for k in expected:
            _close(actual[k], expected[k], f"{what}[{k}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            _close(a, e, f"{what}[{i}]")
    else:
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _single(name: str, kw: dict[str, Any], device: str, *, fused_clip: bool = True, clip_before: bool = False,
            ema_decay: float | None = 0.8, steps: int = STEPS) -> dict[str, Any]:
    """The reference: one process, the full batch, the same optimizer."""
    model = make_model(device)
    ema = EMA(model, decay=ema_decay) if ema_decay is not None else None
    opt = make_optimizer(name, model.parameters(), max_grad_norm=MAX_NORM if fused_clip else None, ema=ema, **kw)
    norms = []
    for x, y in make_data(device)[:steps]:
        backward(model, x, y)
        if clip_before:
            norms.append(full(fusedtrain.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        if fused_clip:
            norms.append(full(opt.last_grad_norm))
        opt.zero_grad()
    params = list(model.parameters())
    assert all(n > MAX_NORM for n in norms), "the reference must clip at every step, or clipping is untested"
    return {"params": [full(p) for p in params], "norms": norms, "model": model,
            "state": [{k: full(v) for k, v in opt.state[p].items() if isinstance(v, Tensor)} for p in params],
            "ema": [full(a) for a in ema._averages] if ema is not None else None}


CFG_IDS = [name for name, _ in CONFIGS]


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_ddp_matches_single_process(dist: dict[str, Any], cfg: tuple[str, dict[str, Any]]) -> None:
    name, kw = cfg
    ref = _single(name, kw, dist["device"], ema_decay=None)
    for res in _case(dist, f"ddp/{name}"):
        _close(res["params"], ref["params"], "params")
        _close(res["state"], ref["state"], "state")
        _close(res["norms"], ref["norms"], "max_grad_norm's norm")


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_fsdp2_matches_single_process(dist: dict[str, Any], cfg: tuple[str, dict[str, Any]]) -> None:
    """Sharded parameters (uneven and empty shards), state, max_grad_norm's norm across shards and the EMA
    fused into the step equal the single-process run."""
    name, kw = cfg
    ref = _single(name, kw, dist["device"])
    results = _case(dist, f"fsdp/{name}")
    for res in results:
        assert all(res["is_dtensor"]), "fully_shard should make every parameter a DTensor"
        assert res["layout_ok"], "optimizer state must be DTensors sharded like their parameter"
        assert res["ema_module_is_none"]
        _close(res["params"], ref["params"], "params")
        _close(res["state"], ref["state"], "state")
        _close(res["norms"], ref["norms"], "max_grad_norm's norm")
        _close(res["ema"], ref["ema"], "ema averages")
    if dist["world"] == 2:
        assert 0 in results[1]["local_numel"], "the model should give rank 1 an empty shard"


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_zero_matches_single_process(dist: dict[str, Any], cfg: tuple[str, dict[str, Any]]) -> None:
    """ZeroRedundancyOptimizer(optimizer_class=fusedtrain.optim.X) with clip_grad_norm_ before the step."""
    name, kw = cfg
    ref = _single(name, kw, dist["device"], fused_clip=False, clip_before=True, ema_decay=None)
    results = _case(dist, f"zero/{name}")
    for res in results:
        _close(res["params"], ref["params"], "params")
        _close(res["norms"], ref["norms"], "clip_grad_norm_'s norm")
    n_params = len(ref["params"])
    assert sum(res["local_params"] for res in results) == n_params
    if dist["world"] > 1:
        assert all(0 < res["local_params"] < n_params for res in results), "ZeRO should partition the parameters"


def test_zero_refuses_partition_only_options(dist: dict[str, Any]) -> None:
    """max_grad_norm= / ema= forwarded by ZeRO would see one partition: refused with the way out."""
    for res in _case(dist, "zero_refuses"):
        assert len(res["errors"]) == 2
        for key, err in zip(("max_grad_norm", "ema"), res["errors"]):
            assert key in err and "clip_grad_norm_" in err and "ema.update()" in err, err


def test_zero_checkpoint_resumes(dist: dict[str, Any]) -> None:
    """consolidate_state_dict + load_state_dict: the resumed run follows the uninterrupted one."""
    ref = _single("Adam", dict(lr=0.05, amsgrad=True), dist["device"], fused_clip=False, ema_decay=None)
    for res in _case(dist, "zero_checkpoint"):
        _close(res["params"], ref["params"], "params")
        torch.testing.assert_close(res["resumed"], res["params"], rtol=0, atol=1e-14)


DCP_CASES = ["ddp/Adam", "fsdp/Adam", "fsdp/Adagrad", "fsdp/SGD", "fsdp/AdamW8bit"]


@pytest.mark.parametrize("case", DCP_CASES)
def test_dcp_round_trip_resumes(dist: dict[str, Any], case: str) -> None:
    """get_state_dict -> dcp.save -> dcp.load -> set_state_dict into a fresh model and optimizer (and the
    EMA's state): the resumed run reaches the uninterrupted run's parameters and averages."""
    engine, name = case.split("/")
    kw = dict(CONFIGS)[name]
    ref = _single(name, kw, dist["device"], fused_clip=False)
    for res in _case(dist, f"dcp/{case}"):
        _close(res["params"], ref["params"], "params")
        _close(res["ema"], ref["ema"], "ema")
        torch.testing.assert_close(res["resumed"], res["params"], rtol=0, atol=1e-14)
        torch.testing.assert_close(res["ema_resumed"], res["ema"], rtol=0, atol=1e-14)
        torch.testing.assert_close(res["loaded_state"][0], res["saved_first_state"], rtol=0, atol=0)
        assert res["step_is_cpu"]
        if name.endswith("8bit"):  # the codes and scales came back as saved, and the resumed run is the same run
            assert res["saved_first_state"]["exp_avg"].dtype == torch.int8
            assert res["saved_first_state"]["exp_avg_absmax"].dtype == torch.float32
            torch.testing.assert_close(res["resumed"], res["params"], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("name", ["Adam", "AdamW8bit"])
def test_dcp_fsdp_checkpoint_reshards_to_one_process(dist: dict[str, Any], name: str) -> None:
    """The FSDP2 checkpoint (DTensor state of 2 ranks; with 8-bit states, codes and absmax sharded by rows)
    loads into an unsharded model and a fusedtrain optimizer in this process, and the run resumes on the
    single-process trajectory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    saved = _case(dist, f"dcp/fsdp/{name}")[0]["saved_first_state"]
    kw = dict(CONFIGS)[name]
    device = dist["device"]
    ref = _single(name, kw, device, fused_clip=False)
    model = make_model(device, seed=7)
    ema = EMA(model, decay=0.8)
    opt = make_optimizer(name, model.parameters(), ema=ema, **kw)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "ema": ema.state_dict()}
    dcp.load(state, checkpoint_id=str(dist["dir"] / f"ckpt-fsdp-{name}"), no_dist=True)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema.load_state_dict(state["ema"])
    assert ema.num_updates == RESUME_AT
    first = opt.state[next(iter(model.parameters()))]
    torch.testing.assert_close({k: full(v) for k, v in first.items()}, saved, rtol=0, atol=0)
    for x, y in make_data(device)[RESUME_AT:]:
        backward(model, x, y)
        opt.step()
        opt.zero_grad()
    _close([full(p) for p in model.parameters()], ref["params"], "params")
    _close([full(a) for a in ema._averages], ref["ema"], "ema")


def test_dcp_one_process_8bit_checkpoint_reshards_to_fsdp2(dist: dict[str, Any]) -> None:
    """A single-process AdamW8bit checkpoint (plain codes and absmax) loads into an FSDP2 model's optimizer
    (DTensor shards by rows) with the same values, and the run resumes on the single-process trajectory."""
    name, kw = "AdamW8bit", dict(CONFIGS)["AdamW8bit"]
    ref = _single(name, kw, dist["device"], fused_clip=False, ema_decay=None)
    results = _case(dist, "dcp/fsdp_from_one")
    saved = results[0]["saved"]
    assert saved["exp_avg"].dtype == torch.int8
    for res in results:
        assert res["sharded"]
        torch.testing.assert_close(res["loaded"], saved, rtol=0, atol=0)
        _close(res["params"], ref["params"], "params")


def test_fsdp2_ema_update_swap_and_state(dist: dict[str, Any]) -> None:
    """EMA.update() on a sharded model, average_parameters() swapping the shards in and out, and the
    sharded state dict under the model's names."""
    device = dist["device"]
    model = make_model(device)
    ema = EMA(model, decay=0.7, warmup=3)
    opt = make_optimizer("SGD", model.parameters(), lr=0.1, momentum=0.5)
    for x, y in make_data(device):
        backward(model, x, y)
        opt.step()
        ema.update()
        opt.zero_grad()
    expected_out = full(ema.module(make_data(device)[0][0]))
    for res in _case(dist, "fsdp_ema_update"):
        _close(res["ema"], [full(a) for a in ema._averages], "ema")
        _close(res["swapped"], res["ema"], "parameters inside average_parameters()")
        torch.testing.assert_close(res["after"], res["before"], rtol=0, atol=0)
        _close(res["out"], expected_out, "output with the averaged weights")
        assert res["state_keys"] == sorted(n for n, _ in model.named_parameters())
        assert res["state_dtensor"]


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, math.inf], ids=["2", "1", "3", "inf"])
def test_norm_across_shards(dist: dict[str, Any], p: float) -> None:
    """get_total_norm of FSDP2 gradients equals torch's DTensor norm and the norm of the unsharded
    gradients; in a mix with replicated DTensors (counted once) and a Partial one (summed first), the
    norm of the full tensors."""
    for res in _case(dist, "norm"):
        unsharded = torch.linalg.vector_norm(torch.cat([g.flatten() for g in res["grads"]]), p)
        torch.testing.assert_close(res[f"ours_{p}"], unsharded, rtol=1e-12, atol=0)
        if f"torch_{p}" in res:  # torch's inf-norm of DTensors fails on rank 1's empty shard; ours does not
            torch.testing.assert_close(res[f"ours_{p}"], res[f"torch_{p}"], rtol=1e-12, atol=0)
        assert res[f"ours_{p}_is_replicated_dtensor"], "as torch, the norm of DTensors is a replicated DTensor"
        mixed = torch.linalg.vector_norm(torch.cat([t.flatten() for t in res["grads"] + res["extra"]]), p)
        torch.testing.assert_close(res[f"mixed_{p}"], mixed, rtol=1e-12, atol=0)


def test_clip_grad_norm_across_shards(dist: dict[str, Any]) -> None:
    """fusedtrain.clip_grad_norm_ on FSDP2 gradients equals torch.nn.utils.clip_grad_norm_ on them."""
    for res in _case(dist, "norm"):
        assert res["clip_torch"] > MAX_NORM
        torch.testing.assert_close(res["clip_ours"], res["clip_torch"], rtol=1e-12, atol=0)
        torch.testing.assert_close(res["clipped_ours"], res["clipped_torch"], rtol=1e-12, atol=1e-15)
        norm_after = torch.linalg.vector_norm(torch.cat([g.flatten() for g in res["clipped_ours"]]))
        torch.testing.assert_close(norm_after, torch.tensor(MAX_NORM, dtype=norm_after.dtype), rtol=1e-4, atol=0)


def test_partial_gradient_refused(dist: dict[str, Any]) -> None:
    """The kernels update local shards, so a gradient placed unlike its parameter (Partial) is refused
    before anything changes, with the redistribution to do."""
    for res in _case(dist, "partial_grad_refused"):
        assert "redistribute" in res["error_text"] and "Partial" in res["error_text"], res["error_text"]
        assert res["unchanged"] and res["no_state"]


def test_dtensor_8bit_states_match_single_process(dist: dict[str, Any]) -> None:
    """AdamW8bit on DTensor parameters (Shard(0) with uneven and empty shards, Replicate; rows of 300, 257 and
    600 elements): codes and absmax are DTensors placed like the parameter, and with the same gradients the
    parameters and states equal the single-process run bit for bit (blocks never straddle shards); 1-D
    parameters keep float states; to_torch_state_dict gives float32 DTensors equal to the dequantized states."""
    from fusedtrain.optim import _quant
    params, grads = dtensor_8bit_data()
    params = [t.to(dist["device"]).requires_grad_() for t in params]
    opt = fusedtrain.optim.AdamW8bit(params, **DTENSOR_8BIT_KW)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(p.device)
        opt.step()
    want = [{k: full(v) for k, v in opt.state[p].items()} for p in params]
    for (shape, _), st in zip(DTENSOR_8BIT, want):
        assert st["exp_avg"].dtype == (torch.int8 if len(shape) >= 2 else params[0].dtype), shape
    results = _case(dist, "dtensor_8bit")
    for res in results:
        assert res["layout_ok"], "8-bit states must be DTensors placed like their parameter, sharded by rows"
        for got, ref in zip(res["params"], params):
            assert torch.equal(got, full(ref))
        for got, ref in zip(res["state"], want):
            assert sorted(got) == sorted(ref)
            for k in ref:
                assert torch.equal(got[k], ref[k]), k
        assert res["torch_state_is_dtensor"]
        assert res["shard1_state"] == {k: ("DTensor", params[0].dtype) for k in ("exp_avg", "exp_avg_sq")}
        for got, ref in zip(res["torch_state"], want):
            assert not any(k.endswith("_absmax") for k in got)
            for k in ("exp_avg", "exp_avg_sq"):
                expected = _quant.dequantize(ref[k], ref[k + "_absmax"]) if _quant.is_codes(ref[k]) else ref[k]
                assert got[k].dtype == expected.dtype and torch.equal(got[k], expected), k  # (float32 if 8-bit)
    if dist["world"] == 2:
        assert 0 in results[1]["local_numel"], "rank 1 should hold an empty shard"
