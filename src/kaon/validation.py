"""Declarative hyperparameter checks.

An optimizer lists one check per hyperparameter; the base class runs them on the defaults and on
every group before anything is stored. Each check raises ``TypeError`` for a value of the wrong
kind and ``ValueError`` for a value out of range, naming the argument, the value received and
what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any

import torch

__all__ = ["Check", "real", "integer", "boolean", "choice", "pair", "optional", "check_all", "BETAS",
           "memory_checks"]

Check = Callable[[str, Any], None]

_MAX_EXACT_INT = 2**53  # larger ints are not exact as floats
_MAX_INT = 2**63 - 1


def _is_real(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, Real) and not isinstance(value, bool)


def real(
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> Check:
    """A real number (or a one-element float tensor) in the given range."""

    def describe() -> str:
        parts = []
        if low is not None:
            parts.append(f"{'>=' if low_inclusive else '>'} {low}")
        if high is not None:
            parts.append(f"{'<=' if high_inclusive else '<'} {high}")
        return "a finite real number" + (" " + " and ".join(parts) if parts else "")

    def check(name: str, value: Any) -> None:
        if not _is_real(value):
            raise TypeError(f"{name} must be {describe()}; got {value!r} ({type(value).__name__})")
        if isinstance(value, torch.Tensor) and value.ndim != 0:
            # the rules broadcast a tensor value against stacked [N, *view] tensors: a (1,) or
            # (1, 1) one would change their shapes (and crash inside step(), issue 17 case 12)
            raise ValueError(f"{name} must be {describe()}; a tensor value must be 0-D "
                             f"(torch.tensor(x)); got shape {tuple(value.shape)}")
        if isinstance(value, Integral) and abs(int(value)) > _MAX_EXACT_INT:
            # an int beyond float precision (2**70) would overflow torch's integer scalars
            raise ValueError(f"{name} must be {describe()}; got the integer {value!r}, beyond "
                             f"+-2**53 (pass a float)")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        ok = math.isfinite(number)
        if low is not None:
            ok = ok and (number >= low if low_inclusive else number > low)
        if high is not None:
            ok = ok and (number <= high if high_inclusive else number < high)
        if not ok:
            raise ValueError(f"{name} must be {describe()}; got {value!r}")

    return check


def integer(low: int | None = None, high: int = _MAX_INT) -> Check:
    """An int (not bool), optionally with a lower bound, at most ``high`` (by default the
    int64 range, which every count handed to torch must fit)."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
        if (low is not None and value < low) or value > high:
            bounds = f">= {low} and <= {high}" if low is not None else f"<= {high}"
            raise ValueError(f"{name} must be an int {bounds}; got {value!r}")

    return check


def boolean() -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")

    return check


def choice(*allowed: Any) -> Check:
    """One of the listed values."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, str) or value not in allowed:
            options = ", ".join(repr(a) for a in allowed)
            error = TypeError if not isinstance(value, str) else ValueError
            raise error(f"{name} must be one of {options}; got {value!r}")

    return check


def pair(first: Check, second: Check, labels: Sequence[str] = ("[0]", "[1]")) -> Check:
    """A 2-tuple (or list) whose elements pass their checks."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(f"{name} must be a pair of two numbers; got {value!r}")
        first(f"{name}{labels[0]}", value[0])
        second(f"{name}{labels[1]}", value[1])

    return check


def optional(check: Check) -> Check:
    """``None`` or a value that passes ``check`` (the message then says None is allowed too)."""

    def run(name: str, value: Any) -> None:
        if value is None:
            return
        try:
            check(name, value)
        except (TypeError, ValueError) as error:
            text = str(error).replace(f"{name} must be ", f"{name} must be None or ", 1)
            raise type(error)(text) from None

    return run


def check_all(checks: dict[str, Check], values: dict[str, Any], owner: str) -> None:
    """Run every check whose key is present in ``values``."""
    for name, check in checks.items():
        if name in values:
            try:
                check(name, values[name])
            except (TypeError, ValueError) as error:
                raise type(error)(f"{owner}: {error}") from None


#: two decay rates, each in [0, 1)
BETAS = pair(real(0.0, 1.0, high_inclusive=False), real(0.0, 1.0, high_inclusive=False))


def memory_checks() -> dict[str, Check]:
    """The checks of the feature arguments the kaon family shares: ``momentum_dtype``,
    ``momentum_4bit_block``, ``cautious``, ``gradient_centralization`` and ``bf16_method``."""
    from kaon.precision import BF16_METHODS
    from kaon.state.codecs import MOMENTUM_DTYPES

    return {
        "momentum_dtype": choice(*MOMENTUM_DTYPES),
        "momentum_4bit_block": integer(),
        "cautious": boolean(),
        "gradient_centralization": boolean(),
        "bf16_method": choice(*BF16_METHODS),
    }

