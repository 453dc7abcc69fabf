"""Factored second moments (Adafactor): row and column EMAs of the squared gradient.

A parameter with two or more dimensions is seen as the matrix ``[R, C]`` with ``R = shape[0]``
and ``C = numel / R`` (a conv kernel ``[out, in, kh, kw]`` becomes ``[out, in*kh*kw]``), so its
second moment costs ``4 * (R + C)`` bytes instead of ``4 * R * C``. All functions work on a
leading batch dimension: ``g`` is ``[N, R, C]``, ``row`` is ``[N, R]``, ``col`` is ``[N, C]``.
"""

from __future__ import annotations

import math

from torch import Tensor

from kaon import ops

__all__ = ["matrix_shape", "second_moment_slots", "update_moments", "inverse_sqrt_factors"]


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The effective shape a rule sees: ``[R, C]`` for ndim >= 2, ``[numel]`` otherwise."""
    if len(shape) >= 2:
        return (shape[0], math.prod(shape[1:]))
    return (max(1, math.prod(shape)),)


def second_moment_slots(view: tuple[int, ...]) -> list:
    """The fp32 second-moment slots of a view: ``row`` ``[R]`` and ``col`` ``[C]`` for a matrix
    view, else ``v`` shaped like the view."""
    from kaon.engine import Slot
    from kaon.state.codecs import FloatCodec

    if len(view) == 2:
        return [Slot("row", FloatCodec(), view[:1]), Slot("col", FloatCodec(), view[1:])]
    return [Slot("v", FloatCodec(), view)]


def update_moments(
    row: Tensor, col: Tensor, grad_squared: Tensor, beta2: float, eps1: float,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """EMA, in place, of the row and column means of ``scale * grad**2 + eps1``.

    ``grad_squared`` is ``grad**2`` ``[N, R, C]``; ``eps1`` is added to the means (the same as
    adding it to every element first). ``scale`` multiplies the means (not the full tensor),
    e.g. KProdigy's ``d**2``.
    """
    row_mean = ops.mean(grad_squared, dim=-1)
    col_mean = ops.mean(grad_squared, dim=-2)
    if scale != 1.0:
        row_mean.mul_(scale)
        col_mean.mul_(scale)
    row_mean.add_(eps1)
    col_mean.add_(eps1)
    return row.lerp_(row_mean, 1.0 - beta2), col.lerp_(col_mean, 1.0 - beta2)


def inverse_sqrt_factors(row: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    """Factors ``r [N, R, 1]`` and ``c [N, 1, C]`` with ``r * c = 1 / sqrt(v_hat)``.

    ``v_hat[i, j] = row[i] * col[j] / mean(row)``, the rank-one reconstruction of the second
    moment.
    """
    r = (row / ops.mean(row, dim=-1, keepdim=True)).rsqrt_()
    return r.unsqueeze(-1), col.rsqrt().unsqueeze(-2)
