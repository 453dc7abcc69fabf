"""Nekaon: Adakaon at k=0, the displacement, train/eval, checkpoints, low-VRAM mode."""

from __future__ import annotations

import io

import pytest
import torch
from numerics import assert_within_ulps
from torch import nn

import kaon


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 24)
        self.ln = nn.LayerNorm(24)
        self.fc2 = nn.Linear(24, 4)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(self.conv(x).relu().flatten(1))).relu())


def make(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Net().to(dtype)


def train(model, opt, steps, start=0):
    dtype = next(model.parameters()).dtype
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + i)
        x = torch.randn(16, 3, 8, 8, generator=gen).to(dtype)
        y = torch.randn(16, 4, generator=gen)
        model.zero_grad(set_to_none=True)
        (model(x).float() - y).pow(2).mean().backward()
        opt.step()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def bits_equal(a, b):
    return all(x.dtype == y.dtype and torch.equal(x.view(torch.int16 if x.element_size() == 2
               else torch.int32), y.view(torch.int16 if y.element_size() == 2 else torch.int32))
               for x, y in zip(a, b))


def eval_weights(model, opt):
    opt.eval()
    out = weights(model)
    opt.train()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("momentum", ["4bit", "float32"])
def test_k_zero_is_adakaon_bit_for_bit(dtype, momentum):
    args = dict(lr=1e-2, betas=(0.5, 0.999), weight_decay=0.1, momentum_dtype=momentum, seed=3)
    a, b = make(dtype), make(dtype)
    opt_a = kaon.Adakaon(a.parameters(), **args)
    opt_b = kaon.Nekaon(b.parameters(), k=0.0, **args)
    train(a, opt_a, 6)
    train(b, opt_b, 6)
    assert bits_equal(weights(a), weights(b))
    for p, q in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert set(sb) - set(sa) == {"climb"}
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", [dict(), dict(momentum_dtype="int8"),
                                    dict(momentum_dtype="bfloat16", k=3.0),
                                    dict(bf16_method="kahan"), dict(bf16_method="none")],
                         ids=["default", "int8", "bf16-k3", "kahan", "rtn"])
def test_eval_train_round_trip_restores_the_live_weights_exactly(dtype, config):
    model = make(dtype)
    opt = kaon.Nekaon(model.parameters(), lr=2e-2, **config)
    train(model, opt, 5)
    live = weights(model)
    opt.eval()
    true = weights(model)
    assert any(not torch.equal(x, y) for x, y in zip(live, true))  # there was a displacement
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step_param(model.fc1.weight, opt.param_groups[0])
    opt.eval()  # idempotent
    assert bits_equal(true, weights(model))
    opt.train()
    assert bits_equal(live, weights(model))
    opt.train()  # idempotent
    assert bits_equal(live, weights(model))
    train(model, opt, 1, start=5)  # and training goes on


def test_eval_shows_the_true_weights_and_the_displacement_formula():
    k, lr, clip = 1.5, 2e-2, 0.7
    model = make()
    opt = kaon.Nekaon(model.parameters(), lr=lr, k=k, clip_threshold=clip,
                      momentum_dtype="float32")
    train(model, opt, 4)
    live = weights(model)
    expected = []
    for p in model.parameters():
        m = opt.state[p]["m"].reshape(p.shape)  # unit-RMS momentum as stored
        e = (-k * lr * m).clamp(-k * clip * lr, k * clip * lr)
        # the same products and clamp, associated differently: two roundings of e
        assert_within_ulps(opt.displacement(p), e, 2)
        expected.append(p.detach() - e)
    opt.eval()
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=0)
        assert torch.count_nonzero(opt.displacement(p)) == 0
    opt.train()
    assert bits_equal(live, weights(model))


def test_no_weight_moves_further_than_the_bound():
    k, lr, clip = 2.0, 1e-2, 1.0
    p = nn.Parameter(torch.randn(32, 48))
    opt = kaon.Nekaon([p], lr=lr, k=k, clip_threshold=clip, momentum_dtype="float32",
                      cautious=False)
    gen = torch.Generator().manual_seed(0)
    hit = False
    for step in range(30):
        g = torch.randn(32, 48, generator=gen)
        g[:, 5] = 0.0 if step < 25 else 1e4  # a cold column, then a spike: |m| >> clip there
        p.grad = g
        opt.step()
        e = opt.displacement(p)
        bound = k * clip * lr
        assert e.abs().max() <= bound * (1 + 1e-6)
        live = p.detach().clone()
        opt.eval()
        moved = (live - p.detach()).abs()
        opt.train()
        assert (moved <= bound * (1 + 1e-6) + live.abs() * 2**-23).all()
        hit = hit or bool((e.abs() >= bound * (1 - 1e-6)).any())
    assert hit  # the clamp was active


