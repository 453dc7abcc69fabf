"""kohya-ss sd-scripts and musubi-tuner: ``--optimizer_type kaon.Adakaon``.

Both trainers load an optimizer they do not know by its dotted name and pass
``--optimizer_args`` through unchanged, so kaon needs no patch to the trainer::

    --optimizer_type kaon.Adakaon
    --optimizer_args "momentum_dtype='int8'" "betas=(0.9,0.999)" "weight_decay=0.01"

How they use it (what ``tests/test_integrations.py`` replays):

* the name is split at its last dot, the module (``kaon``) imported and the class read from it;
  names without a dot are looked up in ``torch.optim``. Their own names (AdamW8bit, Prodigy,
  Adafactor, DAdapt*, names ending in ``schedulefree`` ...) are matched first,
  case-insensitively, on the whole string, so ``kaon.Lion`` is not mistaken for their Lion;
* each ``--optimizer_args`` item is split at ``=`` and its value read with
  ``ast.literal_eval``: values must be Python literals. Strings need quotes
  (``momentum_dtype='int8'``, ``bf16_method='kahan'``); tuples are written bracketed
  (``betas=(0.9,0.999)``); booleans are ``True`` / ``False``. A bare ``int8`` is rejected by the
  trainer with ``ValueError: malformed node``: :func:`optimizer_kwargs` reads a list the same way
  and names the item to quote;
* the optimizer is built as ``cls(trainable_params, lr=learning_rate, **kwargs)``, where
  ``trainable_params`` is usually a list of groups with their own ``lr`` (U-Net and text
  encoders, LoRA+); then ``optimizer.train()`` is called if it exists;
* ``--fused_backward_pass`` registers a post-accumulate-grad hook per parameter that clips
  that gradient alone (``--max_grad_norm``), calls ``optimizer.step_param(p, group)`` and sets
  ``p.grad = None``. Every kaon optimizer but KProdigy has ``step_param`` with exactly that
  meaning. Upstream sd-scripts still allows the flag only with ``--optimizer_type Adafactor``
  (and gradient accumulation 1); versions and forks that check for a ``step_param`` method
  instead accept kaon's optimizers. Outside those trainers,
  :func:`kaon.prepare_for_gradient_release` (``max_grad_norm=`` for the same per-tensor clip)
  also supports gradient accumulation.

Schedule-free weights: the trainers call ``train()`` / ``eval()`` around sampling and saving
only for optimizer names ending in ``schedulefree``. :class:`AdamWScheduleFree` is
:class:`kaon.ScheduleFreeAdamW` under such a name
(``--optimizer_type kaon.integrations.kohya.AdamWScheduleFree``); that branch of the trainers
imports the ``schedulefree`` package first, so it must be installed. KProdigy's ``d`` is in
``param_groups[i]["d"]``, but the trainers log ``d * lr`` only for their own Prodigy and
D-Adaptation names.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterable
from typing import Any

import torch

from kaon.optim.schedulefree_adamw import ScheduleFreeAdamW

__all__ = ["optimizer_kwargs", "create", "AdamWScheduleFree"]


class AdamWScheduleFree(ScheduleFreeAdamW):
    """:class:`kaon.ScheduleFreeAdamW` under a name ending in ``ScheduleFree``, so that
    sd-scripts and musubi-tuner call ``train()`` / ``eval()`` around sampling and saving. The
    same class otherwise (arguments, state, checkpoints)."""


def optimizer_kwargs(optimizer_args: Iterable[str] | None) -> dict[str, Any]:
    """Keyword arguments from ``--optimizer_args`` items, read as the trainers read them (split
    at the first ``=``, the value through ``ast.literal_eval``).

    Raises ``ValueError`` naming the item when it has no ``=`` or its value is not a Python
    literal (with the hint to quote strings).
    """
    kwargs: dict[str, Any] = {}
    for item in optimizer_args or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--optimizer_args item {item!r} is not of the form name=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as error:
            raise ValueError(
                f"--optimizer_args item {item!r}: {value!r} is not a Python literal, which the "
                f"trainer requires; quote strings, e.g. {key.strip()}='{value.strip()}'"
            ) from error
    return kwargs


def create(optimizer_type: str, trainable_params: Iterable[Any], lr: float,
           optimizer_args: Iterable[str] | None = None) -> torch.optim.Optimizer:
    """Build an optimizer the way the trainers do for a name they do not know themselves:
    import ``optimizer_type``'s module (``torch.optim`` without a dot), read the class, call
    ``cls(trainable_params, lr=lr, **optimizer_kwargs(optimizer_args))``, then ``train()`` if
    the optimizer has it. For scripts that accept the same flags."""
    module_name, dot, class_name = optimizer_type.rpartition(".")
    module = importlib.import_module(module_name) if dot else torch.optim
    cls = getattr(module, class_name)
    optimizer = cls(trainable_params, lr=lr, **optimizer_kwargs(optimizer_args))
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()
    return optimizer
