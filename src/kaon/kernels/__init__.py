"""kaon's optional Triton kernels: fused versions of the hot update rules.

A *chunk kernel* runs an optimizer's rule over one engine chunk (a batch of same-shaped tensors
with packed state, or one large tensor) in a few launches, on the same state tensors as the
reference rule. The engine asks the optimizer's kernel first for every chunk
(:func:`kaon.engine.run_group`); a kernel that cannot run a chunk exactly declines it and the
reference rule runs. Registered (for exact classes: a subclass with another rule has none
unless it registers one): Adakaon, Nekaon, Lion, AdaPNM, AdamW (``kaon.kernels.rules.KERNELS``).

Importing this package never imports Triton; :func:`triton_available` does, once.
``TRITON_INTERPRET=1`` (set before Triton is imported) runs the kernels on CPU tensors with
Triton's interpreter, which is how the tests check their logic without a GPU.

See docs/kernels.md.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kaon.optimizer import KaonOptimizer

__all__ = ["triton_available", "interpreter", "kernel_for", "resolve", "registered",
           "auto_enabled"]


def auto_enabled() -> bool:
    """Whether ``fused=None`` may pick a kernel by itself.

    The kernels' logic is verified under Triton's interpreter, but they have not yet been
    compiled and measured on a GPU (docs/kernels.md, "Status"). Until they are, ``fused=None``
    runs the reference rule everywhere and the kernels are opt-in with ``fused=True``; setting
    ``KAON_FUSED_AUTO=1`` lets ``fused=None`` select them on CUDA machines with Triton (what a
    GPU validation run uses).
    """
    return os.environ.get("KAON_FUSED_AUTO", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton can be imported."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def interpreter() -> bool:
    """Whether Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def registered() -> dict[type, Any]:
    """The chunk kernels by optimizer class."""
    from kaon.kernels.rules import KERNELS

    return KERNELS


def kernel_for(cls: type) -> Any | None:
    """The chunk kernel registered for exactly ``cls``, or None."""
    return registered().get(cls)


def resolve(opt: KaonOptimizer, fused: bool | str | None) -> Any | None:
    """The hand-written kernel ``opt`` runs with for its ``fused`` argument (or None).

    ``"triton"`` asks for it (raises when impossible); ``None`` takes it only where
    :func:`auto_enabled` allows; ``True`` and ``False`` never do (``True`` is the compiled path
    of :mod:`kaon.fused`, derived from the rule itself).
    """
    owner = type(opt).__name__
    if fused is not None and not isinstance(fused, bool) and fused != "triton":
        raise TypeError(f"{owner}: fused must be True, False, None or 'triton'; got {fused!r}")
    if fused is False or fused is True:
        return None
    kernel = kernel_for(type(opt))
    if fused is None:
        if (kernel is None or not auto_enabled() or not torch.cuda.is_available()
                or not triton_available()):
            return None
        return kernel
    if kernel is None:
        names = ", ".join(sorted(c.__name__ for c in registered()))
        raise ValueError(
            f"{owner}: fused='triton', but kaon has no Triton kernel for {owner} (it has one "
            f"for {names}); use fused=True (the compiled path), False or None"
        )
    if not triton_available():
        raise RuntimeError(
            f"{owner}: fused='triton' needs Triton, which is not installed (pip install triton, "
            "or kaon[triton]); use fused=True or None"
        )
    if not torch.cuda.is_available() and not interpreter():
        raise RuntimeError(
            f"{owner}: fused='triton' needs a CUDA device (no CUDA device is available; "
            "TRITON_INTERPRET=1 runs the kernels on the CPU for testing); use fused=True or None"
        )
    return kernel
