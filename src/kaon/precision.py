"""Writing fp32 results into bf16 / fp16 / fp32 parameters.

The update rule produces an fp32 step ``delta``; this module turns ``p - delta`` into the
parameter's dtype. fp32 parameters get a plain subtraction. For low-precision parameters the
group's ``bf16_method`` chooses:

``"stochastic_rounding"`` (default)
    Round the exact fp32 result up or down at random with probabilities that make the rounding
    unbiased, so steps far below the bf16 spacing still move the weight on average. For bf16 the
    random integer in ``[0, 2**16)`` is added to the fp32 bit pattern before the low 16 bits are
    cleared; for fp16 the two neighbouring values are found with ``nextafter``. The random stream
    comes from a ``torch.Generator`` owned by the optimizer and saved in its ``state_dict``. No
    extra state.
``"kahan"``
    Keep the rounding error in a compensation buffer ``shift`` of the parameter's dtype (+2
    B/param for bf16) and add it back at the next step.
``"none"``
    Round to nearest (steps below half the spacing are lost).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BF16_METHODS", "LOW_PRECISION", "stochastic_round", "stochastic_round_with",
           "rounding_noise", "round_toward_zero", "apply_step", "copy_back", "needs_shift"]

BF16_METHODS = ("stochastic_rounding", "kahan", "none")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def needs_shift(dtype: torch.dtype, method: str) -> bool:
    """Whether a parameter of ``dtype`` written with ``method`` keeps a Kahan buffer."""
    return method == "kahan" and dtype in LOW_PRECISION


def rounding_noise(shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
                   generator: torch.Generator) -> Tensor:
    """The random draw that stochastic rounding of an fp32 tensor of ``shape`` to ``dtype``
    consumes from ``generator``: for bfloat16 ``ceil(numel / 4)`` int64 words (each gives four
    16-bit noises, 4x fewer calls into the generator than one draw per noise), for float16
    uniform fp32 draws shaped ``shape``. The eager and the fused write-back use it alike, so
    both consume the same stream."""
    if dtype == torch.bfloat16:
        numel = math.prod(shape)
        words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=generator.device)
        return words.random_(-(2**63), None, generator=generator)
    if dtype == torch.float16:
        return torch.rand(shape, device=generator.device, generator=generator)
    raise ValueError(f"stochastic rounding supports bfloat16 and float16; got {dtype}")


def stochastic_round_with(x: Tensor, dtype: torch.dtype, noise: Tensor) -> Tensor:
    """Stochastic rounding of fp32 ``x`` to ``dtype`` with the draw of :func:`rounding_noise`."""
    if dtype == torch.bfloat16:
        # an int16 lane plus 32768 is uniform on [0, 2**16)
        lanes = noise.view(torch.int16)[: x.numel()].view(x.shape).to(torch.int32)
        bits = lanes.add_(x.contiguous().view(torch.int32)).add_(1 << 15)
        return bits.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)
    if dtype == torch.float16:
        nearest = x.to(torch.float16)
        near32 = nearest.float()
        toward = torch.where(near32 < x, torch.inf, -torch.inf).to(torch.float16)
        other = torch.nextafter(nearest, toward)
        # probability of taking the other neighbour: distance to nearest / spacing
        chance = (x - near32).abs() / (other.float() - near32).abs()
        return torch.where(noise < chance, other, nearest)
    raise ValueError(f"stochastic rounding supports bfloat16 and float16; got {dtype}")


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """Unbiased stochastic rounding of fp32 ``x`` to ``dtype`` (bfloat16 or float16)."""
    if dtype not in LOW_PRECISION:
        raise ValueError(f"stochastic rounding supports bfloat16 and float16; got {dtype}")
    return stochastic_round_with(x, dtype, rounding_noise(x.shape, dtype, generator))


def apply_step(
    params: list[Tensor],
    delta: Tensor,
    method: str,
    generator: torch.Generator | None,
    params_fp32: Tensor | None = None,
    shift: Tensor | None = None,
) -> Tensor | None:
    """Write ``p <- p - delta`` into every parameter of a batch.

    ``params`` share one dtype and shape; ``delta`` is fp32 ``[N, *view]``. For low-precision
    parameters ``params_fp32`` is required: an fp32 copy of them ``[N, *view]`` (the engine's
    ``Batch.param``), used as scratch space. ``shift`` is the stacked Kahan buffer
    (``method == "kahan"`` on low precision); the new buffer is returned.
    """
    dtype = params[0].dtype
    if dtype not in LOW_PRECISION:
        if len(params) == 1:
            params[0].sub_(delta[0].view_as(params[0]))
        else:
            torch._foreach_sub_(params, _slices_like(delta, params))
        return None
    # the fp32 copy of low-precision parameters is the caller's scratch: compute in place
    if params_fp32 is None:
        raise RuntimeError("low-precision write-back needs the fp32 copy of the parameters")
    target = params_fp32.sub_(delta)
    new_shift = None
    if method == "kahan":
        if shift is None:
            raise RuntimeError("kahan write-back needs its compensation buffer")
        target = target.add_(shift)
        rounded = target.to(dtype)
        new_shift = round_toward_zero(target.sub_(rounded.float()), dtype)
    elif method == "stochastic_rounding":
        if generator is None:
            raise RuntimeError("stochastic rounding needs a generator")
        rounded = stochastic_round(target, dtype, generator)
    else:
        rounded = target.to(dtype)
    copy_back(params, rounded)
    return new_shift


def copy_back(params: list[Tensor], stacked: Tensor) -> None:
    """Write ``stacked[i]`` (any shape with ``params[i]``'s numel) into every ``params[i]``."""
    if len(params) == 1:
        params[0].copy_(stacked[0].view_as(params[0]))
    else:
        torch._foreach_copy_(params, _slices_like(stacked, params))


def _slices_like(stacked: Tensor, params: list[Tensor]) -> list[Tensor]:
    """``stacked[i]`` viewed with ``params[i]``'s shape (one call when the shapes agree)."""
    first = params[0].shape
    if all(p.shape == first for p in params):
        return list(stacked.view(len(params), *first).unbind(0))
    return [s.view_as(p) for s, p in zip(stacked.unbind(0), params)]


def round_toward_zero(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Round fp32 ``x`` to ``dtype`` toward zero.

    Used for the Kahan residual: a residual rounded to nearest can land exactly on half a
    spacing, and then re-adding it flips the weight to its neighbour at a zero step. Rounded
    toward zero, ``round(p + shift) == p`` always holds, so a zero step changes nothing.
    """
    if dtype == torch.bfloat16:
        return x.view(torch.int32).bitwise_and(-65536).view(torch.float32).to(dtype)
    nearest = x.to(dtype)
    too_far = nearest.float().abs() > x.abs()
    return torch.where(too_far, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)

