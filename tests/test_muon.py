"""kaon.Muon against torch.optim.Muon and a plain reference; routing, the AdamW path, memory."""

from __future__ import annotations

import pytest
import torch
from reference import newton_schulz_reference

import kaon
from kaon.optim.muon import adamw_path_lr, is_hidden_matrix

torch_muon = pytest.importorskip("torch.optim._muon")
SHAPES = [(32, 16), (16, 48), (24, 24)]


def fp32_torch_ns(grad, coefficients, steps, eps):
    """torch's Newton-Schulz contract, in fp32 (torch's own runs in bf16)."""
    assert tuple(coefficients) == (3.4445, -4.7750, 2.0315)
    return newton_schulz_reference(grad, steps, eps)


def run_pair(kaon_kwargs, torch_kwargs, steps=20, shapes=SHAPES, reshape=None):
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    theirs = [(p.detach().reshape(reshape(p)) if reshape else p.detach()).clone().requires_grad_()
              for p in ours]
    opt = kaon.Muon(ours, muon=True, **kaon_kwargs)
    ref = torch.optim.Muon(theirs, **torch_kwargs)
    worst = 0.0
    for i in range(steps):
        gen = torch.Generator().manual_seed(100 + i)
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g.clone()
            q.grad = g.reshape(q.shape).clone()
        opt.step()
        ref.step()
        worst = max(worst, max((a.reshape(b.shape) - b).abs().max().item()
                               for a, b in zip(ours, theirs)))
    return worst


PARITY = [
    dict(lr=0.02, weight_decay=0.1, nesterov=True),
    dict(lr=0.02, weight_decay=0.0, nesterov=False, momentum=0.9),
    dict(lr=0.001, weight_decay=0.1, nesterov=True, adjust_lr_fn="match_rms_adamw"),
    dict(lr=0.02, weight_decay=0.05, nesterov=True, adjust_lr_fn="spectral_unclamped"),
]


@pytest.mark.parametrize("kwargs", PARITY, ids=str)
def test_matches_torch_muon_in_fp32(monkeypatch, kwargs):
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", fp32_torch_ns)
    ours = {**kwargs, "momentum_dtype": "float32", "ns_dtype": "float32"}
    assert run_pair(ours, kwargs) <= 2e-6


@pytest.mark.parametrize(
    "wrong",
    [dict(ns_coefficients=(3.4445, -4.7750, 2.0)), dict(nesterov=False), dict(momentum=0.9),
     dict(adjust_lr_fn="spectral_unclamped"), dict(eps=1e-7, ns_steps=4)],
    ids=str,
)
def test_the_parity_test_fails_on_a_wrong_setting(monkeypatch, wrong):
    """Test of the test: a wrong coefficient (or momentum form, scale, step count) breaks it."""
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", fp32_torch_ns)
    torch_kwargs = dict(lr=0.02, weight_decay=0.1, nesterov=True, momentum=0.95)
    ours = {**torch_kwargs, "momentum_dtype": "float32", "ns_dtype": "float32", **wrong}
    assert run_pair(ours, torch_kwargs) > 1e-4


def test_matches_torch_muon_in_bf16_to_rounding():
    """The defaults (bf16 iteration, bf16 momentum) against torch's bf16 Muon, unpatched."""
    kwargs = dict(lr=0.02, weight_decay=0.1)
    difference = run_pair(kwargs, kwargs, steps=10)
    motion = 10 * 0.02 * 1.5  # about lr * scale per step, per element, at most
    assert difference < 0.02 * motion
    assert difference > 0  # bf16: not bit-identical (normalization order differs)


