"""The contract every kaon optimizer keeps, run over every entry of ``conformance.OPTIMIZERS``."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from conformance import OPTIMIZERS, Entry
from torch import nn

BAD = [(e, bad) for e in OPTIMIZERS for bad in e.bad_args]
BF16 = [e for e in OPTIMIZERS if e.supports_bf16]


class TinyNet(nn.Module):
    """Linear, conv, bias and norm parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = self.norm(self.conv(x)).relu().flatten(1)
        return self.fc2(self.ln(self.fc1(h)).relu())


def make_model(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def batch(i: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(32, 3, 8, 8, generator=gen)
    teacher = torch.Generator().manual_seed(7)
    w = torch.randn(3 * 8 * 8, 4, generator=teacher) / 8
    return x.to(dtype), (x.flatten(1) @ w).to(dtype)


def loss_of(model, i, dtype=torch.float32):
    x, y = batch(i, dtype)
    return (model(x).float() - y.float()).pow(2).mean()


def set_grads(model, i, dtype=torch.float32):
    model.zero_grad(set_to_none=True)
    loss = loss_of(model, i, dtype)
    loss.backward()
    return loss.item()


def train(model, opt, steps, start=0, dtype=torch.float32):
    losses = []
    for i in range(start, start + steps):
        losses.append(set_grads(model, i, dtype))
        opt.step()
    return losses


def started(entry: Entry, dtype=torch.float32, steps=0, **overrides):
    """A fresh model and optimizer for ``entry``, trained for ``steps`` steps."""
    model = make_model(dtype)
    opt = entry.make(model.parameters(), lr=entry.train_lr, **overrides)
    train(model, opt, steps, dtype=dtype)
    return model, opt


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def true_params(model, opt):
    """The weights as evaluation sees them: bracketed by ``opt.eval()`` / ``opt.train()``, a
    no-op for most optimizers; for a look-ahead optimizer (Nekaon) the iterate without the
    displacement the live weights carry."""
    opt.eval()
    weights = params_of(model)
    opt.train()
    return weights


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        assert torch.equal(x, y)


def snapshot_state(opt):
    return {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in enumerate(opt.state.values())
    }


def assert_state_equal(s1, s2):
    assert s1.keys() == s2.keys()
    for i in s1:
        assert s1[i].keys() == s2[i].keys()
        for k in s1[i]:
            a, b = s1[i][k], s2[i][k]
            if torch.is_tensor(a):
                assert a.dtype == b.dtype, k
                assert torch.equal(a, b), k
            else:
                assert a == b


# ------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(("entry", "bad"), BAD, ids=[f"{e.name}-{b[2]}" for e, b in BAD])
def test_bad_arguments_raise_naming_the_argument(entry: Entry, bad):
    kwargs, error, name = bad
    model = make_model()
    with pytest.raises(error, match=re.escape(name)):
        entry.make(model.parameters(), **kwargs)


@pytest.mark.parametrize(("entry", "bad"), BAD, ids=[f"{e.name}-{b[2]}" for e, b in BAD])
def test_bad_group_is_rejected_before_any_change(entry: Entry, bad):
    kwargs, error, name = bad
    if name.startswith(("foreach", "nonfinite")):
        pytest.skip("optimizer-level argument, not a group key")
    model = make_model()
    opt = entry.make([model.conv.weight])
    train(model, opt, 1)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                                   for g in opt.param_groups])
    state_before = snapshot_state(opt)
    with pytest.raises(error, match=re.escape(name)):
        opt.add_param_group({"params": [model.fc1.weight], **kwargs})
    assert len(opt.param_groups) == 1
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    assert_state_equal(state_before, snapshot_state(opt))


