"""Tolerances derived from the arithmetic, not from one machine's rounding.

A comparison of two fp32 results that took different paths (a reordered sum, a fused
multiply-add, a matmul blocked differently, a value read back as ``before - after``) can only be
held to the roundings those paths contain. These helpers express a bound in units in the last
place (ulps) of the values involved, so a test states *which* roundings it allows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ulp", "assert_within_ulps"]


def ulp(x: Tensor) -> Tensor:
    """The spacing of ``x``'s dtype at ``|x|``, elementwise, as float64 (the distance from
    ``|x|`` to the next representable value away from zero)."""
    a = x.detach().abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def assert_within_ulps(actual: Tensor, expected: Tensor, *, ulps: float,
                       of: Tensor | None = None, rel_ulps: float = 0.0) -> None:
    """Assert ``|actual - expected| <= ulps * ulp(of) + rel_ulps * ulp(expected)`` everywhere.

    ``of`` (default ``expected``) names the values whose roundings the difference carries: for
    a step read back as ``before - after``, the rounding of ``after = before - delta`` is an ulp
    of ``before``, not of the (much smaller) step.
    """
    of = expected if of is None else of
    err = (actual.detach().double() - expected.detach().double()).abs()
    bound = ulps * ulp(of) + rel_ulps * ulp(expected)
    bad = err > bound
    if bool(bad.any()):
        worst = int((err - bound).argmax())
        raise AssertionError(
            f"{int(bad.sum())} of {err.numel()} elements outside the bound; worst at flat index "
            f"{worst}: |{float(actual.flatten()[worst])} - {float(expected.flatten()[worst])}| = "
            f"{float(err.flatten()[worst]):.3e} > {float(bound.flatten()[worst]):.3e}"
        )
