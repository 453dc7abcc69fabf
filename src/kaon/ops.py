"""Pure math pieces shared by update rules.

Every function takes tensors with a leading batch dimension ``[N, ...]`` and treats each slice
``x[i]`` independently. Reductions go through :func:`sum` / :func:`mean`, which sum in fixed
chunks so that the result for a slice does not depend on how many other slices are batched with
it (a plain multi-threaded CPU reduction splits a long single slice across threads, which
changes its rounding). That is what makes the batched path bit-identical to the per-parameter
path on CPU.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["sum", "mean", "slice_mean", "rms_clip", "cautious", "centralize"]

_CHUNK = 4096


def sum(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """Sum over ``dim`` (-1 or -2) in fixed chunks of 4096, independent of the batch size."""
    if dim not in (-1, -2):
        raise ValueError(f"dim must be -1 or -2; got {dim}")
    size = x.shape[dim]
    if size <= _CHUNK:
        return x.sum(dim=dim, keepdim=keepdim)
    head = size - size % _CHUNK
    if dim == -1:
        body = x[..., :head].reshape(*x.shape[:-1], head // _CHUNK, _CHUNK).sum(-1).sum(-1)
        tail = x[..., head:]
    else:
        lead, cols = x.shape[:-2], x.shape[-1]
        body = x[..., :head, :].reshape(*lead, head // _CHUNK, _CHUNK, cols).sum(-2).sum(-2)
        tail = x[..., head:, :]
    if tail.shape[dim]:
        body = body + tail.sum(dim=dim)
    return body.unsqueeze(dim) if keepdim else body


def mean(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """Mean over ``dim`` (-1 or -2) with the chunked, batch-independent :func:`sum`."""
    return sum(x, dim=dim, keepdim=keepdim) / x.shape[dim]


def slice_mean(x: Tensor) -> Tensor:
    """Mean of every slice ``x[i]``, shaped ``[N, 1, ...]`` to broadcast against ``x``."""
    flat = x.reshape(x.shape[0], -1)
    return mean(flat, dim=-1).view(x.shape[0], *([1] * (x.ndim - 1)))


def rms_clip(update: Tensor, threshold: float) -> Tensor:
    """Adafactor's update clipping: ``u / max(1, RMS(u) / threshold)`` per slice."""
    rms = slice_mean(update.square()).sqrt_()
    return update / rms.div_(threshold).clamp_min_(1.0)


def cautious(step: Tensor, grad: Tensor) -> Tensor:
    """Cautious masking (Liang et al., 2024).

    Zeroes the coordinates of ``step`` whose sign disagrees with ``grad`` and rescales the rest
    by ``1 / max(mean(mask), 1e-8)`` per slice, so the step keeps its overall size.
    """
    mask = (step * grad > 0).to(step.dtype)
    return step * mask.div_(slice_mean(mask).clamp_min_(1e-8))


def centralize(grad: Tensor) -> Tensor:
    """Gradient centralization: subtract each output row's mean.

    ``grad`` is ``[N, R, C]`` (the matrix view of a parameter with two or more dimensions); 1-D
    views are returned unchanged. Returns a new tensor; the input is never modified.
    """
    if grad.ndim < 3:
        return grad
    return grad - mean(grad, dim=-1, keepdim=True)

