"""Issue 17: nothing a user or a checkpoint feeds kaon may corrupt weights or state.

One test (or parametrized family) per numbered defect class of the issue; the property-based
suite over the whole registry is ``test_reliability_properties.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conformance import OPTIMIZERS, Entry
from test_conformance import make_model, set_grads

import kaon


def _finite(opt, model) -> bool:
    weights = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    state = all(bool(torch.isfinite(v.float()).all()) for s in opt.state.values()
                for v in s.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    return weights and state


def _snapshot(opt, model):
    return ([p.detach().clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            bool(torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                       and torch.equal(a.nan_to_num(), b.nan_to_num())))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b or (a != a and b != b)


# --------------------------------------------------------------- 1: fused AdamW, strided params
@pytest.mark.parametrize("make_view", [lambda base: base[:, 1:3], lambda base: base.t(),
                                       lambda base: base[::2]])
def test_1_adamw_non_contiguous_params_match_torch(make_view):
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    ref_base = base.clone()
    p = make_view(base)
    ref = make_view(ref_base)
    assert not p.is_contiguous()
    p.requires_grad_(True)
    ref.requires_grad_(True)
    opt = kaon.AdamW([p], lr=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.1)
    for i in range(3):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(base, ref_base, rtol=1e-6, atol=1e-7)


# --------------------------------------------- 2: finite but huge gradients, overflow-safe rules
def _signed(p: torch.Tensor, magnitude: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p.shape, generator=gen).sign_().mul_(magnitude).to(p.dtype)


@pytest.mark.parametrize("magnitude", [1e20, 3e38])
@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_2_huge_finite_gradients_keep_weights_and_state_finite(entry: Entry, magnitude):
    model = make_model()
    opt = entry.make(model.parameters(), lr=entry.train_lr)
    set_grads(model, 0)
    opt.step()
    for i in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = _signed(p, magnitude, i)
        opt.step()
        assert _finite(opt, model), f"{entry.name}: non-finite weights or state"
        moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
        assert any(moved), f"{entry.name}: the step with a finite gradient was dropped"
    # the state stays finite under ordinary gradients afterwards, so it decays back (an
    # infinite second moment would freeze the parameter for good)
    set_grads(model, 1)
    opt.step()
    assert _finite(opt, model)


def test_2_ordinary_gradients_are_not_rescaled():
    # the screen passes gradients below the threshold through untouched, bit for bit
    from kaon import engine

    flat = torch.randn(3, 100) * 1e6
    flat[1, 7] = engine.GRAD_SAFE_MAX
    finite, scale = engine.screen_gradients(flat)
    assert finite is None and scale is None
    flat[2, 3] = engine.GRAD_SAFE_MAX * 3
    finite, scale = engine.screen_gradients(flat)
    assert finite is None and scale.tolist() == [1.0, 1.0, 0.25]


# -------------------------------------- 6: "skip" does not skip gradients whose sum overflows
@pytest.mark.parametrize("entry", [e for e in OPTIMIZERS if e.name in (
    "Adakaon", "AdamW", "AdamW-engine", "Lion", "KProdigy", "ScheduleFreeAdamW",
    "Adafactor8Bit", "Muon")], ids=repr)
def test_6_skip_keeps_finite_gradients_whose_sum_overflows(entry: Entry):
    model = make_model()
    opt = entry.make(model.parameters(), lr=entry.train_lr, nonfinite_grad="skip")
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():  # every element in [1e38, 2e38]: the sum overflows
        p.grad = torch.rand(p.shape, generator=gen).add_(1.0).mul_(1e38)
    opt.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert all(moved), f"{entry.name}: a finite gradient was skipped"
    assert _finite(opt, model)
