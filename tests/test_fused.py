"""The fused path (kaon.fused): the whole chunk step compiled from each optimizer's own rule.

Checked against the eager engine on the same parameters, gradients and seeds: fp32 steps within
the fused-multiply-add rounding of the compiled code, stochastic rounding drawn from the same
stream (bit for bit), exact resume and checkpoint interchange on the fused path itself, the
non-finite policy, the compile-failure fallback and the bound on compiled graphs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from numerics import ulp

import kaon
from kaon import fused


@pytest.fixture(autouse=True)
def _needs_torch_compile():
    """Probed when a test runs, never at collection: compiling anything with inductor before
    tests/test_kernels.py set ``TRITON_INTERPRET=1`` would import Triton without its
    interpreter for the whole test process."""
    if not fused.available():
        pytest.skip("torch.compile does not work here")

# a matrix and a conv kernel alone (chunks of one), three same-shaped matrices and two vectors
# (batched chunks), a vector of odd length
SHAPES = [(96, 64), (8, 4, 3, 3), (32, 48), (32, 48), (32, 48), (40,), (40,), (33,)]

CONFIGS = {
    "Adakaon-int8": (kaon.Adakaon, {"lr": 1e-2, "momentum_dtype": "int8", "weight_decay": 0.1}),
    "Lion-int8": (kaon.Lion, {"lr": 1e-3, "momentum_dtype": "int8"}),
    "AdaPNM": (kaon.AdaPNM, {"lr": 1e-3}),
    "AdamW-int8": (kaon.AdamW, {"lr": 1e-2, "state_dtype": "int8"}),
    "Adafactor8Bit-momentum": (kaon.Adafactor8Bit, {"lr": 1e-2, "beta1": 0.9}),
}


def make(dtype=torch.float32, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.1).to(dtype).requires_grad_() for s in shapes]


def set_grads(*param_lists, step, scale=1.0):
    g = torch.Generator().manual_seed(100 + step)
    for group in zip(*param_lists):
        grad = (torch.randn(group[0].shape, generator=g) * scale).to(group[0].dtype)
        for p in group:
            p.grad = grad.clone()


def assert_step_close(before, eager_after, fused_after):
    """One step from the same weights and state: the fused step is within 1e-6 of the step's
    largest entry of the eager one, plus an ulp of the weights (each step is recovered as
    ``after - before``, which rounds to the weights' spacing)."""
    step_e = eager_after.detach().double() - before.double()
    step_f = fused_after.detach().double() - before.double()
    bound = 1e-6 * step_e.abs().max() + ulp(before.abs().max()).double()
    assert (step_f - step_e).abs().max() <= bound, ((step_f - step_e).abs().max(), bound)


def assert_state_close(eager_state, fused_state):
    assert eager_state.keys() == fused_state.keys()
    for key, value in eager_state.items():
        other = fused_state[key]
        assert value.dtype == other.dtype and value.shape == other.shape, key
        if value.dtype in (torch.bfloat16, torch.float16):
            # rounded once from fp32 values that agree to rounding: at most one spacing apart
            spacing = ulp(torch.maximum(value.abs(), other.abs())).double()
            assert ((value.double() - other.double()).abs() <= spacing).all(), key
        elif key.endswith("_scale") or key.endswith("_offset") or value.is_floating_point():
            # to rounding of the tensor's own scale (an element near zero after a cancellation
            # has no relative accuracy to speak of)
            atol = 1e-6 * float(value.float().abs().max()) + 1e-30
            torch.testing.assert_close(other.float(), value.float(), rtol=1e-5, atol=atol,
                                       msg=key)
        elif value.dtype == torch.uint8 and value.numel() and "sq" not in key:
            # two 4-bit codes per byte: each nibble within one level
            for shift in (0, 4):
                lo = ((value.int() >> shift) & 15) - ((other.int() >> shift) & 15)
                assert lo.abs().max() <= 1, key
        else:  # int8 codes, log-space uint8 codes: within one level
            assert (value.int() - other.int()).abs().max() <= 1, key


def per_step_parity(cls, kw, steps=3, dtype=torch.float32):
    """Each step runs eagerly and fused from the same weights and state (the eager run's),
    and the two results are compared: per-step parity, not trajectories that drift apart."""
    a, b = make(dtype), make(dtype)
    eager = cls(a, fused=False, seed=5, **kw)
    compiled = cls(b, fused=True, seed=5, **kw)
    for step in range(steps):
        if step:
            with torch.no_grad():
                for x, y in zip(a, b):
                    y.copy_(x)
            compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
        set_grads(a, b, step=step)
        before = [p.detach().float().clone() for p in a]
        eager.step()
        compiled.step()
        assert compiled._fused_broken is None, compiled._fused_broken
        for x0, x, y in zip(before, a, b):
            assert_step_close(x0, x, y)
        for x, y in zip(a, b):
            assert_state_close(eager.state[x], compiled.state[y])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_step_matches_the_eager_rule(name):
    cls, kw = CONFIGS[name]
    per_step_parity(cls, kw)


def test_bf16_stochastic_rounding_draws_the_same_stream_bit_for_bit():
    a, b = make(torch.bfloat16), make(torch.bfloat16)
    eager = kaon.Lion(a, lr=1e-3, fused=False, seed=9)
    compiled = kaon.Lion(b, lr=1e-3, fused=True, seed=9)
    for step in range(3):
        set_grads(a, b, step=step)
        eager.step()
        compiled.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(eager._generator(torch.device("cpu")).get_state(),
                       compiled._generator(torch.device("cpu")).get_state())


def test_kahan_write_back_keeps_the_same_sum_of_weight_and_compensation():
    a, b = make(torch.bfloat16), make(torch.bfloat16)
    kw = {"lr": 1e-2, "momentum_dtype": "int8", "bf16_method": "kahan"}
    eager = kaon.Adakaon(a, fused=False, **kw)
    compiled = kaon.Adakaon(b, fused=True, **kw)
    set_grads(a, b, step=0)  # one step from the same state (trajectories drift apart later)
    eager.step()
    compiled.step()
    for x, y in zip(a, b):
        total_e = x.float() + eager.state[x]["shift"].float().view_as(x)
        total_c = y.float() + compiled.state[y]["shift"].float().view_as(y)
        # the weights may round to the neighbouring bf16 value; weight + compensation agree
        assert (total_e - total_c).abs().max() <= 1e-5


def test_fused_path_resumes_exactly_and_checkpoints_interchange(tmp_path):
    cls, kw = CONFIGS["Adakaon-int8"]
    whole = make()
    opt = cls(whole, fused=True, **kw)
    for step in range(4):
        set_grads(whole, step=step)
        opt.step()
    # eager for two steps, checkpoint, then two fused steps in a new optimizer
    resumed = make()
    first = cls(resumed, fused=False, **kw)
    for step in range(2):
        set_grads(resumed, step=step)
        first.step()
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    second = cls(resumed, fused=True, **kw)
    second.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for step in range(2, 4):
        set_grads(resumed, step=step)
        second.step()
    # a fused run, and a run resumed onto the fused path, continue alike (the eager steps
    # before the checkpoint agree with fused ones to rounding, so compare to that)
    for x, y in zip(whole, resumed):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    # exact resume on the fused path itself: checkpoint a fused run, continue in a new one
    again = make()
    a1 = cls(again, fused=True, **kw)
    for step in range(2):
        set_grads(again, step=step)
        a1.step()
    state = a1.state_dict()
    twin = [p.detach().clone().requires_grad_() for p in again]
    a2 = cls(twin, fused=True, **kw)
    a2.load_state_dict(state)
    for step in range(2, 4):
        set_grads(again, twin, step=step)
        a1.step()
        a2.step()
    for x, y in zip(again, twin):
        assert torch.equal(x, y)


def test_a_nonfinite_gradient_is_skipped_exactly_on_the_fused_path():
    cls, kw = CONFIGS["Adakaon-int8"]
    params = make()
    opt = cls(params, fused=True, **kw)
    set_grads(params, step=0)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = {i: {k: v.clone() for k, v in opt.state[p].items()}
                    for i, p in enumerate(params)}
    set_grads(params, step=1)
    params[0].grad[3, 5] = float("nan")  # a tensor alone
    params[3].grad[0, 0] = float("inf")  # one of a batched chunk
    opt.step()
    for i in (0, 3):
        assert torch.equal(params[i], before[i])
        for k, v in opt.state[params[i]].items():
            assert torch.equal(v, state_before[i][k]), k
    for i in (1, 2, 4, 5):
        assert not torch.equal(params[i], before[i])
    assert all(torch.isfinite(p).all() for p in params)


def test_a_gradient_near_the_fp32_limit_keeps_weights_finite():
    cls, kw = CONFIGS["AdamW-int8"]
    params = make()
    opt = cls(params, fused=True, **kw)
    set_grads(params, step=0, scale=1e37)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    for p in params:
        assert all(torch.isfinite(v).all() for v in opt.state[p].values() if v.is_floating_point())


def test_compile_failure_falls_back_to_the_eager_rule_with_one_warning(monkeypatch):
    def broken(static):
        def fail(*args):
            raise RuntimeError("no compiler\nsecond line")
        return fail

    monkeypatch.setattr(fused, "_compiled", broken)
    a, b = make(torch.bfloat16), make(torch.bfloat16)
    eager = kaon.Lion(a, lr=1e-3, fused=False, seed=2)
    fallback = kaon.Lion(b, lr=1e-3, fused=True, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            set_grads(a, b, step=step)
            eager.step()
            fallback.step()
    messages = [str(w.message) for w in caught if "eager rule" in str(w.message)]
    assert len(messages) == 1 and "no compiler" in messages[0] and "second" not in messages[0]
    assert "RuntimeError" in fallback._fused_broken
    for x, y in zip(a, b):  # the same stream: the failed attempt drew nothing
        assert torch.equal(x, y)


def test_default_policy_compiles_only_when_enabled_and_for_large_cpu_groups(monkeypatch):
    small = make()
    opt = kaon.Adakaon(small, lr=1e-2)
    for p in small:
        p.grad = torch.zeros_like(p)
    monkeypatch.setattr(fused, "AUTO", True)
    assert not fused.wanted(opt, opt.param_groups[0], small)  # below MIN_NUMEL: eager
    monkeypatch.setattr(fused, "MIN_NUMEL", 10)
    monkeypatch.setattr(fused, "AUTO", False)
    assert not fused.wanted(opt, opt.param_groups[0], small)  # fused=None: eager by default
    monkeypatch.setattr(fused, "AUTO", True)
    assert fused.wanted(opt, opt.param_groups[0], small)
    assert not fused.wanted(kaon.Adakaon(small, fused=False), opt.param_groups[0], small)
    nekaon = kaon.Nekaon(small, lr=1e-2)  # not validated for fused=None
    assert not fused.wanted(nekaon, nekaon.param_groups[0], small)
    assert fused.wanted(kaon.Nekaon(small, fused=True), nekaon.param_groups[0], small)


def test_many_parameter_shapes_compile_a_bounded_number_of_graphs():
    from torch._dynamo.utils import counters

    cls, kw = CONFIGS["Adakaon-int8"]
    warm = make()
    opt = cls(warm, fused=True, **kw)
    set_grads(warm, step=0)
    opt.step()  # the layouts of SHAPES: compiled here or by an earlier test
    before = counters["stats"]["unique_graphs"]
    shapes = [(16 + 8 * i, 24 + 4 * i) for i in range(12)] + [(50 + i,) for i in range(6)]
    params = make(shapes=shapes)
    opt = cls(params, fused=True, **kw)
    for step in range(2):
        set_grads(params, step=step)
        opt.step()
    assert opt._fused_broken is None
    # 18 new shapes, new sizes for every dim: a few new graphs (dynamo specializes equal sizes,
    # such as a square matrix, and sizes 0 and 1), not one per shape
    assert counters["stats"]["unique_graphs"] - before <= 4


def test_fused_true_runs_what_torchs_kernel_cannot_on_the_compiled_path():
    """fused=True with int8 state, a 0-D and a bf16 parameter: torch's kernel cannot run them,
    kaon's compiled path (kaon.fused) does, and equals the eager rule."""
    def make():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(64, 48, generator=g).requires_grad_(),
                torch.randn((), generator=g).requires_grad_(),
                torch.randn(40, generator=g).to(torch.bfloat16).requires_grad_()]
    a, b = make(), make()
    eager = kaon.AdamW(a, lr=1e-2, state_dtype="int8", fused=False, seed=1)
    compiled = kaon.AdamW(b, lr=1e-2, state_dtype="int8", fused=True, seed=1)
    for step in range(3):
        g = torch.Generator().manual_seed(10 + step)
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, generator=g).to(x.dtype)
            y.grad = x.grad.clone()
        eager.step()
        compiled.step()
    assert compiled._fused_broken is None
    for x, y in zip(a, b):
        assert torch.allclose(x.float(), y.float(), rtol=0, atol=1e-6), (x - y).abs().max()
