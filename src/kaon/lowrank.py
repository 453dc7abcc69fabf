"""Low-rank pieces shared by update rules: APOLLO's random projection and channel scaling, and
Fira's norm-growth limiter.

Every function works on tensors with a leading batch dimension ``[N, ...]`` and treats each slice
on its own, without a host synchronization: seeds, norms and limiter states stay on the device.

**The random projection is a pure function of an int64 seed.** APOLLO (Zhu et al., 2024) projects
the gradient ``G [R, C]`` onto a random subspace: ``P`` has i.i.d. ``N(0, 1) / sqrt(rank)``
entries. Drawing ``P`` from a ``torch.Generator`` would need the seed on the host (a ``.item()``
per step), so here each entry comes from a counter-based integer hash of ``(seed, index)``,
computed with int64 tensor arithmetic that never overflows (every value stays below ``2**31``
and every product below ``2**58``), followed by a Box-Muller transform in float64 rounded once to
fp32. The same seed gives the same ``P`` on every device, in every batch, after every resume; the
seed itself is plain optimizer state (an int64 tensor). On the CPU each slice is generated alone
(:func:`kaon.ops.slice_by_slice`), exactly as the per-parameter path generates it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kaon import ops

__all__ = [
    "SEED_LIMIT",
    "mix_seed",
    "next_seed",
    "refresh_seed",
    "gaussian_projection",
    "project",
    "apollo_scaling",
    "scaled_norm",
    "fira_limiter",
]

#: seeds are integers in [0, SEED_LIMIT)
SEED_LIMIT = 2**31
_MASK = SEED_LIMIT - 1
_MULTIPLIER = 0x45D9F3B  # < 2**27: x * _MULTIPLIER < 2**58 for x < 2**31
_STRIDE = 0x9E3779B1 & _MASK  # odd: index -> index * _STRIDE is a bijection modulo 2**31
_NEXT = 0x3C6EF372


def mix_seed(x: Tensor) -> Tensor:
    """A bijective integer hash of int64 values in ``[0, 2**31)`` (two xorshift-multiply rounds,
    then a xorshift), without overflow."""
    x = ((x >> 16) ^ x).mul_(_MULTIPLIER).bitwise_and_(_MASK)
    x = ((x >> 16) ^ x).mul_(_MULTIPLIER).bitwise_and_(_MASK)
    return (x >> 16) ^ x


def next_seed(seed: Tensor) -> Tensor:
    """The seed after ``seed`` in the refresh sequence (int64 in ``[0, 2**31)``)."""
    return mix_seed(mix_seed((seed + _NEXT).bitwise_and_(_MASK)))


def refresh_seed(seed: Tensor, step: Tensor, gap: int) -> Tensor:
    """``next_seed(seed)`` where ``(step - 1) % gap == 0`` (step 1, 1 + gap, ...), else ``seed``.

    ``seed`` is int64 ``[N]``, ``step`` the 1-based step count ``[N]`` (any dtype holding exact
    integers). Decided per slice on the device.
    """
    due = torch.remainder(step.long() - 1, gap) == 0
    return torch.where(due, next_seed(seed), seed)


def _uniform_bits(seed: Tensor, count: int) -> Tensor:
    """``[N, count]`` int64 hash values in ``[0, 2**31)``, element ``j`` from ``(seed, j)``."""
    index = torch.arange(count, device=seed.device, dtype=torch.int64)
    key = mix_seed(seed.reshape(-1, 1).bitwise_and(_MASK))
    return mix_seed(mix_seed((key + index * _STRIDE).bitwise_and_(_MASK)))


def _gaussian(seed: Tensor, shape: tuple[int, int], scale: float) -> Tensor:
    count = shape[0] * shape[1]
    bits = _uniform_bits(seed, 2 * count).double()
    u1 = bits[:, 0::2].add(1.0).div_(SEED_LIMIT)  # (0, 1]: log is finite
    u2 = bits[:, 1::2].div(SEED_LIMIT)
    z = u1.log_().mul_(-2.0).sqrt_().mul_(torch.cos(u2.mul_(2.0 * math.pi)))
    return z.mul_(scale).float().view(-1, *shape)


def gaussian_projection(seed: Tensor, shape: tuple[int, int], rank: int) -> Tensor:
    """The projection matrices ``[N, *shape]`` of ``seed`` (int64 ``[N]``): i.i.d. standard
    normal entries divided by ``sqrt(rank)``, a pure function of each slice's seed."""
    scale = 1.0 / math.sqrt(rank)
    return ops.slice_by_slice(lambda s: _gaussian(s, shape, scale), seed.reshape(-1))


