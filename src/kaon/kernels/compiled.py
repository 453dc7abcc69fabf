"""Compiled kernels: the elementwise core of a rule fused by ``torch.compile`` (inductor).

The Triton kernels of :mod:`kaon.kernels.rules` are written by hand for CUDA. The functions
here are plain tensor code that inductor turns into one fused loop per call: C++ with OpenMP
and vector instructions on the CPU, Triton on CUDA. In eager PyTorch every operation of a rule
is its own pass over memory (Prodigy's update is about a dozen); fused, each input is read and
each output written once. They need a working ``torch.compile`` on the device (on the CPU a C++
compiler); :func:`available` probes that once per device type.

Conventions: tensors are ``[N, L]`` batches (the engine's leading batch dimension), the
per-step scalars arrive as one fp32 tensor ``k`` (a tensor, so a new learning rate or D is new
data, not a recompile), and flags that change the arithmetic are Python values (one compiled
graph per combination). Shapes are dynamic: one graph serves every tensor size (the sizes 0
and 1 are specialized by dynamo, so a batch of one tensor gets its own graph). The first call
of each graph compiles it (seconds); later calls run the cached code.

Results equal the eager rule up to rounding (inductor may contract ``a * b + c`` into one
fused multiply-add and sums in its own order); the tests bound the difference against the
reference implementations.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["available", "compiled", "allow_graphs", "scalars", "kprodigy_statistics", "kprodigy_update"]


@functools.cache
def available(device_type: str = "cpu") -> bool:
    """Whether ``torch.compile`` works for tensors on ``device_type`` (probed once: a tiny
    function is compiled and run; any failure, e.g. no C++ compiler, means False)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    try:
        probe = torch.compile(lambda x: x * 2.0 + 1.0, dynamic=True, fullgraph=True)
        x = torch.ones(4, device=device_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(torch.equal(probe(x), torch.full_like(x, 3.0)))
    except Exception:  # a missing compiler, an unsupported device, a broken install
        return False


#: graphs one kernel may keep (one per flag combination and batch-of-one / batch shape)
RECOMPILE_LIMIT = 64


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``fn`` compiled with dynamic shapes and without graph breaks (cached per function).

    Call it inside :func:`allow_graphs`: a kernel legitimately has a graph per combination of
    its flags (and per specialized size), more than dynamo's default limit of 8 per function.
    """
    return torch.compile(fn, dynamic=True, fullgraph=True)


def allow_graphs() -> contextlib.AbstractContextManager:
    """A context (one per optimizer step: entering it costs microseconds) in which a compiled
    kernel may keep up to :data:`RECOMPILE_LIMIT` graphs."""
    return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)


def scalars(values: Sequence[float], like: Tensor) -> Tensor:
    """The per-step scalars as one fp32 tensor on ``like``'s device (each value rounded to fp32,
    as eager PyTorch rounds a Python scalar that multiplies an fp32 tensor)."""
    return torch.tensor(list(values), dtype=torch.float32, device=like.device)


# ------------------------------------------------------------------------------ KProdigy
def kprodigy_statistics(g: Tensor, p: Tensor, p0: Tensor, s: Tensor, k: Tensor,
                        slice_p: int) -> Tensor:
    """KProdigy's statistics pass over ``[N, L]`` tensors, ``k = [beta3, s_coef]``.

    On every ``slice_p``-th element (``g`` and ``p`` are whole; ``p0`` and ``s`` sliced):
    ``s <- beta3 s + s_coef g`` in place; returns ``[N, 2]``: ``<g, p0 - p>`` and ``||s||_1``
    per tensor (``p0`` may be ``[N, 1]``, the zero slice of an all-zero initial tensor).
    """
    g, p = g[:, ::slice_p], p[:, ::slice_p]
    s.mul_(k[0]).add_(g * k[1])
    dot = ((p0 - p) * g).sum(-1)
    return torch.stack((dot, s.abs().sum(-1)), -1)


def kprodigy_update(g: Tensor, v: Tensor, m: Tensor | None, p: Tensor | None, k: Tensor,
                    quantized: bool, decay: bool, write: bool) -> Tensor | None:
    """KProdigy's update with the full second moment over ``[N, L]`` tensors.

    ``k = [beta1, (1 - beta1) d, beta2, (1 - beta2) d^2, d_new eps, dlr (times d_new without
    momentum), d, d_new, weight_decay dlr]``. In place: ``v <- beta2 v + (1 - beta2) d^2 g^2``;
    with a momentum ``m`` (else ``None``): ``m <- beta1 m + (1 - beta1) d g`` (``quantized``: the
    stored ``m`` is ``m / d``, read back times ``d`` and stored divided by ``d_new``).
    ``delta = dlr m / (sqrt(v) + d_new eps)`` (``g`` for ``m`` without momentum). ``decay``
    (decoupled weight decay, needs ``p``): the reference's decay-then-step, ``delta = p - ((p -
    wd dlr p) - delta)``. Returns ``delta``; with ``write`` it instead writes ``p - delta`` into
    ``p`` (the live fp32 parameters) and returns None.
    """
    v.mul_(k[2]).add_(g * g * k[3])
    den = v.sqrt() + k[4]
    if m is not None:
        if quantized:
            m.mul_(k[6])
        m.mul_(k[0]).add_(g * k[1])
        delta = m * k[5] / den
        if quantized:
            m.div_(k[7])
    else:
        delta = g * k[5] / den
    if decay:
        delta = p - ((p - p * k[8]) - delta)
    if write:
        p.sub_(delta)
        return None
    return delta
