"""The lr-0 priming step of torch.distributed.checkpoint's state-dict helpers, in one process.

``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` step an optimizer without state once
with zero gradients and lr = 0 so that its state exists. For every registered optimizer that
step must create the state and change nothing: no weight, and nothing that the next steps read
(counters, moments, D, averages, the random stream). A state-dict round trip through the
helpers (in one process, without a process group) must then continue exactly. (The 2-process
checks in test_distributed.py also prime every optimizer, in fp32 and bf16, under FSDP2.)
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conformance import OPTIMIZERS
from test_conformance import make_model, params_of, train

from kaon import Adakaon

state_dict_helpers = pytest.importorskip("torch.distributed.checkpoint.state_dict")


def _primed(entry, dtype):
    model = make_model(dtype)
    opt = entry.make(model.parameters(), lr=entry.train_lr, seed=5)
    before = params_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        state_dict_helpers.get_optimizer_state_dict(model, opt)
    return model, opt, before


def _check(entry, dtype):
    model, opt, before = _primed(entry, dtype)
    assert opt.state, "priming created no state"
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(params_of(model), before):
        assert torch.equal(a, b), "the priming step changed a weight"
    assert [g["lr"] for g in opt.param_groups] == [entry.train_lr] * len(opt.param_groups)
    reference = make_model(dtype)
    ref = entry.make(reference.parameters(), lr=entry.train_lr, seed=5)
    train(model, opt, 2, dtype=dtype)
    train(reference, ref, 2, dtype=dtype)
    for a, b in zip(params_of(model), params_of(reference)):
        assert torch.equal(a, b), "a primed optimizer trains differently"
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert groups == [{k: v for k, v in g.items() if k != "params"} for g in ref.param_groups]


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_priming_creates_state_and_changes_nothing(entry):
    _check(entry, torch.float32)


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_state_dict_helpers_round_trip(entry):
    model = make_model()
    opt = entry.make(model.parameters(), lr=entry.train_lr, seed=5)
    train(model, opt, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        saved = state_dict_helpers.get_optimizer_state_dict(model, opt)
        assert "kaon" in saved["param_groups"][0]  # the random stream rides in the first group
        resumed = make_model(seed=1)
        resumed.load_state_dict(model.state_dict())
        resumed_opt = entry.make(resumed.parameters(), lr=entry.train_lr, seed=9)
        state_dict_helpers.set_optimizer_state_dict(resumed, resumed_opt, saved)
    assert resumed_opt.seed == 5
    assert all("kaon" not in g for g in resumed_opt.param_groups)
    train(model, opt, 2, start=2)
    train(resumed, resumed_opt, 2, start=2)
    for a, b in zip(params_of(model), params_of(resumed)):
        assert torch.equal(a, b)


def test_a_real_lr0_step_still_updates_the_state():
    """Only the priming signature (lr = 0 everywhere and all-zero gradients) is special."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Adakaon([p], lr=0.0)
    p.grad = torch.randn(4, 3)
    opt.step()
    assert opt.state[p]["row"].abs().sum() > 0  # the second moment saw the gradient
    q = torch.nn.Parameter(torch.randn(4, 3))
    primed = Adakaon([q], lr=0.0)
    q.grad = torch.zeros(4, 3)
    primed.step()
    assert primed.state[q]["row"].abs().sum() == 0  # created, untouched