def test_nonfinite_momentum_cannot_poison_the_weights():
    k, lr = 1.5, 1e-2
    p = nn.Parameter(torch.randn(10))
    opt = kaon.Nekaon([p], lr=lr, k=k, momentum_dtype="float32")
    p.grad = torch.randn(10)
    opt.step()
    m = opt.state[p]["m"]
    m[0], m[1], m[2] = float("nan"), float("inf"), float("-inf")
    e = opt.displacement(p)
    bound = k * 1.0 * lr
    assert e[0] == 0 and e[1] == pytest.approx(-bound) and e[2] == pytest.approx(bound)
    assert torch.isfinite(e).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("momentum", ["float32", "4bit"])
def test_climb_and_removal_cancel(dtype, momentum):
    """The true weights (live - displacement) move by Adakaon's step plus ONE rounding per
    step. For bf16 that is one stochastic rounding, never more than one bf16 spacing off
    (separate roundings of the removal, the step and the climb could be three spacings off);
    a climb from the momentum before it is stored would be off by k lr (quantization error)."""
    shape = (64, 96)
    torch.manual_seed(0)
    p = nn.Parameter((torch.randn(shape) * 0.05).to(dtype))
    twin = nn.Parameter(torch.zeros(shape))  # fp32 Adakaon at 0: its weights become -delta
    args = dict(lr=5e-3, betas=(0.5, 0.999), weight_decay=0.0, momentum_dtype=momentum)
    opt = kaon.Nekaon([p], k=1.5, **args)
    ref = kaon.Adakaon([twin], **args)
    gen = torch.Generator().manual_seed(1)
    true_prev = p.detach().float().clone()
    worst = 0.0
    for _ in range(40):
        g = torch.randn(shape, generator=gen).to(dtype)
        p.grad, twin.grad = g, g.float()
        with torch.no_grad():
            twin.zero_()  # with weight_decay=0 Adakaon's step does not depend on the weights
        opt.step()
        ref.step()
        delta = -twin.detach()  # exact: 0 - delta
        true = p.detach().float() - opt.displacement(p)
        e = opt.displacement(p)
        live = p.detach().float()
        # one spacing of the written weights, plus the fp32 roundings of this comparison
        spacing = torch.finfo(dtype).eps * live.abs() + 4 * torch.finfo(torch.float32).eps * (
            live.abs() + true_prev.abs() + delta.abs() + e.abs()) + 1e-30
        error = (true - (true_prev - delta)).abs() / spacing
        worst = max(worst, error.max().item())
        true_prev = true
    # fp32: a few roundings of the comparison itself; a wrong climb is ~1e4 of these units
    assert worst <= (1.0 if dtype == torch.bfloat16 else 16.0), worst


