"""Lion against lion_pytorch and the plain reference, and its own features."""

from __future__ import annotations

import pytest
import torch
from reference import LionReference, grads_for, quantized_momentum_run, step_both
from torch import nn

import kaon

lion_pytorch = pytest.importorskip("lion_pytorch")

SHAPES = [(24, 16), (16, 24), (8, 3, 3, 3), (24,), (1,), ()]
PLAIN = dict(cautious=False, gradient_centralization=False, momentum_dtype="float32")



class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 32)  # same shape as fc3: batched together
        self.fc3 = nn.Linear(32, 32)
        self.ln = nn.LayerNorm(32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = self.conv(x).relu().flatten(1)
        h = self.fc3(self.fc2(self.fc1(h).relu()).relu())
        return self.out(self.ln(h))


def _loss(model, i):
    gen = torch.Generator().manual_seed(100 + i)
    x = torch.randn(16, 3, 8, 8, generator=gen)
    y = torch.randn(16, 4, generator=gen)
    return (model(x) - y).pow(2).mean()


def test_matches_lion_pytorch_bit_for_bit_when_training_a_model():
    """cautious and centralization off, fp32 momentum, no decay: the same bits for 50 steps."""
    torch.manual_seed(0)
    ours, theirs = Net(), Net()
    theirs.load_state_dict(ours.state_dict())
    opt = kaon.Lion(ours.parameters(), lr=1e-3, betas=(0.9, 0.99), **PLAIN)
    ref = lion_pytorch.Lion(theirs.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for i in range(50):
        for model, optimizer in ((ours, opt), (theirs, ref)):
            optimizer.zero_grad()
            _loss(model, i).backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(opt.state[p]["m"], ref.state[q]["exp_avg"].reshape(opt.state[p]["m"].shape))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.95, 0.98), (0.0, 0.99)], ids=str)
def test_matches_lion_pytorch_with_weight_decay(shape, betas):
    """50 steps, atol 1e-6, decoupled decay ``p (1 - lr wd)``.

    lion_pytorch rounds twice per step (decay, then the sign step), kaon once (``p - lr (c + wd
    p)``), so the two drift apart by a few ulp of the weights; weights at an nn.Linear-like scale
    keep that below 1e-6. Gradients do not depend on the weights, so no sign can flip.
    """
    torch.manual_seed(3)
    p = nn.Parameter(torch.randn(shape) * 0.1)
    q = nn.Parameter(p.detach().clone())
    opt = kaon.Lion([p], lr=3e-4, betas=betas, weight_decay=0.5, **PLAIN)
    ref = lion_pytorch.Lion([q], lr=3e-4, betas=betas, weight_decay=0.5)
    start = p.detach().clone()
    for g in grads_for(shape, 50):
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
    assert (p.detach() - start).abs().max() > 1e-3  # it moved far more than the tolerance


def test_matches_lion_pytorch_cautious():
    """lion_pytorch's cautious variant (cautious_factor=0, no decay) is kaon's cautious mask."""
    from lion_pytorch.cautious_lion import Lion as CautiousLion

    torch.manual_seed(4)
    p = nn.Parameter(torch.randn(32, 24) * 0.1)
    q = nn.Parameter(p.detach().clone())
    opt = kaon.Lion([p], lr=1e-3, cautious=True, gradient_centralization=False,
                    momentum_dtype="float32")
    ref = CautiousLion([q], lr=1e-3, cautious_factor=0.0)
    for g in grads_for((32, 24), 50, seed=5):
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    "config",
    [dict(), dict(weight_decay=0.3), dict(weight_decay=0.3, cautious=False),
     dict(gradient_centralization=False, betas=(0.95, 0.98))],
    ids=["default", "wd", "wd-nocautious", "nogc"],
)
def test_matches_reference(shape, config):
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(shape))
    q = p.detach().clone()
    ref = LionReference(q, lr=1e-2, betas=config.get("betas", (0.9, 0.99)),
                        weight_decay=config.get("weight_decay", 0.0),
                        cautious=config.get("cautious", True),
                        centralize=config.get("gradient_centralization", True))
    opt = kaon.Lion([p], lr=1e-2, momentum_dtype="float32", **config)
    step_both(opt, ref, p, grads_for(shape, 20),
              lambda: torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("momentum", ["bfloat16", "int8", "4bit"])
def test_matches_reference_quantized_momentum(momentum):
    p, q = quantized_momentum_run(kaon.Lion, LionReference, momentum, steps=10)
    # a code can round the other way when two float paths differ in the last bit, and a sign
    # near zero can then flip: allow a few coordinates one step apart
    diff = (p - q).abs()
    assert (diff > 1e-5).float().mean() < 0.01, diff.max()


def test_first_step_is_minus_lr_sign_of_the_gradient():
    p = nn.Parameter(torch.randn(12, 7))
    start = p.detach().clone()
    g = torch.randn(12, 7)
    p.grad = g.clone()
    kaon.Lion([p], lr=0.5, gradient_centralization=False).step()
    torch.testing.assert_close(p.detach(), start - 0.5 * g.sign(), rtol=0, atol=0)


def test_beta1_zero_is_sign_descent_with_no_state():
    p = nn.Parameter(torch.randn(10, 3))
    opt = kaon.Lion([p], lr=0.1, betas=(0.0, 0.99), **PLAIN)
    for g in grads_for((10, 3), 3):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), before - 0.1 * g.sign(), rtol=0, atol=0)
    assert opt.state_bytes() == 0


