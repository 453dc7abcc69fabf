"""FSDP2 (uneven shards), DDP and torch.distributed.checkpoint for every registered optimizer.

One launch of 2 CPU processes (gloo) runs every check of ``distributed_worker.py`` for every
entry of ``conformance.OPTIMIZERS`` (so an optimizer added to the registry is covered); each
(entry, check) pair is then reported as its own test here. Skipped when torch.distributed or the
gloo backend is unavailable.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
from conformance import OPTIMIZERS

import kaon

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import distributed_worker
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("distributed")
    names = [e.name for e in OPTIMIZERS]
    mp.spawn(distributed_worker.main, args=(WORLD, _free_port(), str(out), names),
             nprocs=WORLD, join=True)
    with open(out / "results.json") as f:
        found = json.load(f)
    found["_path"] = str(out)
    return found


CASES = [(e.name, check) for e in OPTIMIZERS
         for check in ("fsdp", "fsdp_bf16", "dcp", "ddp", "ddp_bf16", "local")
         if e.supports_bf16 or not check.endswith("bf16")]


@pytest.mark.parametrize(("name", "check"), CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_distributed_matches_single_process(results, name, check):
    outcome = results[name][check]
    assert outcome == "ok", outcome


def test_unknown_distributed_mode_is_rejected_before_any_change():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="distributed_mode"):
        kaon.Adakaon([{"params": [p], "distributed_mode": "sloppy"}])
    opt = kaon.Adakaon([p])
    with pytest.raises(ValueError, match="distributed_mode"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))],
                             "distributed_mode": "approximate"})
    assert len(opt.param_groups) == 1


def test_local_mode_on_plain_parameters_is_the_ordinary_step():
    """``distributed_mode="local"`` only changes how DTensor parameters are stepped."""
    torch.manual_seed(0)
    p, q = (torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2))
    q.data.copy_(p.data)
    a = kaon.Adakaon([{"params": [p], "distributed_mode": "local"}], lr=1e-2)
    b = kaon.Adakaon([q], lr=1e-2)
    for _ in range(2):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        a.step()
        b.step()
    assert torch.equal(p, q)


def test_synchronize_seed_gives_every_rank_rank0s_seed(results):
    assert results["_global"]["synchronize_seed"] == "ok", results["_global"]


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_shard_is_decided_for_the_whole_tensor(results, policy):
    assert results["_global"][f"nonfinite_{policy}"] == "ok", results["_global"]


DCP_ENTRIES = [e for e in OPTIMIZERS]


@pytest.mark.parametrize("entry", DCP_ENTRIES, ids=repr)
def test_sharded_checkpoint_loads_into_one_process(results, entry):
    """The 2-rank FSDP2 checkpoint of the ``dcp`` check, loaded by one process into a plain
    model and optimizer: weights and state equal the gathered state of the sharded run."""
    import warnings

    import distributed_worker as worker
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    assert results[entry.name]["dcp"] == "ok"
    path = results["_path"] + f"/ckpt/{entry.name}/dcp"
    whole = torch.load(path + "/whole.pt", weights_only=True)
    dtype = torch.bfloat16 if whole["dtype"] == "torch.bfloat16" else torch.float32
    model = worker.make_model(dtype, seed=3)
    opt = entry.make(list(model.parameters()), lr=entry.train_lr, seed=0)
    if "s" not in next(iter(whole["state"].values())) and hasattr(opt, "freeze"):
        opt.freeze()  # a frozen Autokaon checkpoint loads into a frozen one (checkpointing.md)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming a single process"
        target = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(target, checkpoint_id=path)
        set_model_state_dict(model, target["model"])
        set_optimizer_state_dict(model, opt, target["optim"])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), whole["model"][name]), name
    names = dict(model.named_parameters())
    assert sorted(whole["state"]) == sorted(names)
    for fqn, saved in whole["state"].items():
        state = opt.state[names[fqn]]
        assert sorted(state) == sorted(saved), fqn
        for key, value in saved.items():
            if torch.is_tensor(value):
                assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
            else:
                assert state[key] == value, key
    assert opt.seed == worker.SEED