@pytest.mark.parametrize("entry", OPTIMIZERS[:1], ids=repr)
def test_bad_inputs(entry: Entry):
    model = make_model()
    with pytest.raises(TypeError, match="single Tensor"):
        entry.make(model.fc1.weight)
    with pytest.raises(TypeError, match="floating point"):
        entry.make([torch.zeros(3, dtype=torch.int64)])
    emb = nn.Embedding(10, 4, sparse=True)
    opt = entry.make(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(before, emb.weight) and not opt.state


# ------------------------------------------------------------------------------- training
@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_loss_decreases(entry: Entry):
    model = make_model()
    opt = entry.make(model.parameters(), lr=entry.train_lr)
    losses = train(model, opt, 60)
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], losses[::10]


def fixed_grads(model, i):
    """Gradients that do not depend on the weights, so parameter groups stay independent."""
    gen = torch.Generator().manual_seed(500 + i)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_per_group_lr_and_weight_decay(entry: Entry):
    def run(fc_wd):
        model = make_model()
        groups = [
            {"params": [model.conv.weight, model.conv.bias], "lr": 0.0},
            {"params": list(model.fc1.parameters()), "weight_decay": fc_wd},
            {"params": list(model.norm.parameters()) + list(model.ln.parameters())
             + list(model.fc2.parameters())},
        ]
        opt = entry.make(groups, lr=entry.train_lr)
        start = params_of(model)
        for i in range(3):
            fixed_grads(model, i)
            opt.step()
        return model, start

    model, start = run(0.0)
    assert torch.equal(model.conv.weight, start[0]) and torch.equal(model.conv.bias, start[1])
    assert not torch.equal(model.fc1.weight, start[4])
    decayed, _ = run(0.5)
    assert not torch.equal(decayed.fc1.weight, model.fc1.weight)
    if entry.independent_groups:  # else a shared tuned rate lets one group affect another
        assert torch.equal(decayed.fc2.weight, model.fc2.weight)


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_add_param_group(entry: Entry):
    model = make_model()
    opt = entry.make(list(model.fc1.parameters()), lr=entry.train_lr)
    train(model, opt, 1)
    opt.add_param_group({"params": list(model.fc2.parameters()), "lr": entry.train_lr / 2})
    group = opt.param_groups[1]
    assert group["lr"] == entry.train_lr / 2
    assert set(opt.defaults) <= set(group)
    before = model.fc2.weight.detach().clone()
    train(model, opt, 1, start=1)
    assert not torch.equal(before, model.fc2.weight)
    assert model.fc2.weight in opt.state
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [model.fc2.weight]})


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_lr_scheduler_changes_the_step(entry: Entry):
    def run(factor_at_3):
        model = make_model()
        opt = entry.make(model.parameters(), lr=entry.train_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor_at_3 if s >= 3 else 1.0)
        for i in range(3):
            set_grads(model, i)
            opt.step()
            sched.step()
        before = true_params(model, opt)
        set_grads(model, 3)
        opt.step()
        return before, true_params(model, opt)

    before, frozen = run(0.0)
    assert_same(before, frozen)
    _, half = run(0.5)
    _, full = run(1.0)
    assert any(not torch.equal(a, b) for a, b in zip(half, full))


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_step_hooks_fire(entry: Entry):
    model = make_model()
    opt = entry.make(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    train(model, opt, 2)
    assert calls == ["pre", "post", "pre", "post"]


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deepcopy_continues_identically(entry: Entry, dtype):
    model, opt = started(entry, dtype, steps=2)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.foreach == opt.foreach and opt2.seed == opt.seed
    train(model, opt, 3, start=2, dtype=dtype)
    train(model2, opt2, 3, start=2, dtype=dtype)
    assert_same(params_of(model), params_of(model2))
    assert_state_equal(snapshot_state(opt), snapshot_state(opt2))


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_no_gradients_and_zero_gradients_change_nothing(entry: Entry):
    model = make_model()
    opt = entry.make(model.parameters(), lr=entry.train_lr)
    before = params_of(model)
    opt.step()
    assert_same(before, params_of(model))
    assert not opt.state
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert_same(before, params_of(model))
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.is_floating_point():
                assert torch.isfinite(value).all()


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lr_zero_leaves_parameters_unchanged(entry: Entry, dtype):
    model, opt = started(entry, dtype, steps=3)
    for group in opt.param_groups:
        group["lr"] = 0.0
    if entry.lookahead and dtype == torch.bfloat16:
        # the lr-scaled displacement vanishes into the weights: one stochastic rounding of the
        # iterate (it is not representable in bf16); from then on nothing may move
        train(model, opt, 1, start=3, dtype=dtype)
    before = true_params(model, opt)
    train(model, opt, 2, start=3, dtype=dtype)
    assert_same(before, true_params(model, opt))


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resume_is_bit_identical(entry: Entry, dtype):
    model, opt = started(entry, dtype, steps=3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    saved_dtypes = {i: {k: v.dtype for k, v in s.items() if torch.is_tensor(v)}
                    for i, s in enumerate(opt.state.values())}
    train(model, opt, 4, start=3, dtype=dtype)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = make_model(dtype, seed=123)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = entry.make(resumed.parameters(), lr=entry.train_lr, seed=999)
    opt2.load_state_dict(checkpoint["opt"])
    loaded_dtypes = {i: {k: v.dtype for k, v in s.items() if torch.is_tensor(v)}
                     for i, s in enumerate(opt2.state.values())}
    assert loaded_dtypes == saved_dtypes
    for state in opt2.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                assert type(value) is torch.Tensor
    train(resumed, opt2, 4, start=3, dtype=dtype)
    assert_same(params_of(model), params_of(resumed))
    assert_state_equal(snapshot_state(opt), snapshot_state(opt2))


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_state_is_loadable_with_weights_only(entry: Entry):
    model = make_model(torch.bfloat16)
    opt = entry.make(model.parameters())
    train(model, opt, 1, dtype=torch.bfloat16)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert set(loaded) >= {"state", "param_groups"}
    assert opt.state_bytes() > 0 or entry.kwargs.get("betas", (1,))[0] == 0


# ------------------------------------------------------------------------- execution paths
@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_per_parameter_entry_equals_step(entry: Entry):
    if not entry.per_parameter:  # then it must refuse clearly, before changing anything
        model = make_model()
        opt = entry.make(model.parameters(), lr=entry.train_lr)
        set_grads(model, 0)
        group = opt.param_groups[0]
        with pytest.raises(RuntimeError, match="step_param"):
            opt.step_param(group["params"][0], group)
        with pytest.raises(RuntimeError, match="step_param"):
            opt.step_parameter(group["params"][0], group, 0)
        assert not opt.state
        return
    model_a, model_b = make_model(), make_model()
    opt_a = entry.make(model_a.parameters(), lr=entry.train_lr)
    opt_b = entry.make(model_b.parameters(), lr=entry.train_lr)
    for i in range(4):
        set_grads(model_a, i)
        opt_a.step()
        set_grads(model_b, i)
        for group in opt_b.param_groups:
            for index, p in enumerate(group["params"]):
                if i % 2:
                    opt_b.step_param(p, group)
                else:
                    opt_b.step_parameter(p, group, index)
    assert_same(params_of(model_a), params_of(model_b))
    assert_state_equal(snapshot_state(opt_a), snapshot_state(opt_b))


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
@pytest.mark.parametrize("budget", [None, 300], ids=["default-budget", "tiny-budget"])
def test_batched_equals_per_parameter(entry: Entry, budget):
    model_a, model_b = make_model(), make_model()
    opt_a = entry.make(model_a.parameters(), lr=entry.train_lr, foreach=False)
    opt_b = entry.make(model_b.parameters(), lr=entry.train_lr, foreach=True,
                       foreach_stack_budget=budget)
    train(model_a, opt_a, 4)
    train(model_b, opt_b, 4)
    assert_same(params_of(model_a), params_of(model_b))
    assert_state_equal(snapshot_state(opt_a), snapshot_state(opt_b))


# --------------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_nonfinite_gradient_skips_that_parameter(entry: Entry, foreach):
    model, opt = started(entry, steps=2, foreach=foreach)
    before = params_of(model)
    state_before = snapshot_state(opt)
    set_grads(model, 2)
    model.fc1.weight.grad[0, 0] = float("nan")
    model.ln.weight.grad[1] = float("inf")
    opt.step()
    after = params_of(model)
    names = [n for n, _ in model.named_parameters()]
    skipped = {names.index("fc1.weight"), names.index("ln.weight")}
    state_after = snapshot_state(opt)
    for i, (a, b) in enumerate(zip(before, after)):
        assert torch.isfinite(b).all()
        if i in skipped:
            assert torch.equal(a, b)
            for k, v in state_before[i].items():
                assert torch.equal(v, state_after[i][k]), k
        else:
            assert not torch.equal(a, b)
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.isfinite(v).all()


@pytest.mark.parametrize("entry", OPTIMIZERS[:1], ids=repr)
def test_nonfinite_gradient_raise_policy_changes_nothing(entry: Entry):
    model = make_model()
    opt = entry.make(model.parameters(), nonfinite_grad="raise")
    train(model, opt, 1)
    before, state_before = params_of(model), snapshot_state(opt)
    set_grads(model, 1)
    model.fc2.bias.grad[0] = float("-inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert_same(before, params_of(model))
    assert_state_equal(state_before, snapshot_state(opt))


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_closure_returns_loss(entry: Entry):
    model = make_model()
    opt = entry.make(model.parameters(), lr=entry.train_lr)

    def closure():
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert torch.is_tensor(first)
    second = opt.step(closure)
    assert second.item() < first.item()


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_train_eval_are_safe_no_ops(entry: Entry):
    model = make_model()
    opt = entry.make(model.parameters())
    train(model, opt, 1)
    before = params_of(model)
    opt.eval()
    opt.train()
    assert_same(before, params_of(model))


# ------------------------------------------------------------------- awkward parameter shapes
AWKWARD_SHAPES = [(8, 40), (40, 8), (8, 40), (40, 8), (6, 3, 3, 3), (6, 3, 3, 3), (7,), (7,),
                  (1, 5), (5, 1), (), (0, 4)]


def awkward_params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    return [nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in AWKWARD_SHAPES]


def awkward_grads(params, i):
    gen = torch.Generator().manual_seed(900 + i)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_awkward_shapes_batched_equals_per_parameter(entry: Entry):
    """LoRA-like narrow and wide factors, conv kernels, 1-D, 0-D and empty tensors."""
    runs = []
    for foreach in (False, True):
        params = awkward_params()
        opt = entry.make(params, lr=entry.train_lr, foreach=foreach)
        start = [p.detach().clone() for p in params]
        for i in range(4):
            awkward_grads(params, i)
            opt.step()
        runs.append((params, opt))
        for p, p0 in zip(params, start):
            assert torch.isfinite(p).all()
            if p.numel():
                assert not torch.equal(p, p0), tuple(p.shape)
    (loop_params, loop_opt), (batched_params, batched_opt) = runs
    assert_same(loop_params, batched_params)
    assert_state_equal(snapshot_state(loop_opt), snapshot_state(batched_opt))


@pytest.mark.parametrize("entry", BF16, ids=repr)
def test_awkward_shapes_bf16_batched_tracks_per_parameter(entry: Entry):
    """bf16 weights: both paths round stochastically (different draws), so they agree closely."""
    finals = []
    for foreach in (False, True):
        params = awkward_params(torch.bfloat16)
        opt = entry.make(params, lr=entry.train_lr, foreach=foreach)
        for i in range(3):
            awkward_grads(params, i)
            opt.step()
        finals.append([p.detach().float() for p in params])
    for a, b in zip(*finals):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