def test_conv_kernel_uses_the_out_by_fan_in_view():
    kwargs = dict(lr=0.02, weight_decay=0.1)
    shapes = [(8, 4, 3, 3), (6, 2, 5)]

    def flat(p):
        return (p.shape[0], -1)

    monkey = pytest.MonkeyPatch()
    monkey.setattr(torch_muon, "_zeropower_via_newtonschulz", fp32_torch_ns)
    try:
        ours = {**kwargs, "momentum_dtype": "float32", "ns_dtype": "float32"}
        assert run_pair(ours, kwargs, shapes=shapes, reshape=flat) <= 2e-6
    finally:
        monkey.undo()
    p = torch.zeros(8, 4, 3, 3, requires_grad=True)
    opt = kaon.Muon([p])
    p.grad = torch.randn(p.shape)
    opt.step()
    assert opt.state[p]["momentum_buffer"].shape == (8, 36)


def test_routing_by_shape_and_explicit_keys():
    hidden = torch.zeros(64, 64, requires_grad=True)
    embedding = torch.zeros(1000, 16, requires_grad=True)  # aspect ratio 62.5
    norm = torch.zeros(64, requires_grad=True)
    forced = torch.zeros(32, 32, requires_grad=True)
    opt = kaon.Muon([{"params": [hidden, embedding, norm]},
                     {"params": [forced], "muon": False}])
    for p in (hidden, embedding, norm, forced):
        p.grad = torch.randn(p.shape)
    opt.step()
    assert set(opt.state[hidden]) == {"momentum_buffer"}
    for p in (embedding, norm, forced):
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert is_hidden_matrix((640, 320, 3, 3)) and not is_hidden_matrix((4, 320, 3, 3))
    # refused when the group is made (issue 17), not at the first step
    with pytest.raises(ValueError, match="muon=True"):
        kaon.Muon([{"params": [torch.zeros(3, requires_grad=True)], "muon": True}])
    with pytest.raises(ValueError, match="muon=True"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "muon": True})
    assert len(opt.param_groups) == 2
    bad = kaon.Muon([torch.zeros(3, requires_grad=True)])  # set by hand afterwards: at step()
    bad.param_groups[0]["muon"] = True
    bad.param_groups[0]["params"][0].grad = torch.ones(3)
    with pytest.raises(ValueError, match="muon=True"):
        bad.step()


def test_adamw_path_is_torch_adamw_and_follows_the_schedule():
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in [(40,), (500, 8)]]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = kaon.Muon(ours, lr=0.02, adam_lr=1e-2, adam_betas=(0.9, 0.95), adam_eps=1e-8,
                    weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            foreach=False)
    schedules = [torch.optim.lr_scheduler.StepLR(o, 5, 0.5) for o in (opt, ref)]
    for i in range(20):
        gen = torch.Generator().manual_seed(100 + i)
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for s in schedules:
            s.step()
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-6
    group = opt.param_groups[0]
    assert adamw_path_lr(group) == pytest.approx(1e-2 * group["lr"] / 0.02, rel=1e-12)
    group["lr"] = group["lr"] / 2
    assert adamw_path_lr(group) == pytest.approx(1e-2 * group["lr"] / 0.02, rel=1e-12)


def test_state_dict_holds_both_paths():
    a, b = torch.zeros(16, 16, requires_grad=True), torch.zeros(16, requires_grad=True)
    opt = kaon.Muon([a, b])
    a.grad, b.grad = torch.randn(16, 16), torch.randn(16)
    opt.step()
    saved = opt.state_dict()
    keys = [set(s) for s in saved["state"].values()]
    assert {"momentum_buffer"} in keys and {"step", "exp_avg", "exp_avg_sq"} in keys
    assert saved["param_groups"][0]["base_lr"] == 0.02


def test_bytes_per_parameter_on_matrices():
    shapes = [(1024, 1024), (4096, 1024), (1024, 4096)]
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    opt = kaon.Muon(params, momentum_dtype="bfloat16")
    opt.step()
    assert opt.bytes_per_param() <= 2.05
    opt32 = kaon.Muon(params, momentum_dtype="float32")
    opt32.step()
    assert opt32.bytes_per_param() == pytest.approx(4.0)
