"""Tolerances derived from the arithmetic: units in the last place (ulps).

Two results of the same real formula, computed in different orders (another association, a fused
multiply-add, a matmul blocked differently, a reduction split over threads), differ by a few
roundings, and each rounding moves a value by at most half an ulp of the quantity rounded, not of
the final result. So the honest tolerance of ``a - b`` is a number of roundings times the ulp of
the largest value that was rounded on the way (for ``before - (before - delta)``: the weights,
not the step), and never a relative tolerance of the result with ``atol=0``, which holds on one
machine's rounding and fails on another's.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["assert_within_ulps", "ulp"]


def ulp(x: Tensor) -> Tensor:
    """The spacing of ``x``'s dtype at ``|x|``, elementwise (``ulp(1.0) == 2**-23`` in fp32)."""
    a = x.detach().abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


def assert_within_ulps(actual: Tensor, expected: Tensor, ulps: float, *of: Tensor,
                       msg: str = "") -> None:
    """Assert ``|actual - expected| <= ulps * ulp(m)`` elementwise, where ``m`` is the largest
    magnitude, elementwise, of ``actual``, ``expected`` and every tensor in ``of`` (the values
    that were rounded on the way, in their own dtype: pass the fp32 weights a step was applied to
    when comparing steps recovered as ``before - after``).

    ``ulps`` is the number of roundings (half an ulp each) that separate the two computations,
    with a margin; derive it from the arithmetic and say how in the test.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    dtype = torch.promote_types(actual.dtype, expected.dtype)
    scale = torch.maximum(actual.detach().to(dtype).abs(), expected.detach().to(dtype).abs())
    for t in of:
        scale = torch.maximum(scale, t.detach().to(dtype).abs())
    bound = ulps * ulp(scale).double()
    err = (actual.detach().double() - expected.detach().double()).abs()
    bad = err > bound
    if bool(bad.any()):
        worst = int(torch.argmax((err / bound.clamp_min(1e-300)).flatten()))
        raise AssertionError(
            f"{msg + ': ' if msg else ''}{int(bad.sum())} of {err.numel()} elements differ by "
            f"more than {ulps} ulps; worst at flat index {worst}: |diff| "
            f"{float(err.flatten()[worst]):.3g}, allowed {float(bound.flatten()[worst]):.3g} "
            f"(ulp {float(ulp(scale).flatten()[worst]):.3g})"
        )


def same(a, b) -> bool:
    """Whether two values (tensors, dicts, lists, numbers, nested) are identical: equal dtypes,
    shapes and values, NaN equal to NaN (for "a refused input changed nothing")."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            bool(torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                       and torch.equal(a.nan_to_num(), b.nan_to_num())))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b or (a != a and b != b)
