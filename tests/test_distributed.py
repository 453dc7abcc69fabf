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
        return json.load(f)


CASES = [(e.name, check) for e in OPTIMIZERS
         for check in ("fsdp", "fsdp_bf16", "dcp", "ddp", "ddp_bf16")
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
