"""Optimizers by name, and creation from strings.

Trainers pass optimizers as text (``--optimizer_type kaon.Adakaon`` with
``--optimizer_args "momentum_dtype=int8" "betas=(0.9,0.999)"``); this module turns such text into
an optimizer. Registered names are kaon's optimizers (``"AdamW"`` is :class:`kaon.AdamW`);
``"torch.optim.NAME"`` names a torch optimizer (the benchmarks' baseline is
``"torch.optim.AdamW"``) and any other dotted ``"package.module.Class"`` is imported, as kohya's
``--optimizer_type`` does.

Example::

    from kaon import registry

    opt = registry.create("kaon.Adakaon", model.parameters(), "lr=1e-4,momentum_dtype=int8")
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["OPTIMIZERS", "ALIASES", "register", "register_builtin", "builtin", "get",
           "parse_kwargs", "create"]

#: registered name -> optimizer class; look names up with :func:`get` (case-insensitive).
#: kaon's own optimizers register themselves where they are defined (``names=`` on the class,
#: see :class:`kaon.KaonOptimizer`); :func:`register` adds others.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {}
#: alias -> registered name: the names the original projects used (``"schedule_free_adamw"``,
#: ``"Adafusion"``); resolved by :func:`get`, not listed by ``kaon list``
ALIASES: dict[str, str] = {}
_BUILTIN: dict[str, type[torch.optim.Optimizer]] = {}

_PREFIXES = ("kaon.optim.", "kaon.")
_BARE_WORD = re.compile(r"^[A-Za-z0-9_][\w.\-]*$")
_NEXT_ARGUMENT = re.compile(r"\s+[A-Za-z_]\w*\s*=")
_BOOLEANS = {"true": True, "false": False}
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


def register_builtin(cls: type[torch.optim.Optimizer], names: tuple[str, ...]) -> None:
    """Register one of kaon's optimizers under ``names[0]``, with ``names[1:]`` as aliases.

    Called by :class:`kaon.KaonOptimizer` for a subclass defined with ``names=(...)``; those
    defined in ``kaon.optim`` are kaon's exports (``kaon.__all__``, see :func:`builtin`), a
    user's class with ``names=`` is registered (and its aliases) but not exported.
    """
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"register_builtin: {cls.__name__} needs non-empty names; got {names!r}")
    register(names[0], cls)
    if cls.__module__.startswith("kaon.optim."):
        _BUILTIN[names[0].strip()] = cls
    for alias in names[1:]:
        ALIASES[_normalize(alias)] = names[0].strip()


def builtin() -> dict[str, type[torch.optim.Optimizer]]:
    """kaon's own optimizers by registered name: what ``kaon.__all__`` exports."""
    import kaon.optim  # noqa: F401  (imports every optimizer module, which registers it)

    return dict(_BUILTIN)


def get(name: str) -> type[torch.optim.Optimizer]:
    """The class registered as ``name``; ``"kaon.Adakaon"``, ``"adakaon"``, the dotted module
    path ``"kaon.optim.adakaon.Adakaon"`` and an upstream alias (``"schedule_free_adamw"``) all
    work.

    Raises ``ValueError`` listing the known names when ``name`` is not registered.
    """
    import kaon.optim  # noqa: F401  (the optimizers register themselves on import)

    wanted = _normalize(name)
    wanted = _normalize(ALIASES.get(wanted, wanted))
    for key, cls in OPTIMIZERS.items():
        if _normalize(key) == wanted:
            return cls
    imported = _import_class(name.strip())
    if imported is not None:
        return imported
    known = ", ".join(sorted(OPTIMIZERS))
    raise ValueError(
        f"unknown optimizer {name!r}; known optimizers: {known} (or torch.optim.NAME, or a "
        "dotted package.module.Class path)"
    )


def _import_class(path: str) -> type[torch.optim.Optimizer] | None:
    """``torch.optim.NAME`` or ``package.module.Class`` as an optimizer class, else None."""
    module_name, dot, attribute = path.rpartition(".")
    if not dot or not module_name:
        return None
    try:
        cls = getattr(importlib.import_module(module_name), attribute, None)
    except ImportError:
        return None
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
        return cls
    return None


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets and quotes; unbalanced brackets raise ``ValueError``."""
    pieces: list[str] = []
    current: list[str] = []
    stack: list[str] = []
    quote = ""
    for index, char in enumerate(text):
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
        elif char.isspace() and not stack and "=" in "".join(current) and _NEXT_ARGUMENT.match(
                text, index):
            pieces.append("".join(current))  # "a=1 b=2": a space before the next name= splits
            current = []
            continue
        current.append(char)
    if stack or quote:
        piece, missing = "".join(current).strip(), quote or stack[-1]
        raise ValueError(f"optimizer argument {piece!r}: missing a closing {missing!r}")
    pieces.append("".join(current))
    return [p.strip() for p in pieces if p.strip()]


def _parse_value(piece: str, value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if value.lower() in _BOOLEANS:
        return _BOOLEANS[value.lower()]
    if "|" in value and not any(c in value for c in _OPENERS + "'\""):
        return tuple(_parse_value(piece, part.strip()) for part in value.split("|"))
    if not _BARE_WORD.match(value):
        raise ValueError(
            f"optimizer argument {piece!r}: {value!r} is neither a Python literal nor a "
            "bare word"
        )
    return value


def parse_kwargs(text: str | Iterable[str]) -> dict[str, Any]:
    """Parse an argument string into keyword arguments.

    Both trainer forms work: ``"lr=1e-3,betas=(0.9,0.999),momentum_dtype=int8"`` (commas) and
    ``"betas=(0.9,0.99) weight_decay=0.01"`` (spaces before the next ``name=``); commas and
    spaces inside brackets or quotes do not split. Each value is a Python literal
    (``ast.literal_eval``: ``True`` / ``False`` are booleans, never the string ``"False"``);
    ``true`` / ``false`` in any case are booleans too; ``0.9|0.99`` is the tuple ``(0.9, 0.99)``;
    a bare word (``int8``, ``4bit``, ``bfloat16``) that is not a literal is taken as a string.
    A list of ``k=v`` strings (kohya's ``--optimizer_args`` form) is accepted too. An empty
    string gives ``{}``.

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
        kwargs[key] = _parse_value(piece, value)
    return kwargs


def create(
    name: str, params: Iterable[Any], args: str | Iterable[str] | dict[str, Any] = ""
) -> torch.optim.Optimizer:
    """Create the optimizer registered as ``name`` over ``params``.

    ``args`` is a ``"k=v,..."`` string (see :func:`parse_kwargs`), a list of ``"k=v"`` strings,
    or a dict of keyword arguments.
    """
    kwargs = dict(args) if isinstance(args, dict) else parse_kwargs(args)
    cls = get(name)
    _check_kinds(cls, kwargs)
    return cls(params, **kwargs)


def _check_kinds(cls: type, kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the argument when a value's kind contradicts the default
    of ``cls``'s keyword of that name: a string where the default is a number, or a
    non-boolean where it is a boolean (``lr=abc``, ``foreach=maybe``)."""
    import inspect

    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    for key, value in kwargs.items():
        parameter = parameters.get(key)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            continue
        default = parameter.default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"optimizer argument {key}={value!r}: {key} expects True or "
                                 f"False (default {default!r})")
        elif isinstance(default, (int, float)) and isinstance(value, str):
            raise ValueError(f"optimizer argument {key}={value!r}: {key} expects a number "
                             f"(default {default!r}), got the string {value!r}")
