"""AdaMuon against the plain reference, and its own features."""

from __future__ import annotations

import time

import pytest
import torch
from reference import AdaMuonReference, grads_for, step_both
from torch import nn

import kaon
from kaon.optim import adamuon

SHAPES = [(24, 16), (16, 24), (8, 3, 3, 3), (24,), (1,), ()]
CONFIGS = [
    dict(),
    dict(betas=(0.0, 0.999)),
    dict(weight_decay=0.1, cautious=False),
    dict(gradient_centralization=True, clip_threshold=0.5, betas=(0.8, 0.99), ns_steps=5),
]
CONFIG_IDS = ["default", "nomomentum", "wd-nocautious", "gc-clip-ns5"]



def _pair(shape, config, ns_dtype, lr=1e-2, momentum="float32", seed=1):
    torch.manual_seed(seed)
    p = nn.Parameter(torch.randn(shape))
    q = p.detach().clone()
    ref = AdaMuonReference(
        q, lr=lr, betas=config.get("betas", (0.95, 0.999)),
        weight_decay=config.get("weight_decay", 0.0), ns_steps=config.get("ns_steps", 2),
        clip=config.get("clip_threshold", 1.0), cautious=config.get("cautious", True),
        centralize=config.get("gradient_centralization", False), momentum=momentum, block=64,
        ns_dtype=ns_dtype,
    )
    opt = kaon.AdaMuon([p], lr=lr, momentum_dtype=momentum, momentum_4bit_block=64, **config)
    opt._ns_dtype = ns_dtype
    return p, q, opt, ref


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_matches_reference_with_float32_newton_schulz(shape, config):
    p, q, opt, ref = _pair(shape, config, torch.float32)
    step_both(opt, ref, p, grads_for(shape, 12),
              lambda: torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (8, 3, 3, 3)], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_matches_reference_with_bf16_newton_schulz(shape, config):
    """The default bf16 iteration, against the reference's own bf16 iteration.

    The two evaluate the quintic in a different order in bf16, so they agree to bf16 accuracy:
    the total displacement agrees to a few percent (ns_steps=5 amplifies bf16 rounding most).
    """
    p, q, opt, ref = _pair(shape, config, torch.bfloat16)
    start = q.clone()
    step_both(opt, ref, p, grads_for(shape, 12))
    moved, expected = p.detach() - start, q - start
    assert (moved - expected).norm() < 0.05 * expected.norm()


@pytest.mark.parametrize("momentum", ["bfloat16", "int8", "4bit"])
@pytest.mark.parametrize("shape", [(32, 40), (40,)], ids=str)
def test_matches_reference_quantized_momentum(momentum, shape):
    p, q, opt, ref = _pair(shape, {}, torch.float32, momentum=momentum, seed=2)
    start = q.clone()
    step_both(opt, ref, p, grads_for(shape, 8))
    # the reference stores the lr-scaled momentum of a vector, kaon the unit-space one: the same
    # value, rounded differently (bf16 rounding is relative, not scale-free)
    moved, expected = p.detach() - start, q - start
    assert (moved - expected).norm() < 5e-3 * expected.norm()


def test_first_step_has_rms_one_fifth_of_lr():
    """At step one the unclipped update is far above RMS 1, so the step is 0.2 lr exactly."""
    p = nn.Parameter(torch.randn(64, 32))
    start = p.detach().clone()
    p.grad = torch.randn(64, 32)
    kaon.AdaMuon([p], lr=0.1, cautious=False).step()
    rms = (p.detach() - start).pow(2).mean().sqrt()
    torch.testing.assert_close(rms, torch.tensor(0.2 * 0.1), rtol=1e-4, atol=0)


