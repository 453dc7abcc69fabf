"""Optimizers by name, and creation from strings.

Trainers pass optimizers as text (``--optimizer_type kaon.Adakaon`` with
``--optimizer_args "momentum_dtype=int8" "betas=(0.9,0.999)"``); this module turns such text into
an optimizer. ``AdamW`` (``torch.optim.AdamW``) is registered as the baseline the benchmarks
compare against.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from typing import Any

import torch

import kaon

__all__ = ["OPTIMIZERS", "register", "get", "parse_kwargs", "create"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {}

_BARE_WORD = re.compile(r"^[A-Za-z0-9_][\w.\-]*$")


def register(name: str, cls: type[torch.optim.Optimizer]) -> None:
    """Register ``cls`` under ``name`` (looked up case-insensitively)."""
    OPTIMIZERS[name] = cls


def get(name: str) -> type[torch.optim.Optimizer]:
    """The class registered as ``name``; ``"kaon.Adakaon"`` and ``"adakaon"`` both work."""
    wanted = name.strip().lower()
    for prefix in ("kaon.optim.", "kaon.", "torch.optim."):
        wanted = wanted.removeprefix(prefix)
    for key, cls in OPTIMIZERS.items():
        if key.lower() == wanted:
            return cls
    known = ", ".join(sorted(OPTIMIZERS))
    raise ValueError(f"unknown optimizer {name!r}; known optimizers: {known}")


def _split_top_level(text: str) -> list[str]:
    pieces, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    pieces.append("".join(current))
    return [p.strip() for p in pieces if p.strip()]


def parse_kwargs(text: str | Iterable[str]) -> dict[str, Any]:
    """Parse ``"lr=1e-3,betas=(0.9,0.999),momentum_dtype=int8"`` into keyword arguments.

    Commas inside brackets or quotes do not split. Values are Python literals; a bare word
    (``int8``, ``4bit``, ``stochastic_rounding``) is taken as a string. A list of ``k=v`` strings
    (kohya's ``--optimizer_args`` form) is accepted too.
    """
    pieces = _split_top_level(text) if isinstance(text, str) else [str(t) for t in text]
    kwargs: dict[str, Any] = {}
    for piece in pieces:
        key, sep, value = piece.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier() or not value:
            raise ValueError(f"optimizer argument {piece!r} is not of the form name=value")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if not _BARE_WORD.match(value):
                raise ValueError(
                    f"optimizer argument {piece!r}: {value!r} is neither a Python literal nor a "
                    "bare word"
                ) from None
            kwargs[key] = value
    return kwargs


def create(
    name: str, params: Iterable[Any], args: str | Iterable[str] | dict[str, Any] = ""
) -> torch.optim.Optimizer:
    """Create the optimizer registered as ``name`` over ``params`` with ``args``."""
    kwargs = dict(args) if isinstance(args, dict) else parse_kwargs(args)
    return get(name)(params, **kwargs)


register("Adakaon", kaon.Adakaon)
register("AdamW", torch.optim.AdamW)
