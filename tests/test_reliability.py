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
