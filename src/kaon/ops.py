"""Pure math pieces shared by update rules.

Every function takes tensors with a leading batch dimension ``[N, ...]`` and treats each slice
``x[i]`` independently. Reductions go through :func:`sum` / :func:`mean`, which sum in fixed
chunks so that the result for a slice does not depend on how many other slices are batched with
it (a plain multi-threaded CPU reduction splits a long single slice across threads, which
changes its rounding). That is what makes the batched path bit-identical to the per-parameter
path on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "sum", "sum_squares", "slice_sum", "mean", "slice_rms", "rms_clip_", "cautious", "centralize",
    "newton_schulz", "NS_COEFFICIENTS", "slice_by_slice",
]

_CHUNK = 4096


def _chunked(x: Tensor, dim: int, reduce, combine) -> Tensor:
    """Reduce ``dim`` (-1 or -2) in fixed chunks: ``reduce`` per chunk, ``combine`` the parts."""
    if dim not in (-1, -2):
        raise ValueError(f"dim must be -1 or -2; got {dim}")
    size = x.shape[dim]
    if size <= _CHUNK or torch.compiler.is_compiling():
        # compiled (the fused path): the generated loop reduces each slice in its own order,
        # so the fixed chunks would only cost index arithmetic
        return reduce(x, dim)
    head = size - size % _CHUNK
    if dim == -1:
        parts = reduce(x[..., :head].reshape(*x.shape[:-1], head // _CHUNK, _CHUNK), -1)
        tail = x[..., head:]
    else:
        lead, cols = x.shape[:-2], x.shape[-1]
        parts = reduce(x[..., :head, :].reshape(*lead, head // _CHUNK, _CHUNK, cols), -2)
        tail = x[..., head:, :]
    total = combine(parts, dim)
    if tail.shape[dim]:
        total = total + reduce(tail, dim)
    return total


def sum(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """Sum over ``dim`` (-1 or -2) in fixed chunks of 4096, independent of the batch size."""
    total = _chunked(x, dim, lambda t, d: t.sum(dim=d), lambda t, d: t.sum(dim=d))
    return total.unsqueeze(dim) if keepdim else total


def sum_squares(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """Sum of squares over ``dim`` (-1 or -2), chunked like :func:`sum`, without a temporary."""

    def reduce(t: Tensor, d: int) -> Tensor:
        return torch.linalg.vector_norm(t, dim=d).square_()

    total = _chunked(x, dim, reduce, lambda t, d: t.sum(dim=d))
    return total.unsqueeze(dim) if keepdim else total


def dot(x: Tensor, y: Tensor) -> Tensor:
    """``sum(x * y)`` over the last dim (same shapes), chunked like :func:`sum`, without a
    temporary for the product."""
    size = x.shape[-1]
    if size <= _CHUNK or torch.compiler.is_compiling():
        return torch.linalg.vecdot(x, y, dim=-1)
    head = size - size % _CHUNK
    shape = (*x.shape[:-1], head // _CHUNK, _CHUNK)
    total = torch.linalg.vecdot(x[..., :head].reshape(shape), y[..., :head].reshape(shape),
                                dim=-1).sum(dim=-1)
    if head < size:
        total = total + torch.linalg.vecdot(x[..., head:], y[..., head:], dim=-1)
    return total


def mean(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """Mean over ``dim`` (-1 or -2) with the chunked, batch-independent :func:`sum`."""
    return sum(x, dim=dim, keepdim=keepdim) / x.shape[dim]


def slice_sum(x: Tensor, squares: bool = False) -> Tensor:
    """Sum (of squares, with ``squares``) over every dim but the batch dim: ``[N]``.

    Eager: over the flattened slice with :func:`sum`'s fixed chunks (batch-independent).
    Compiled (the fused path): over the slice's own dims, which the generated loop reads in
    place; flattening a slice that is combined with per-row factors would cost the generated
    code a division per element to find each element's row.
    """
    if torch.compiler.is_compiling():
        dims = tuple(range(1, x.ndim))
        return (x * x).sum(dim=dims) if squares else x.sum(dim=dims)
    flat = x.reshape(x.shape[0], -1)
    return sum_squares(flat, dim=-1) if squares else sum(flat, dim=-1)


def _per_slice(values: Tensor, like: Tensor) -> Tensor:
    return values.view(like.shape[0], *([1] * (like.ndim - 1)))


def slice_rms(x: Tensor) -> Tensor:
    """Root mean square of every slice, shaped ``[N, 1, ...]``."""
    return _per_slice(slice_sum(x, squares=True).div_(x[0].numel()).sqrt_(), x)


def rms_clip_(update: Tensor, threshold: float) -> Tensor:
    """Adafactor's update clipping, in place: ``u / max(1, RMS(u) / threshold)`` per slice.

    ``update`` must be a tensor the caller owns (it is overwritten and returned).
    """
    factor = slice_rms(update).div_(threshold).clamp_min_(1.0).reciprocal_()
    return update.mul_(factor)


def cautious(
    step: Tensor, grad: Tensor, scale: float | Tensor = 1.0, out: Tensor | None = None
) -> Tensor:
    """Cautious masking (Liang et al., 2024), times ``scale``.

    Zeroes the coordinates of ``step`` whose sign disagrees with ``grad`` and rescales the rest
    by ``1 / max(mean(mask), 1e-8)`` per slice, so the step keeps its overall size. ``scale``
    (e.g. the learning rate) is folded into the same multiplication. The result is written into
    ``out`` (a scratch tensor of ``step``'s shape, not ``step`` itself) or a new tensor.
    """
    mask = torch.mul(step, grad, out=out).gt_(0.0)
    numel = mask[0].numel()
    count = slice_sum(mask)
    factor = _per_slice(numel / count.clamp_min_(1e-8 * numel), mask)
    return mask.mul_(step).mul_(factor * scale)


def centralize(grad: Tensor, out: Tensor | None = None) -> Tensor:
    """Gradient centralization: subtract each output row's mean.

    ``grad`` is ``[N, R, C]`` (the matrix view of a parameter with two or more dimensions); 1-D
    views are returned unchanged, and so are views with one element per row (``C == 1``, e.g. a
    ``Linear(1, R)`` weight): centralizing those would zero the whole gradient and freeze the
    parameter (a defect of the upstream rule, fixed here). The result goes to ``out`` or a new
    tensor; the input is never modified.
    """
    if grad.ndim < 3 or grad.shape[-1] == 1:
        return grad
    return torch.sub(grad, mean(grad, dim=-1, keepdim=True), out=out)



#: Keller Jordan's quintic Newton-Schulz coefficients (a, b, c)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    matrix: Tensor,
    steps: int = 5,
    *,
    dtype: torch.dtype = torch.bfloat16,
    eps: float = 1e-7,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
) -> Tensor:
    """Approximate orthogonalization ``U V^T`` of every slice of ``matrix`` ``[N, R, C]``.

    The quintic Newton-Schulz iteration of Muon: ``X = M / max(||M||_F, eps)`` per slice (so every
    singular value is at most 1), then ``steps`` times ``A = X X^T``, ``B = b A + c A^2``,
    ``X <- a X + B X``. It runs in ``dtype`` (bf16 by default: the iteration is robust to it and
    it halves the matmul cost; float32 for exactness tests). A tall slice (``R > C``) is worked on
    transposed so the Gram matrix is the smaller ``C x C``. The Frobenius norm is the chunked,
    batch-independent :func:`sum_squares`. Returns fp32 ``[N, R, C]``.
    """
    if matrix.ndim != 3:
        raise ValueError(f"newton_schulz expects [N, R, C]; got shape {tuple(matrix.shape)}")
    flat = matrix.reshape(matrix.shape[0], -1)
    norm = sum_squares(flat.float(), dim=-1).sqrt_().clamp_min_(eps)
    x = (matrix.float() / norm.view(-1, 1, 1)).to(dtype)
    tall = matrix.shape[-2] > matrix.shape[-1]
    x = slice_by_slice(lambda m: _orthogonalize(m, tall, steps, coefficients), x)
    return x.float().contiguous()


def slice_by_slice(fn, *tensors: Tensor):
    """``fn(*tensors)`` over ``[N, ...]`` tensors, made batch-independent on the CPU.

    CPU batched matmuls (bf16 and fp32 alike) are not batch-independent: their blocking depends
    on the batch size, and their kernels on the data's alignment, and both change the rounding.
    On the CPU each slice therefore runs alone, from fresh copies, exactly as the per-parameter
    path runs its single matrix; the results are concatenated (``fn`` may return a tensor or a
    tuple of tensors). Elsewhere, and for a batch of one, ``fn`` runs once on the whole batch.
    """
    first = tensors[0]
    if first.device.type != "cpu" or first.shape[0] == 1:
        return fn(*tensors)
    outs = [fn(*(t[i : i + 1].clone() for t in tensors)) for i in range(first.shape[0])]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def _orthogonalize(x: Tensor, tall: bool, steps: int,
                   coefficients: tuple[float, float, float]) -> Tensor:
    if tall:
        return _quintic(x.mT, steps, coefficients).mT
    return _quintic(x, steps, coefficients)


def _quintic(x: Tensor, steps: int, coefficients: tuple[float, float, float]) -> Tensor:
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a, alpha=1.0)
    return x
