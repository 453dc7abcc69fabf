"""The engine: order-independent reductions, chunking, routing, plan cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kaon
from kaon import engine, ops


@pytest.mark.parametrize("shape", [(70_000,), (3, 100_003), (70_001, 3), (5000, 2)])
@pytest.mark.parametrize("dim", [-1, -2])
def test_sums_do_not_depend_on_the_batch_size(shape, dim):
    if dim == -2 and len(shape) < 2:
        pytest.skip("needs two dims")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(4, *shape)
        full = ops.sum(x, dim=dim)
        for i in range(4):
            assert torch.equal(ops.sum(x[i : i + 1], dim=dim)[0], full[i])
        torch.testing.assert_close(full, x.double().sum(dim).float(), rtol=1e-5, atol=1e-3)
    finally:
        torch.set_num_threads(threads)


def _pair_run(shapes, steps=3, **kwargs):
    results = []
    for foreach in (False, True):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s)) for s in shapes]
        opt = kaon.Adakaon(params, lr=1e-2, foreach=foreach, **kwargs)
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append((params, opt))
    return results


@pytest.mark.parametrize("momentum", ["float32", "bfloat16", "int8", "4bit"])
def test_long_slices_batched_equal_per_parameter(momentum):
    shapes = [(70_001, 3), (70_001, 3), (100_000,), (100_000,), (3, 50_000), (3, 50_000)]
    (a, _), (b, _) = _pair_run(shapes, momentum_dtype=momentum)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("budget", [2, 100, 1000, 5000])
def test_chunk_boundaries_do_not_change_results(budget):
    shapes = [(17, 9)] * 7 + [(40,)] * 5 + [(3, 4, 2, 2)] * 3
    (a, _), (b, _) = _pair_run(shapes, momentum_dtype="int8", foreach_stack_budget=budget)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_budget_and_cutoff_routing():
    p = [nn.Parameter(torch.randn(10, 10)) for _ in range(6)] + [nn.Parameter(torch.randn(300))]
    opt = kaon.Adakaon(p, foreach_stack_budget=250, foreach_batch_cutoff=200)
    assert engine.stack_budget(opt, torch.device("cpu")) == 250
    assert engine.effective_cutoff(opt, torch.device("cpu")) == 125
    for q in p:
        q.grad = torch.randn_like(q)
    group = opt.param_groups[0]
    chunks = engine._plan(opt, group, p)
    sizes = sorted(len(c.params) for c in chunks)
    assert sizes == [1, 2, 2, 2]  # 300-element tensor alone; 100-element ones two per chunk
    default = kaon.Adakaon(p)
    assert engine.stack_budget(default, torch.device("cpu")) == 1_048_576


def test_plan_follows_parameters_that_gain_gradients():
    p = [nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    opt = kaon.Adakaon(p, lr=0.1)
    p[0].grad = torch.randn(4, 4)
    opt.step()
    assert p[1] not in opt.state
    for q in p:
        q.grad = torch.randn(4, 4)
    before = [q.detach().clone() for q in p]
    opt.step()
    assert all(q in opt.state for q in p)
    assert all(not torch.equal(x, q) for x, q in zip(before, p))


def test_step_param_checks_its_group():
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    opt = kaon.Adakaon([{"params": [a]}, {"params": [b]}])
    a.grad = torch.randn(3)
    with pytest.raises(ValueError, match="not in the given group"):
        opt.step_param(a, opt.param_groups[1])
    with pytest.raises(ValueError, match="index"):
        opt.step_parameter(a, opt.param_groups[0], 3)


def test_state_dict_round_trip_keeps_int8_and_fp32_state_of_bf16_params():
    p = nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    p.grad = torch.randn(8, 8, dtype=torch.bfloat16)
    opt = kaon.Adakaon([p], momentum_dtype="int8")
    opt.step()
    saved = opt.state_dict()
    fresh = kaon.Adakaon([p], momentum_dtype="int8")
    fresh.load_state_dict(saved)
    state = fresh.state[p]
    assert state["m"].dtype == torch.int8 and state["row"].dtype == torch.float32
    assert torch.equal(state["row"], opt.state[p]["row"])
    assert state["row"].data_ptr() != opt.state[p]["row"].data_ptr()  # a copy, not an alias
    assert "kaon" in saved and saved["kaon"]["generators"]


def test_older_checkpoint_gets_new_group_keys_backfilled():
    p = nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    opt = kaon.Adakaon([p])
    opt.step()
    saved = opt.state_dict()
    del saved["param_groups"][0]["cautious"]
    fresh = kaon.Adakaon([p])
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["cautious"] is True
    state = fresh.__getstate__()
    del state["nonfinite_grad"]
    clone = kaon.Adakaon.__new__(kaon.Adakaon)
    clone.__setstate__(state)
    assert clone.nonfinite_grad == "skip"


def test_parameter_groups_may_be_generators():
    model = nn.Linear(4, 3)
    opt = kaon.Adakaon([{"params": model.parameters(), "lr": 0.1}])
    assert len(opt.param_groups[0]["params"]) == 2
    before = model.weight.detach().clone()
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.weight)


def test_empty_parameters_are_left_alone():
    params = [nn.Parameter(torch.randn(0)), nn.Parameter(torch.randn(3, 0)),
              nn.Parameter(torch.randn(4, 4))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = kaon.Adakaon(params, lr=0.1)
    opt.step()
    assert params[2] in opt.state and params[0] not in opt.state


def test_step_param_reuses_one_plan_per_parameter():
    params = [nn.Parameter(torch.randn(3, 3)) for _ in range(20)]
    opt = kaon.Adakaon(params)
    group = opt.param_groups[0]
    calls = []
    original = engine._plan

    def counting(*args):
        calls.append(1)
        return original(*args)

    engine._plan = counting
    try:
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(3, 3)
                opt.step_param(p, group)
    finally:
        engine._plan = original
    assert len(calls) == 20


def test_state_follows_layout_changes():
    p = nn.Parameter(torch.randn(6, 6))
    p.grad = torch.randn(6, 6)
    opt = kaon.Adakaon([p], momentum_dtype="int8")
    opt.step()
    assert "m" in opt.state[p] and "m_scale" in opt.state[p]
    opt.param_groups[0]["betas"] = (0.0, 0.999)
    opt.step()
    assert set(opt.state[p]) == {"row", "col"}


def test_a_subclass_without_bf16_method_works():
    class Plain(kaon.KaonOptimizer):
        def update(self, batch):
            return batch.grad * batch.group["lr"], {}

    p = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    p.grad = torch.ones(3, dtype=torch.bfloat16)
    Plain([p], {"lr": 0.5}).step()
    assert torch.equal(p.detach(), torch.full((3,), 0.5, dtype=torch.bfloat16))


def test_raise_policy_accepts_large_finite_gradients():
    p = nn.Parameter(torch.randn(4, 4))
    p.grad = torch.full((4, 4), 1e30)  # a norm of this overflows fp32; the gradient is finite
    opt = kaon.Adakaon([p], nonfinite_grad="raise", foreach=False)
    opt._check_gradients([p])  # must not raise
    p.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt._check_gradients([p])


def test_nonfinite_policy_none_does_not_check():
    """'none' is torch's behaviour: no check, the non-finite value reaches the weights."""
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = kaon.Adakaon([p], lr=1e-2, nonfinite_grad="none")
    p.grad = torch.ones(4, 4)
    p.grad[0, 0] = float("nan")
    opt.step()
    assert not torch.isfinite(p).all()
    with pytest.raises(ValueError, match="nonfinite_grad"):
        kaon.Adakaon([p], nonfinite_grad="ignore")


def test_adamw_fused_path_with_policy_none_equals_torch_fused():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(16))]
    b = [torch.nn.Parameter(t.detach().clone()) for t in a]
    ours = kaon.AdamW(a, lr=1e-2, weight_decay=0.1, nonfinite_grad="none")
    theirs = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, fused=True)
    for i in range(5):
        gen = torch.Generator().manual_seed(i)
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, generator=gen)
            y.grad = x.grad.clone()
        ours.step()
        theirs.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