def test_update_of_a_matrix_is_orthogonalized():
    """With beta1 = 0 and fp32 NS the step's singular values are flattened toward one value."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(32, 32))
    u, _, v = torch.linalg.svd(torch.randn(32, 32))
    g = u @ torch.diag(torch.logspace(0, -2, 32)) @ v  # condition number 100
    p.grad = g
    opt = kaon.AdaMuon([p], lr=1.0, betas=(0.0, 0.999), cautious=False, ns_steps=5)
    opt._ns_dtype = torch.float32
    opt.step()
    s = torch.linalg.svdvals(p.detach())
    assert s.max() / s[: 28].min() < 3  # the gradient's ratio over the same span is > 50


def test_state_routing_by_rank_and_conv_as_matrix():
    conv = nn.Conv2d(8, 16, 3)
    opt = kaon.AdaMuon(conv.parameters(), momentum_dtype="int8")
    conv(torch.randn(2, 8, 6, 6)).sum().backward()
    opt.step()
    state = opt.state[conv.weight]
    assert set(state) == {"row", "col", "m", "m_scale"}
    assert state["row"].shape == (16,) and state["col"].shape == (8 * 9,)
    assert state["m"].shape == (16, 72) and state["m_scale"].shape == (16, 1)
    assert set(opt.state[conv.bias]) == {"v", "m", "m_scale"}


def _run_many(foreach, momentum, budget=None, steps=4):
    torch.manual_seed(0)
    shapes = [(48, 40)] * 3 + [(40, 48)] * 2 + [(6, 2, 3, 3)] * 2 + [(40,)] * 3 + [(7,)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    opt = kaon.AdaMuon(params, lr=1e-2, weight_decay=0.1, momentum_dtype=momentum,
                       momentum_4bit_block=64, foreach=foreach, foreach_stack_budget=budget,
                       gradient_centralization=True)
    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("momentum", ["bfloat16", "int8", "4bit"])
def test_batched_equals_per_parameter_bit_for_bit_with_bf16_newton_schulz(momentum):
    """Repeated matrix shapes go through one batched bf16 NS; on CPU that is still exact."""
    loop, opt_loop = _run_many(False, momentum)
    for budget in (None, 5000):
        batched, opt_batched = _run_many(True, momentum, budget)
        for a, b in zip(loop, batched):
            assert torch.equal(a, b)
            for key, value in opt_loop.state[a].items():
                assert torch.equal(value, opt_batched.state[b][key]), key


LLM_LIKE = [(1024, 1024), (4096, 1024), (1024, 4096), (1024,), (1024,)]


@pytest.mark.parametrize(("momentum", "target"), [("int8", 1.06), ("4bit", 0.56)])
def test_bytes_per_parameter_on_an_llm_like_stack(momentum, target):
    params = [nn.Parameter(torch.zeros(s)) for s in LLM_LIKE]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = kaon.AdaMuon(params, momentum_dtype=momentum)
    opt.step()
    assert opt.bytes_per_param() <= target


def test_compile_is_off_by_default_and_validated():
    p = nn.Parameter(torch.randn(4, 4))
    assert kaon.AdaMuon([p]).defaults["compile"] is False
    assert kaon.AdaMuon([p], compile=True).defaults["compile"] is True
    with pytest.raises(TypeError, match="compile"):
        kaon.AdaMuon([p], compile="yes")


def test_compiled_rule_equals_eager(monkeypatch):
    """compile=True routes the direction through torch.compile; with dynamo's eager backend
    (tracing only, no C++ compiler needed) the result is the eager one."""
    real_compile = torch.compile
    calls = []

    def eager_compile(fn, **kwargs):
        calls.append(fn.__name__)
        return real_compile(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setattr(adamuon, "_COMPILED", {})
    torch._dynamo.reset()

    def run(compile):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s)) for s in [(12, 8), (12, 8), (8,)]]
        opt = kaon.AdaMuon(params, lr=1e-2, momentum_dtype="int8", compile=compile)
        for g in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(g))
            opt.step()
        return params

    eager = run(False)
    assert not calls
    compiled = run(True)
    assert sorted(calls) == ["_matrix_direction", "_vector_direction"]
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch._dynamo.reset()


def test_compiled_with_inductor_if_available():
    """The real thing (inductor); skipped when it cannot compile here or is too slow for CI."""
    torch._dynamo.reset()
    adamuon._COMPILED.clear()
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(16, 8))
    q = nn.Parameter(p.detach().clone())
    eager = kaon.AdaMuon([p], lr=1e-2)
    compiled = kaon.AdaMuon([q], lr=1e-2, compile=True)
    g = torch.randn(16, 8)
    p.grad, q.grad = g.clone(), g.clone()
    eager.step()
    start = time.monotonic()
    try:
        compiled.step()
    except Exception as error:  # no compiler, unsupported platform
        pytest.skip(f"torch.compile unavailable here: {type(error).__name__}")
    finally:
        adamuon._COMPILED.clear()
        torch._dynamo.reset()
    if time.monotonic() - start > 30:
        pytest.skip("compiling took over 30 s")
    torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