def project(grad: Tensor, projection: Tensor, right: bool) -> Tensor:
    """The low-rank gradient: ``G P^T`` ``[N, R, rank]`` (``right``, ``P [N, rank, C]``) or
    ``P^T G`` ``[N, rank, C]`` (``P [N, R, rank]``). Batch-independent on the CPU."""
    if right:
        return ops.slice_by_slice(lambda g, p: torch.bmm(g, p.mT), grad, projection)
    return ops.slice_by_slice(lambda g, p: torch.bmm(p.mT, g), grad, projection)


def apollo_scaling(update_low: Tensor, grad_low: Tensor, right: bool, channel: bool,
                   eps: float = 1e-8) -> Tensor:
    """APOLLO's scaling factor ``s = ||U_low|| / (||G_low|| + eps)``.

    ``channel``: one factor per row (``right``, shape ``[N, R, 1]``, norms along the rank axis)
    or per column (left, ``[N, 1, C]``); otherwise one per tensor (``[N, 1, 1]``).
    """
    if channel:
        dim = -1 if right else -2
        num = ops.sum_squares(update_low, dim=dim, keepdim=True).sqrt_()
        den = ops.sum_squares(grad_low, dim=dim, keepdim=True).sqrt_().add_(eps)
        return num.div_(den)
    num = ops.slice_rms(update_low).mul_(math.sqrt(update_low[0].numel()))
    den = ops.slice_rms(grad_low).mul_(math.sqrt(grad_low[0].numel())).add_(eps)
    return num.div_(den)


def scaled_norm(grad: Tensor, scale: Tensor) -> Tensor:
    """``||G * s||`` per slice ``[N]`` without forming ``G * s``: ``s`` is ``[N, R, 1]``,
    ``[N, 1, C]`` or ``[N, 1, 1]``. Non-finite norms are returned as 0."""
    if scale.shape[-1] == 1 and scale.shape[-2] != 1:
        squares = ops.sum_squares(grad, dim=-1, keepdim=True)  # [N, R, 1]
        total = ops.sum((squares * scale.square()).flatten(1), dim=-1)
    elif scale.shape[-2] == 1 and scale.shape[-1] != 1:
        # a norm over dim -2 is several times slower on CPU than squaring and summing
        squares = ops.sum(grad.square(), dim=-2, keepdim=True)  # [N, 1, C]
        total = ops.sum((squares * scale.square()).flatten(1), dim=-1)
    else:
        total = ops.sum_squares(grad.reshape(grad.shape[0], -1), dim=-1) * scale.reshape(-1) ** 2
    norm = total.sqrt_()
    return torch.where(torch.isfinite(norm), norm, 0.0)


def fira_limiter(norm: Tensor, previous: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Fira's norm-growth limiter (Chen et al., 2024): ``(factor, new_previous)``, both ``[N]``.

    With ``gamma = 1 + margin``: where the previous norm is below 1e-6 (the first step: the
    state starts at 0) the factor is 1 and the norm is stored; else
    ``factor = gamma / max(norm / (previous + 1e-8), gamma)`` (at most 1: the update may grow by
    at most ``gamma`` per step) and ``norm * factor`` is stored. A non-finite norm counts as 0.
    """
    gamma = 1.0 + margin
    norm = torch.where(torch.isfinite(norm), norm, 0.0)
    ratio = norm / (previous + 1e-8)
    factor = gamma / torch.clamp(ratio, min=gamma)
    factor = torch.where(previous < 1e-6, torch.ones_like(factor), factor)
    return factor, norm * factor