@pytest.mark.parametrize("momentum", ["float32", "int8", "4bit"])
def test_true_iterate_follows_adakaon_under_fixed_gradients(momentum):
    """With gradients that do not depend on the weights, the displacement changes nothing but
    where the weights sit between steps: the true iterate is Adakaon's (weight decay included,
    which must see the true weights)."""
    torch.manual_seed(4)
    shapes = [(20, 30), (8, 3, 3, 3), (30,)]
    ours = [nn.Parameter(torch.randn(s) * 0.5) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    args = dict(lr=2e-2, betas=(0.5, 0.999), weight_decay=0.1, momentum_dtype=momentum)
    opt = kaon.Nekaon(ours, k=1.5, **args)
    ref = kaon.Adakaon(theirs, **args)
    gen = torch.Generator().manual_seed(2)
    peak = [p.detach().abs() for p in ours]  # the largest live weights rounded on the way
    for _ in range(20):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        peak = [torch.maximum(m, p.detach().abs()) for m, p in zip(peak, ours)]
    opt.eval()
    for p, q, m in zip(ours, theirs, peak):
        # per step Nekaon removes and re-adds the displacement: two roundings of half an ulp of
        # the live weights more than Adakaon, so over 20 steps at most 20 ulps of the largest
        # live weight (a weight near zero now was rounded at a larger magnitude before)
        assert_within_ulps(p.detach(), q.detach(), 20, m)
    assert any(torch.count_nonzero(opt.displacement(p)) == 0 for p in ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_train_mode_checkpoint_is_not_baked_into_the_weights(dtype):
    model = make(dtype)
    opt = kaon.Nekaon(model.parameters(), lr=2e-2)
    train(model, opt, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)  # train mode
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = make(dtype, seed=9)
    fresh.load_state_dict(saved["model"])
    opt2 = kaon.Nekaon(fresh.parameters(), lr=2e-2)
    opt2.load_state_dict(saved["opt"])
    assert bits_equal(weights(model), weights(fresh))
    # the fresh optimizer knows the displacement is in the weights and removes it
    assert bits_equal(eval_weights(model, opt), eval_weights(fresh, opt2))
    assert not bits_equal(weights(fresh), eval_weights(fresh, opt2))
    train(model, opt, 3, start=4)
    train(fresh, opt2, 3, start=4)
    assert bits_equal(weights(model), weights(fresh))


def test_eval_mode_checkpoint_loads_in_eval_mode_and_train_restores_the_climb():
    """Issue 17, case 10: an eval-mode checkpoint (true weights) carries the record of the
    displacement and its fix-ups; it loads in eval mode and train() puts the displacement back,
    so the resumed run equals the original one (it used to come back in train mode, without
    the displacement)."""
    model = make()
    opt = kaon.Nekaon(model.parameters(), lr=2e-2)
    train(model, opt, 4)
    opt.eval()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    true = weights(model)
    opt.train()
    live = weights(model)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = make(seed=9)
    fresh.load_state_dict(saved["model"])
    opt2 = kaon.Nekaon(fresh.parameters(), lr=2e-2)
    opt2.load_state_dict(saved["opt"])
    assert not opt2.training
    for p in fresh.parameters():
        assert torch.count_nonzero(opt2.displacement(p)) == 0
    assert bits_equal(true, weights(fresh))
    with pytest.raises(RuntimeError, match="eval mode"):
        opt2.step()
    opt2.train()
    assert bits_equal(live, weights(fresh))
    train(model, opt, 2, start=4)
    train(fresh, opt2, 2, start=4)
    assert bits_equal(weights(model), weights(fresh))


def test_skipped_step_keeps_weights_and_displacement_consistent():
    model = make()
    opt = kaon.Nekaon(model.parameters(), lr=2e-2)
    train(model, opt, 3)
    true_before = eval_weights(model, opt)
    for group in opt.param_groups:
        group["lr"] = 5e-3  # a new climb scale for the parameters that do step
    model.zero_grad()
    (model(torch.randn(4, 3, 8, 8)).pow(2).mean()).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    opt.step()
    index = [n for n, _ in model.named_parameters()].index("fc1.weight")
    true_after = eval_weights(model, opt)
    assert torch.equal(true_before[index], true_after[index])
    assert opt.state[model.fc1.weight]["climb"][0].item() == pytest.approx(1.5 * 2e-2)
    assert opt.state[model.fc2.weight]["climb"][0].item() == pytest.approx(1.5 * 5e-3)
    train(model, opt, 2, start=3)


def test_constructor_checks():
    model = make()
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        kaon.Nekaon(model.parameters(), betas=(0.0, 0.999))
    with pytest.raises(ValueError, match="k"):
        kaon.Nekaon(model.parameters(), k=-0.5)
    with pytest.raises(TypeError, match="low_vram_above"):
        kaon.Nekaon([{"params": list(model.parameters())}], low_vram_above=10)
    with pytest.raises(ValueError, match="low_vram_above"):
        kaon.Nekaon(model.parameters(), low_vram_above=-1)
    with pytest.raises(ValueError, match="low_vram_lr_ratio"):
        kaon.Nekaon(model.parameters(), low_vram_above=10, low_vram_lr_ratio=0.0)


def test_low_vram_mode_splits_big_tensors_into_a_no_momentum_group():
    model = make()
    opt = kaon.Nekaon(model.parameters(), lr=1e-2, betas=(0.5, 0.99), low_vram_above=200)
    small, big = opt.param_groups
    assert all(p.numel() <= 200 for p in small["params"])
    assert {id(p) for p in big["params"]} == {id(model.fc1.weight)}  # 24 x 144
    assert big["lr"] == pytest.approx(5e-3) and big["betas"] == (0.0, 0.99)
    assert small["lr"] == 1e-2 and small["betas"] == (0.5, 0.99)
    train(model, opt, 3)
    assert set(opt.state[model.fc1.weight]) == {"row", "col"}
    assert {"m", "climb"} <= set(opt.state[model.fc2.weight])
    assert torch.count_nonzero(opt.displacement(model.fc1.weight)) == 0
    live = weights(model)
    opt.eval()
    opt.train()
    assert bits_equal(live, weights(model))


def test_state_bytes_per_param_on_an_llm_like_stack():
    shapes = [(1024, 1024), (4096, 1024), (1024, 4096), (1024,), (1024,), (4096,)]
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = kaon.Nekaon(params)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert opt.bytes_per_param() <= 0.57, opt.bytes_per_param()
    low = kaon.Nekaon(params, low_vram_above=4096)
    low.step()
    assert low.bytes_per_param() < 0.06, low.bytes_per_param()
