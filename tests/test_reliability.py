"""Inputs that once corrupted weights or dropped steps silently (issue 17's reproductions)."""

from __future__ import annotations

import torch

import kaon


def test_adamw_default_on_a_strided_view_matches_torch_and_leaves_the_base_alone():
    """torch's fused CPU kernel walks storage linearly; kaon.AdamW must not hand it a column
    slice (it wrote into the neighbouring columns and computed a wrong step)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 6, generator=gen)
    ours_base, theirs_base = base.clone(), base.clone()
    ours = ours_base[:, 1:4]  # a strided view of the base tensor, as a leaf parameter
    theirs = theirs_base[:, 1:4].clone()
    ours.requires_grad_(True)
    theirs.requires_grad_(True)
    opt = kaon.AdamW([ours], lr=1e-1, weight_decay=0.01)
    ref = torch.optim.AdamW([theirs], lr=1e-1, weight_decay=0.01, foreach=False)
    for _ in range(3):
        g = torch.randn(8, 3, generator=gen)
        ours.grad, theirs.grad = g.clone(), g.clone()
        with torch.no_grad():
            opt.step()
            ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)
    untouched = torch.ones(6, dtype=torch.bool)
    untouched[1:4] = False
    assert torch.equal(ours_base[:, untouched], base[:, untouched])


def test_skip_policy_steps_finite_gradients_whose_sum_overflows():
    """2e38 in every element is finite; its sum is not. The step must run, not be skipped."""
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = kaon.Lion([p], lr=1e-2, momentum_dtype="float32",
                    gradient_centralization=False, cautious=False)
    p.grad = torch.full((4, 4), 2e38)
    opt.step()
    assert torch.isfinite(p).all()
    assert torch.equal(p.detach(), torch.full((4, 4), -1e-2))


def test_skip_policy_still_skips_a_tensor_with_an_infinite_element():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    q = torch.nn.Parameter(torch.zeros(4, 4))
    opt = kaon.Lion([p, q], lr=1e-2, momentum_dtype="float32",
                    gradient_centralization=False, cautious=False)
    p.grad = torch.ones(4, 4)
    p.grad[0, 0] = float("inf")
    q.grad = torch.ones(4, 4)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(4, 4))
    assert torch.equal(q.detach(), torch.full((4, 4), -1e-2))
