"""kaon.AdamW against torch.optim.AdamW, the fused path, state storage and bytes per parameter."""

from __future__ import annotations

import io

import pytest
import torch

import kaon
from kaon.optim import adamw as adamw_module

SHAPES = [(16, 8), (8,), (4, 3, 3, 3), (5, 7)]


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def set_grads(params, i):
    gen = torch.Generator().manual_seed(100 + i)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def max_difference(kwargs, torch_kwargs=None, steps=50, lr_schedule=False):
    """Largest |p_kaon - p_torch| over ``steps`` steps with identical gradients."""
    ours, theirs = make_params(), make_params()
    opt = kaon.AdamW(ours, **kwargs)
    ref = torch.optim.AdamW(theirs, foreach=False, **(torch_kwargs or {
        k: v for k, v in kwargs.items() if k not in ("fused", "foreach")}))
    scheds = []
    if lr_schedule:
        scheds = [torch.optim.lr_scheduler.StepLR(o, 10, 0.5) for o in (opt, ref)]
    worst = 0.0
    for i in range(steps):
        set_grads(ours, i)
        set_grads(theirs, i)
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(ours, theirs)))
    return worst


CONFIGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, maximize=True),
    dict(lr=1e-2, betas=(0.0, 0.999), weight_decay=0.5),
]


@pytest.mark.parametrize("fused", [None, False], ids=["auto-fused", "engine"])
@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
def test_matches_torch_adamw_over_50_steps(kwargs, fused):
    assert max_difference({**kwargs, "fused": fused}) <= 1e-6


@pytest.mark.parametrize("fused", [None, False], ids=["auto-fused", "engine"])
def test_matches_torch_with_a_scheduler_and_a_tensor_lr(fused):
    assert max_difference({"lr": 1e-2, "fused": fused}, lr_schedule=True) <= 1e-6
    assert max_difference({"lr": torch.tensor(1e-2), "fused": fused}) <= 1e-6


@pytest.mark.parametrize(
    "wrong",
    ["bias_correction", "decay", "beta2"],
)
def test_the_parity_test_fails_on_a_wrong_formula(monkeypatch, wrong):
    """Test of the test: each deliberate error in the rule must break the 1e-6 parity."""
    if wrong == "bias_correction":
        monkeypatch.setattr(adamw_module, "_bias_correction",
                            lambda beta, step: torch.ones_like(step) * (1 - beta))
    elif wrong == "decay":
        original = adamw_module.decoupled_decay_
        monkeypatch.setattr(adamw_module, "decoupled_decay_",
                            lambda d, p, lr, wd, out=None: original(d, p, lr, wd * 1.01, out))
    else:
        original = adamw_module.adam_direction
        monkeypatch.setattr(
            adamw_module, "adam_direction",
            lambda g, m, v, s, betas, eps, **kw: original(g, m, v, s, (betas[0], 0.998), eps, **kw))
    assert max_difference({"lr": 1e-2, "weight_decay": 0.1, "fused": False}) > 1e-5


