"""AdaPNM against pytorch_optimizer.AdaPNM (1-D path) and the plain reference (all paths)."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import assert_within_ulps
from reference import AdaPNMReference, grads_for, quantized_momentum_run, step_both
from torch import nn

import kaon

SHAPES = [(24, 16), (16, 24), (8, 3, 3, 3), (24,), (1,), ()]



@pytest.mark.parametrize("ams_bound", [False, True], ids=["plain", "ams"])
@pytest.mark.parametrize("beta0", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_1d_path_matches_pytorch_optimizer(ams_bound, beta0, weight_decay):
    po = pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(3)
    shapes = [(40,), (7,), (1,)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    lr, betas = 1e-2, (0.8, 0.99)
    opt = kaon.AdaPNM(ours, lr=lr, betas=betas, beta0=beta0, weight_decay=weight_decay,
                      ams_bound=ams_bound, cautious=False, clip_threshold=0.0,
                      momentum_dtype="float32")
    ref = po.AdaPNM(theirs, lr=lr, betas=(*betas, beta0), weight_decay=weight_decay,
                    weight_decouple=True, ams_bound=ams_bound, eps=1e-8, foreach=False)
    streams = [grads_for(s, 15, seed=i) for i, s in enumerate(shapes)]
    for step in range(15):
        for p, q, grads in zip(ours, theirs, streams):
            p.grad = grads[step].clone()
            q.grad = grads[step].clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            # same math, different association (kaon writes p - (lr*wd*p + step) once)
            torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=1e-7)
        for p, q in zip(ours, theirs):
            theirs_state = ref.state[q]
            # v = b2 v + (1 - b2) g^2 associated differently: up to three roundings of half an
            # ulp per step, each carried on (times b2 < 1), so at most 1.5 ulps per step so far
            assert_within_ulps(opt.state[p]["v"], theirs_state["exp_avg_sq"], 1.5 * (step + 1))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(cautious=False, weight_decay=0.1, beta0=1.0),
        dict(gradient_centralization=False, clip_threshold=0.3, betas=(0.6, 0.99)),
        dict(ams_bound=True, beta0=0.0, clip_threshold=0.0),
    ],
    ids=["default", "wd-nocautious-pnm", "nogc-clip", "ams-adam"],
)
def test_matches_reference(shape, config):
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(shape))
    q = p.detach().clone()
    ref = AdaPNMReference(
        q, lr=1e-2, betas=config.get("betas", (0.8, 0.999)), beta0=config.get("beta0", 0.5),
        weight_decay=config.get("weight_decay", 0.0), clip=config.get("clip_threshold", 1.0),
        cautious=config.get("cautious", True),
        centralize=config.get("gradient_centralization", True),
        ams_bound=config.get("ams_bound", False),
    )
    opt = kaon.AdaPNM([p], lr=1e-2, momentum_dtype="float32", **config)
    step_both(opt, ref, p, grads_for(shape, 12),
              lambda: torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-7))


@pytest.mark.parametrize("momentum", ["bfloat16", "int8", "4bit"])
def test_matches_reference_quantized_momentum(momentum):
    p, q = quantized_momentum_run(kaon.AdaPNM, AdaPNMReference, momentum, steps=8)
    # a code can round the other way when the two float paths differ in the last bit
    diff = (p - q).abs()
    assert diff.max() < 2e-3 and diff.mean() < 1e-5


@pytest.mark.parametrize("momentum", ["float32", "bfloat16", "int8", "4bit"])
def test_only_the_positive_buffer_changes_and_roles_alternate(momentum):
    p = nn.Parameter(torch.randn(12, 20))
    opt = kaon.AdaPNM([p], lr=1e-2, momentum_dtype=momentum, momentum_4bit_block=32)
    changed = []
    for i, g in enumerate(grads_for(p.shape, 6)):
        before = {k: v.clone() for k, v in opt.state[p].items()} if opt.state else None
        p.grad = g
        opt.step()
        state = opt.state[p]
        assert state["step"].item() == i + 1
        if before is not None:
            pos = not torch.equal(before["m_pos"], state["m_pos"])
            neg = not torch.equal(before["m_neg"], state["m_neg"])
            stale = "m_neg" if pos else "m_pos"
            assert pos != neg  # exactly one buffer takes the gradient ...
            for key in [k for k in state if k.startswith(stale)]:
                assert torch.equal(before[key], state[key]), key  # ... the other keeps its bytes
            changed.append("m_pos" if pos else "m_neg")
    assert changed == ["m_neg", "m_pos", "m_neg", "m_pos", "m_neg"]  # steps 2..6


def test_noise_normalization_and_first_step():
    # first step, 1-D, no clip/cautious: m+ = (1 - b1^2) g, m- = 0, v = (1 - b2) g^2, so
    # step = lr / (1 - b1) * (1 + b0) (1 - b1^2) / noise * sign(g) (up to the eps terms)
    b1, b2, b0, lr = 0.8, 0.999, 0.5, 1e-2
    p = nn.Parameter(torch.zeros(50))
    g = torch.randn(50).abs_().add_(0.5)
    p.grad = g.clone()
    kaon.AdaPNM([p], lr=lr, betas=(b1, b2), beta0=b0, cautious=False, clip_threshold=0.0,
                momentum_dtype="float32").step()
    noise = math.sqrt((1 + b0) ** 2 + b0**2)
    expected = lr / (1 - b1) * (1 + b0) * (1 - b1**2) / noise
    torch.testing.assert_close(-p.detach(), torch.full((50,), expected), rtol=1e-4, atol=0)


def test_rms_clip_bounds_a_cold_column():
    # a column that saw no gradient for a while and then a spike: rsqrt(col) is huge
    p = nn.Parameter(torch.randn(16, 16))
    opt = kaon.AdaPNM([p], lr=1e-2, cautious=False, gradient_centralization=False,
                      momentum_dtype="float32")
    for _ in range(20):
        g = torch.randn(16, 16)
        g[:, 3] = 0
        p.grad = g
        opt.step()
    g = torch.randn(16, 16)
    g[:, 3] = 1e3
    p.grad = g
    before = p.detach().clone()
    opt.step()
    step = before - p.detach()
    bias1 = 1 - 0.8 ** opt.state[p]["step"].item()
    assert step.pow(2).mean().sqrt() <= 1e-2 / bias1 * (1 + 1e-5)


def test_weight_decay_is_multiplicative_and_not_masked():
    p = nn.Parameter(torch.full((10,), 2.0))
    opt = kaon.AdaPNM([p], lr=0.1, weight_decay=0.5, cautious=True)
    p.grad = torch.zeros(10)  # cautious masks the whole step; the decay stays
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((10,), 2.0 * (1 - 0.1 * 0.5)))


def test_state_bytes_per_param_on_an_llm_like_stack():
    shapes = [(1024, 1024), (4096, 1024), (1024, 4096), (1024,), (1024,), (4096,)]
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    for dtype, limit in [("int8", 2.1), ("4bit", 1.1), ("bfloat16", 4.1)]:
        opt = kaon.AdaPNM(params, momentum_dtype=dtype)
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
        assert opt.bytes_per_param() <= limit, (dtype, opt.bytes_per_param())
    assert opt.bytes_per_param() > 4.0  # bf16: two buffers of 2 bytes
