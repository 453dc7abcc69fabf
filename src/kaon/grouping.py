"""Model-aware parameter groups and ready-made optimizers.

:func:`build_optimizer` looks at the model, not only at tensor shapes:

* **weight decay**: none for biases, for the weights of normalization layers (LayerNorm,
  GroupNorm, BatchNorm, InstanceNorm, RMSNorm, LocalResponseNorm), for every other parameter
  with fewer than 2 dimensions, and (``decay_embeddings=False``, the default) for
  ``nn.Embedding`` weights; every other parameter gets the optimizer's weight decay;
* **Muon routing**, for optimizer classes with ``supports_muon_routing = True``: each group gets
  an explicit ``muon`` key. False for embeddings, the output head (the last ``nn.Linear`` whose
  ``out_features`` equals an embedding's ``num_embeddings``, or whose name ends in ``lm_head``,
  ``head``, ``output`` or ``classifier``) and anything :func:`kaon.optim.muon.is_hidden_matrix`
  rejects (fewer than 2 dimensions, aspect ratio > 10 in the ``[out, in*kh*kw]`` view); True
  for the remaining matrices;
* **overrides** by name pattern (``fnmatch`` globs on the parameter name, applied in order,
  later ones winning): ``{"text_encoder.*": {"lr": 1e-5}}``.

Every trainable parameter (``requires_grad``) lands in exactly one group; parameters shared
between modules (tied embeddings) appear once, under their first name. Groups carry
``param_names`` (torch's key), so ``describe_groups(opt)`` shows the routing.

Example::

    opt = kaon.build_optimizer(model, "AdamW", lr=3e-4, weight_decay=0.1,
                               overrides={"text_encoder.*": {"lr": 1e-5}})
    print(kaon.describe_groups(opt))
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kaon import registry, upstream
from kaon.optim.muon import is_hidden_matrix

__all__ = ["build_optimizer", "create_optimizer", "param_groups", "describe_groups", "NORM_TYPES"]

NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
        nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
        getattr(nn, "RMSNorm", None),
    ) if t is not None
)
HEAD_NAMES = ("lm_head", "head", "output", "classifier")
_log = logging.getLogger("kaon")

Overrides = Mapping[str, Mapping[str, Any]] | Sequence[tuple[str, Mapping[str, Any]]]


def _output_head(model: nn.Module) -> set[str]:
    """Parameter names of the output head (see the module docstring)."""
    vocab = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name.rsplit(".", 1)[-1]
            if module.out_features in vocab or last.endswith(HEAD_NAMES):
                head = name
    if head is None:
        return set()
    prefix = f"{head}." if head else ""
    return {prefix + n for n, _ in model.get_submodule(head).named_parameters(recurse=False)}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    muon_routing: bool = False,
    decay_embeddings: bool = False,
    overrides: Overrides | None = None,
) -> list[dict[str, Any]]:
    """The groups :func:`build_optimizer` uses (``params`` as ``(name, tensor)`` pairs).

    Each group has ``weight_decay`` (``weight_decay`` or 0.0), with ``muon_routing`` a ``muon``
    key, and the keys of the overrides that matched its parameters. Groups appear in the order
    of their first parameter.
    """
    items = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides or [])
    for pattern, values in items:
        if not isinstance(pattern, str) or not isinstance(values, Mapping):
            raise TypeError(
                f"overrides must map name patterns (str) to dicts of group keys; got "
                f"{pattern!r}: {values!r}"
            )
        if "params" in values:
            raise ValueError(f"overrides[{pattern!r}]: 'params' cannot be overridden")
    embeddings, no_decay_modules = set(), set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = [prefix + n for n, _ in module.named_parameters(recurse=False)]
        if isinstance(module, nn.Embedding):
            embeddings.update(own)
        if isinstance(module, NORM_TYPES):
            no_decay_modules.update(own)
    head = _output_head(model)

    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or name.endswith("bias") or name in no_decay_modules
                     or (name in embeddings and not decay_embeddings))
        keys: dict[str, Any] = {"weight_decay": weight_decay if decay else 0.0}
        if muon_routing:
            keys["muon"] = (name not in embeddings and name not in head
                            and is_hidden_matrix(p.shape))
        for pattern, values in items:
            if fnmatch.fnmatchcase(name, pattern):
                keys.update(values)
        signature = tuple(sorted((k, repr(v)) for k, v in keys.items()))
        group = groups.setdefault(signature, {"params": [], **keys})
        group["params"].append((name, p))
    return list(groups.values())


def _resolve(name_or_config: Any, kwargs: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    if isinstance(name_or_config, Mapping):
        config = dict(name_or_config)
        if "name" not in config:
            raise ValueError("build_optimizer: a config dict needs a 'name' key")
        name = config.pop("name")
        args = config.pop("args", {})
        args = registry.parse_kwargs(args) if isinstance(args, (str, list, tuple)) else args
        return _resolve(name, {**config, **dict(args), **kwargs})
    if isinstance(name_or_config, type) and issubclass(name_or_config, torch.optim.Optimizer):
        return name_or_config, kwargs
    if upstream.is_kempnerforge_config(name_or_config):
        name, config_kwargs = upstream.kempnerforge_config(name_or_config)
        return registry.get(name), {**config_kwargs, **kwargs}
    if isinstance(name_or_config, str):
        name, _, args = name_or_config.partition(":")
        return registry.get(name), {**registry.parse_kwargs(args), **kwargs}
    raise TypeError(
        "build_optimizer: name_or_config must be a registered name (optionally 'Name:k=v,...'), "
        f"a torch.optim.Optimizer subclass or a dict with 'name'; got {name_or_config!r}"
    )


def build_optimizer(
    model: nn.Module,
    name_or_config: str | type | Mapping[str, Any] = "AdamW",
    *,
    decay_embeddings: bool = False,
    overrides: Overrides | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over ``model`` with model-aware groups (see the module docstring).

    ``name_or_config``: a registered name (``"AdamW"``, ``"kaon.Muon"``,
    ``"torch.optim.SGD"``), optionally with an argument string (``"Muon:lr=0.02"``), an
    optimizer class, a dict ``{"name": ..., **kwargs}``, or KempnerForge's ``OptimizerConfig``
    (:mod:`kaon.integrations.kempnerforge`). ``kwargs`` go to the constructor as
    defaults (``weight_decay`` among them: the decayed groups use it, the others 0.0; when not
    given, the class's own default weight decay is used). Without ``lr``, the class's default lr
    applies (Muon's 0.02, not an AdamW value).
    """
    cls, kwargs = _resolve(name_or_config, dict(kwargs))
    weight_decay = kwargs.get("weight_decay")
    if weight_decay is None:
        weight_decay = _default(cls, "weight_decay", 0.0)
    groups = param_groups(
        model, weight_decay, muon_routing=bool(getattr(cls, "supports_muon_routing", False)),
        decay_embeddings=decay_embeddings, overrides=overrides,
    )
    if not groups:
        raise ValueError("build_optimizer: the model has no parameters with requires_grad=True")
    _log_split(cls, groups)
    return cls(groups, **kwargs)