def test_fused_path_runs_where_exact_and_switching_paths_keeps_parity(monkeypatch):
    calls = []
    original = adamw_module._torch_adam
    monkeypatch.setattr(adamw_module, "_torch_adam",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    ours, theirs = make_params(), make_params()
    opt = kaon.AdamW(ours, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    for i in range(30):
        if i == 10:
            opt.param_groups[0]["fused"] = False  # engine path on the same state
        if i == 20:
            opt.param_groups[0]["fused"] = None
        set_grads(ours, i)
        set_grads(theirs, i)
        opt.step()
        ref.step()
    assert len(calls) == 20  # steps 0-9 and 20-29
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-6
    for p, q in zip(ours, theirs):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].shape == ref.state[q][key].shape
            assert torch.allclose(opt.state[p][key], ref.state[q][key], atol=1e-6)


def test_fused_path_skips_a_nonfinite_gradient_exactly():
    ours = make_params()
    opt = kaon.AdamW(ours, lr=1e-2)
    set_grads(ours, 0)
    opt.step()
    before = [p.detach().clone() for p in ours]
    steps = [opt.state[p]["step"].clone() for p in ours]
    set_grads(ours, 1)
    ours[0].grad[0, 0] = float("nan")
    opt.step()
    assert torch.equal(ours[0], before[0]) and opt.state[ours[0]]["step"] == steps[0]
    assert all(not torch.equal(p, b) for p, b in zip(ours[1:], before[1:]))
    assert all(opt.state[p]["step"] == 2 for p in ours[1:])


def test_torch_checkpoint_loads_and_continues_identically():
    ours, theirs = make_params(), make_params()
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for i in range(5):
        set_grads(theirs, i)
        ref.step()
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    buffer.seek(0)
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    opt = kaon.AdamW(ours, lr=1e-2, fused=False)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    for i in range(5, 15):
        set_grads(ours, i)
        set_grads(theirs, i)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-6


def quantize_bf16(x):
    return x.to(torch.bfloat16).float()


def test_bfloat16_state_matches_a_plain_reference():
    """bf16 moments: the step uses the fp32 moments, storage rounds them to nearest."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(32, 16, generator=gen).requires_grad_()
    ref_p = p.detach().clone()
    m, v = torch.zeros_like(ref_p), torch.zeros_like(ref_p)
    opt = kaon.AdamW([p], lr=1e-2, weight_decay=0.1, state_dtype="bfloat16")
    beta1, beta2, lr, wd, eps = 0.9, 0.999, 1e-2, 0.1, 1e-8
    for t in range(1, 21):
        g = torch.randn(p.shape, generator=gen)
        p.grad = g.clone()
        opt.step()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        step = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        ref_p = ref_p - lr * wd * ref_p - lr * step
        m, v = quantize_bf16(m), quantize_bf16(v)
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(opt.state[p]["exp_avg"].float(), m)
    assert (p - ref_p).abs().max() <= 1e-5


def fit_quadratic(state_dtype, steps=200):
    torch.manual_seed(0)
    target = torch.randn(64, 32)
    w = torch.zeros(64, 32, requires_grad=True)
    opt = kaon.AdamW([w], lr=1e-2, state_dtype=state_dtype, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = (w - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return w.detach(), losses


@pytest.mark.parametrize("state_dtype", ["int8", ("int8", "log4"), ("float32", "log4")], ids=str)
def test_quantized_state_stays_close_to_fp32_adamw(state_dtype):
    """int8 moments (log-space second moment: no blow-up) follow float32 AdamW closely."""
    w32, losses32 = fit_quadratic("float32")
    w, losses = fit_quadratic(state_dtype)
    assert (w - w32).norm() < 0.1 * w32.norm()
    assert losses[-1] < 1.25 * losses32[-1]


def test_4bit_state_trains():
    """4bit moments: 7 levels per sign lose small momenta (see docs/adamw.md), but it trains."""
    _, losses = fit_quadratic("4bit")
    assert max(losses[1:]) <= losses[0] and losses[-1] < 0.6 * losses[0]


LLM_SHAPES = [(1024, 1024), (4096, 1024), (1024, 4096), (1024,), (1024,), (1024,), (1024,)]


def bytes_per_param(opt_factory):
    params = [torch.zeros(s, requires_grad=True) for s in LLM_SHAPES]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = opt_factory(params)
    opt.step()
    return opt.bytes_per_param()


@pytest.mark.parametrize(
    ("state_dtype", "low", "high"),
    [("float32", 7.99, 8.001), ("bfloat16", 3.99, 4.001), ("int8", 1.9, 2.1), ("4bit", 0.9, 1.1)],
)
def test_bytes_per_parameter_targets(state_dtype, low, high):
    measured = bytes_per_param(lambda ps: kaon.AdamW(ps, state_dtype=state_dtype))
    assert low <= measured <= high, measured
