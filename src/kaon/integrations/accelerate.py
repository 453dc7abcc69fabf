"""accelerate (and other wrappers): reaching the kaon optimizer inside a wrapper.

``accelerator.prepare(optimizer)`` returns an ``accelerate.optimizer.AcceleratedOptimizer``
that keeps the real optimizer as ``.optimizer``. Its ``train()`` and ``eval()`` call the wrapped
optimizer's (also one more level down, for DeepSpeed's wrapper), so
``ScheduleFreeAdamW`` and ``Nekaon`` switch their weights correctly through it, and so does
``transformers.Trainer``, which calls ``optimizer.train()`` before each training step and
``optimizer.eval()`` before evaluation. ``tests/test_integrations.py`` checks both with the real
packages.

What a wrapper does not forward is kaon's own API (``state_bytes()``, ``step_param``,
``gradient_release_blocker()``, ``KProdigy.get_d()``): :func:`unwrap` finds the kaon optimizer
inside any chain of wrappers that keep it as ``.optimizer`` or ``._optimizer`` (accelerate,
DeepSpeed, Lightning). :func:`train_mode` / :func:`eval_mode` switch the innermost optimizer
directly, for wrappers that do not forward the calls.

Example::

    opt = accelerator.prepare(kaon.ScheduleFreeAdamW(model.parameters(), lr=1e-3))
    ...
    opt.eval()                     # forwarded by AcceleratedOptimizer
    accelerator.save_state("ckpt")
    opt.train()
    kaon.prepare_for_gradient_release(model, unwrap(opt))  # kaon's API needs the real one
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["unwrap", "train_mode", "eval_mode"]

_WRAPPER_ATTRIBUTES = ("optimizer", "_optimizer")


def unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` inside ``optimizer``'s wrappers (``optimizer``
    itself if it wraps nothing). Follows the ``.optimizer`` / ``._optimizer`` attributes of each
    wrapper, optimizer or not (DeepSpeed's wrapper is not a torch optimizer); raises
    ``TypeError`` if the chain holds no optimizer."""
    current, seen, found = optimizer, set(), None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.optim.Optimizer):
            found = current
        attributes = getattr(current, "__dict__", {})
        current = next((attributes[name] for name in _WRAPPER_ATTRIBUTES
                        if attributes.get(name) is not None), None)
    if found is None:
        raise TypeError(f"unwrap: {type(optimizer).__name__} holds no torch.optim.Optimizer")
    return found


def train_mode(optimizer: Any) -> torch.optim.Optimizer:
    """Call ``train()`` on the innermost optimizer if it has one; returns that optimizer."""
    inner = unwrap(optimizer)
    if callable(getattr(inner, "train", None)):
        inner.train()
    return inner


def eval_mode(optimizer: Any) -> torch.optim.Optimizer:
    """Call ``eval()`` on the innermost optimizer if it has one; returns that optimizer."""
    inner = unwrap(optimizer)
    if callable(getattr(inner, "eval", None)):
        inner.eval()
    return inner
