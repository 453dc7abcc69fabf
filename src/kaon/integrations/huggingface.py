"""Hugging Face ``transformers.Trainer``: kaon optimizers through ``optimizer_cls_and_kwargs``.

``TrainingArguments(optim=...)`` only names transformers' own optimizers, so a kaon optimizer
goes in through ``Trainer(optimizer_cls_and_kwargs=(cls, kwargs))``. The Trainer then either

* calls ``cls(groups, **kwargs)`` with its two groups (``weight_decay=args.weight_decay`` for
  weights, ``0.0`` for biases and LayerNorm/RMSNorm weights), or
* if ``cls`` is not an optimizer class (a *factory*), calls ``cls()(model, **kwargs)``: kaon's
  model-aware groups (:func:`kaon.build_optimizer`: no decay for every normalization layer,
  embeddings and 1-D tensors, Muon routing that keeps embeddings and the head on AdamW,
  name-pattern overrides).

:func:`optimizer_cls_and_kwargs` returns either pair. Its arguments can come as a string in
transformers' ``optim_args`` form, ``"k=v,k=v"``; unlike transformers' own parser (which strips
spaces and splits at every comma, so tuples cannot be passed, and casts each value by hand),
kaon's parser (:func:`kaon.registry.parse_kwargs`) reads Python literals, ``True``/``False`` in
any case, bare words (``momentum_dtype=int8``) and tuples either bracketed
(``betas=(0.9,0.99)``) or ``|``-separated (``betas=0.9|0.99``). transformers is not imported by
this module.

Example::

    from transformers import Trainer, TrainingArguments
    from kaon.integrations.huggingface import optimizer_cls_and_kwargs

    args = TrainingArguments("out", learning_rate=1e-4, weight_decay=0.01,
                             optim_args="momentum_dtype=int8,betas=0.9|0.999")
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("Adakaon", args=args,
                                                                        model_aware=True))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from kaon import registry
from kaon.grouping import Overrides, build_optimizer

__all__ = ["optimizer_cls_and_kwargs", "ModelAwareFactory"]


class ModelAwareFactory:
    """The factory form ``Trainer`` accepts: ``factory()`` returns a builder that the Trainer
    calls as ``builder(model, **kwargs)``; it runs :func:`kaon.build_optimizer`.

    Args:
        optimizer: a registered name (``"Adakaon"``, ``"kaon.Muon"``), ``"Name:k=v,..."``, or an
            optimizer class.
        overrides: name-pattern group overrides (see :func:`kaon.build_optimizer`; default none).
        decay_embeddings: whether embedding weights are decayed (default False).
    """

    def __init__(self, optimizer: str | type, overrides: Overrides | None = None,
                 decay_embeddings: bool = False) -> None:
        self.optimizer = optimizer
        self.overrides = overrides
        self.decay_embeddings = decay_embeddings

    def __call__(self) -> Callable[..., torch.optim.Optimizer]:
        return self.build

    def build(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        """The optimizer over ``model`` with kaon's model-aware groups."""
        return build_optimizer(model, self.optimizer, overrides=self.overrides,
                               decay_embeddings=self.decay_embeddings, **kwargs)

    def __repr__(self) -> str:
        return f"ModelAwareFactory({self.optimizer!r})"


def optimizer_cls_and_kwargs(
    optimizer: str | type = "Adakaon",
    optim_args: str | Mapping[str, Any] | None = None,
    *,
    args: Any = None,
    model_aware: bool = False,
    overrides: Overrides | None = None,
    decay_embeddings: bool = False,
    **kwargs: Any,
) -> tuple[type | ModelAwareFactory, dict[str, Any]]:
    """The ``(class or factory, kwargs)`` pair for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Args:
        optimizer: a registered name (``"Adakaon"``, ``"kaon.Lion"``, ``"torch.optim.SGD"``),
            optionally with arguments (``"Adakaon:momentum_dtype=int8"``), or an optimizer class
            (default ``"Adakaon"``).
        optim_args: constructor arguments as a ``"k=v,k=v"`` string (see the module docstring)
            or a dict; ``None`` (default) takes ``args.optim_args`` when ``args`` is given.
        args: the ``TrainingArguments`` (optional). With them, ``lr`` defaults to
            ``args.learning_rate`` and, for the factory, ``weight_decay`` to
            ``args.weight_decay`` (the Trainer sets it on its own groups otherwise). Betas and
            eps are not taken from them: ``adam_beta1`` etc. are AdamW's and each kaon optimizer
            keeps its own defaults.
        model_aware: return a :class:`ModelAwareFactory` (kaon's groups) instead of the class
            (the Trainer's two groups). Default False.
        overrides, decay_embeddings: passed to :func:`kaon.build_optimizer` by the factory.
        **kwargs: further constructor arguments; they win over ``optim_args`` and ``args``.

    Raises ``ValueError`` for an unknown name or a malformed argument string, ``TypeError``
    for ``overrides`` without ``model_aware=True``.
    """
    text_args: dict[str, Any] = {}
    if isinstance(optimizer, str):
        name, _, inline = optimizer.partition(":")
        cls = registry.get(name)
        text_args = registry.parse_kwargs(inline)
    elif isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        cls = optimizer
    else:
        raise TypeError(
            "optimizer_cls_and_kwargs: optimizer must be a registered name or a "
            f"torch.optim.Optimizer subclass; got {optimizer!r}"
        )
    if optim_args is None and args is not None:
        optim_args = getattr(args, "optim_args", None)
    if isinstance(optim_args, Mapping):
        parsed = dict(optim_args)
    elif optim_args is None:
        parsed = {}
    elif isinstance(optim_args, str):
        parsed = registry.parse_kwargs(optim_args)
    else:
        raise TypeError(f"optimizer_cls_and_kwargs: optim_args must be a string, a dict or None; "
                        f"got {type(optim_args).__name__}")
    if (overrides is not None or decay_embeddings) and not model_aware:
        raise TypeError("optimizer_cls_and_kwargs: overrides and decay_embeddings need "
                        "model_aware=True (the Trainer's own groups ignore them)")
    from_args: dict[str, Any] = {}
    if args is not None:
        from_args["lr"] = float(args.learning_rate)
        if model_aware:
            from_args["weight_decay"] = float(args.weight_decay)
    merged = {**from_args, **text_args, **parsed, **kwargs}
    if model_aware:
        return ModelAwareFactory(cls, overrides, decay_embeddings), merged
    return cls, merged