def _log_split(cls: type, groups: list[dict[str, Any]]) -> None:
    """Log the element counts per group (INFO, logger ``"kaon"``): decayed and not decayed,
    and for Muon the orthogonalized and AdamW paths."""
    if not _log.isEnabledFor(logging.INFO):
        return

    def count(selected: Iterable[dict[str, Any]]) -> int:
        return sum(p.numel() for g in selected for _, p in g["params"])

    decay = count(g for g in groups if g.get("weight_decay"))
    _log.info("build_optimizer(%s): %s params with weight decay, %s without, in %d groups",
              cls.__name__, f"{decay:,}", f"{count(groups) - decay:,}", len(groups))
    if any("muon" in g for g in groups):
        muon = count(g for g in groups if g.get("muon"))
        _log.info("%s: %s params (NS-orthogonalized), %s params (AdamW path)", cls.__name__,
                  f"{muon:,}", f"{count(groups) - muon:,}")


def _default(cls: type, name: str, fallback: Any) -> Any:
    import inspect

    try:
        parameter = inspect.signature(cls.__init__).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default


def create_optimizer(
    name: str | type, params: Iterable[Any], args: str | Iterable[str] | Mapping[str, Any] = "",
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Create an optimizer by registered name (or class) over ``params``.

    ``args`` is an argument string in either trainer form (``"betas=(0.9,0.99) weight_decay=0.01"``
    or ``"betas=0.9|0.99,weight_decay=0.01"``, see :func:`kaon.registry.parse_kwargs`), a list of
    ``k=v`` strings or a dict; ``kwargs`` are added (and win).
    """
    parsed = dict(args) if isinstance(args, Mapping) else registry.parse_kwargs(args)
    cls = name if isinstance(name, type) else registry.get(name)
    merged = {**parsed, **kwargs}
    # "lr=abc" names the argument and what it expects, for any class (torch's own optimizers
    # would fail later with "'<' not supported between instances of 'str' and 'float'")
    registry._check_kinds(cls, merged)
    return cls(params, **merged)


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    """One line per group: its index, its keys that differ from the defaults, its parameters."""
    lines = []
    for index, group in enumerate(optimizer.param_groups):
        keys = {k: v for k, v in group.items() if k not in ("params", "param_names")
                and (k not in optimizer.defaults or optimizer.defaults[k] != v
                     or k in ("lr", "weight_decay", "muon"))}
        names = group.get("param_names") or [tuple(p.shape) for p in group["params"]]
        lines.append(f"group {index}: {keys} {len(group['params'])} params: {names}")
    return "\n".join(lines)
