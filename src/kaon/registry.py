"""Optimizers by name, and creation from strings.

Trainers pass optimizers as text (``--optimizer_type kaon.Adakaon`` with
``--optimizer_args "momentum_dtype=int8" "betas=(0.9,0.999)"``); this module turns such text into
an optimizer. ``AdamW`` (``torch.optim.AdamW``) is registered as the baseline the benchmarks
compare against.

Example::

    from kaon import registry

    opt = registry.create("kaon.Adakaon", model.parameters(), "lr=1e-4,momentum_dtype=int8")
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from typing import Any

import torch

import kaon

__all__ = ["OPTIMIZERS", "register", "get", "parse_kwargs", "create"]

#: registered name -> optimizer class; look names up with :func:`get` (case-insensitive)
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {}

_PREFIXES = ("kaon.optim.", "kaon.", "torch.optim.")
_BARE_WORD = re.compile(r"^[A-Za-z0-9_][\w.\-]*$")
_OPENERS, _CLOSERS = "([{", ")]}"


def _normalize(name: str) -> str:
    key = name.strip().lower()
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    return key


def register(name: str, cls: type[torch.optim.Optimizer]) -> None:
    """Register ``cls`` under ``name``; later lookups of ``name`` are case-insensitive.

    Registering a name again (in any case) replaces the earlier class.
    """
    if not name.strip():
        raise ValueError("register: the name must not be empty")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"register: {cls!r} is not a torch.optim.Optimizer subclass")
    wanted = _normalize(name)
    for key in [k for k in OPTIMIZERS if _normalize(k) == wanted]:
        del OPTIMIZERS[key]
    OPTIMIZERS[name.strip()] = cls


def get(name: str) -> type[torch.optim.Optimizer]:
    """The class registered as ``name``; ``"kaon.Adakaon"`` and ``"adakaon"`` both work.

    Raises ``ValueError`` listing the known names when ``name`` is not registered.
    """
    wanted = _normalize(name)
    for key, cls in OPTIMIZERS.items():
        if _normalize(key) == wanted:
            return cls
    known = ", ".join(sorted(OPTIMIZERS))
    raise ValueError(f"unknown optimizer {name!r}; known optimizers: {known}")


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets and quotes; unbalanced brackets raise ``ValueError``."""
    pieces: list[str] = []
    current: list[str] = []
    stack: list[str] = []
    quote = ""
    for char in text:
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in _OPENERS:
            stack.append(_CLOSERS[_OPENERS.index(char)])
        elif char in _CLOSERS:
            if not stack or stack.pop() != char:
                piece = "".join(current).strip() + char
                raise ValueError(f"optimizer argument {piece!r}: unbalanced {char!r}")
        elif char == "," and not stack:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    if stack or quote:
        piece, missing = "".join(current).strip(), quote or stack[-1]
        raise ValueError(f"optimizer argument {piece!r}: missing a closing {missing!r}")
    pieces.append("".join(current))
    return [p.strip() for p in pieces if p.strip()]


def parse_kwargs(text: str | Iterable[str]) -> dict[str, Any]:
    """Parse ``"lr=1e-3,betas=(0.9,0.999),momentum_dtype=int8"`` into keyword arguments.

    Commas inside brackets or quotes do not split. Each value is a Python literal
    (``ast.literal_eval``); a bare word (``int8``, ``4bit``, ``bfloat16``) that is not a literal
    is taken as a string. A list of ``k=v`` strings (kohya's ``--optimizer_args`` form) is
    accepted too. An empty string gives ``{}``.

    Raises ``ValueError`` naming the offending piece when a piece is not ``name=value``, a name
    repeats, or a value is neither a literal nor a bare word.
    """
    if isinstance(text, str):
        pieces = _split_top_level(text)
    else:
        pieces = [p for t in text for p in _split_top_level(str(t))]
    kwargs: dict[str, Any] = {}
    for piece in pieces:
        key, sep, value = piece.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier() or not value:
            raise ValueError(f"optimizer argument {piece!r} is not of the form name=value")
        if key in kwargs:
            raise ValueError(f"optimizer argument {piece!r}: {key!r} is given twice")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
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
    """Create the optimizer registered as ``name`` over ``params``.

    ``args`` is a ``"k=v,..."`` string (see :func:`parse_kwargs`), a list of ``"k=v"`` strings,
    or a dict of keyword arguments.
    """
    kwargs = dict(args) if isinstance(args, dict) else parse_kwargs(args)
    return get(name)(params, **kwargs)


register("Adakaon", kaon.Adakaon)
register("AdamW", torch.optim.AdamW)
register("Lion", kaon.Lion)
register("AdaMuon", kaon.AdaMuon)