def test_gradient_centralization_does_not_touch_the_callers_grad():
    p = nn.Parameter(torch.randn(6, 5))
    g = torch.randn(6, 5)
    p.grad = g.clone()
    kaon.Lion([p]).step()
    assert torch.equal(p.grad, g)


@pytest.mark.parametrize("momentum", ["float32", "bfloat16", "int8", "4bit"])
def test_batched_equals_per_parameter_on_repeated_shapes(momentum):
    def run(foreach, budget=None):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s)) for s in [(48, 40)] * 3 + [(40,)] * 3 + [(5, 2, 3, 3)]]
        opt = kaon.Lion(params, lr=1e-2, weight_decay=0.1, momentum_dtype=momentum,
                        momentum_4bit_block=64, foreach=foreach, foreach_stack_budget=budget)
        for i in range(5):
            gen = torch.Generator().manual_seed(i)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params, opt

    loop, opt_loop = run(False)
    for budget in (None, 4000):
        batched, opt_batched = run(True, budget)
        for a, b in zip(loop, batched):
            assert torch.equal(a, b)
        for a, b in zip(loop, batched):
            for key, value in opt_loop.state[a].items():
                assert torch.equal(value, opt_batched.state[b][key]), key


LLM_LIKE = [(1024, 1024), (4096, 1024), (1024, 4096), (1024,), (1024,)]


@pytest.mark.parametrize(("momentum", "target"), [("4bit", 0.54), ("int8", 1.05)])
def test_bytes_per_parameter_on_an_llm_like_stack(momentum, target):
    params = [nn.Parameter(torch.zeros(s)) for s in LLM_LIKE]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = kaon.Lion(params, momentum_dtype=momentum)
    opt.step()
    assert opt.bytes_per_param() <= target
    assert set(opt.state[params[0]]) == {"m", "m_scale"}  # one buffer, no second moment


@pytest.mark.parametrize(("momentum", "per_element"),
                         [("float32", 4.0), ("bfloat16", 2.0), ("int8", 1.0), ("4bit", 0.5)])
def test_momentum_bytes(momentum, per_element):
    p = nn.Parameter(torch.randn(256, 512))
    p.grad = torch.randn_like(p)
    opt = kaon.Lion([p], momentum_dtype=momentum)
    opt.step()
    scales = {"int8": 4 * 256, "4bit": 4 * (256 * 512 // 128)}.get(momentum, 0)
    assert opt.state_bytes() == scales + per_element * p.numel()


def test_bf16_weights_train_with_stochastic_rounding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)).to(torch.bfloat16)
    opt = kaon.Lion(model.parameters(), lr=1e-3, momentum_dtype="int8")
    x = torch.randn(128, 16)
    y = x[:, :3].sum(1, keepdim=True).sin()
    losses = []
    for _ in range(100):
        loss = (model(x.bfloat16()).float() - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
