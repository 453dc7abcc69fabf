"""The battery's optimizer registry: adding an optimizer is one :class:`Entry`.

An entry names a constructor (``factory(model, lr) -> optimizer``), the learning rates of its
scheduled and constant-LR runs (per task family, since a transformer LM and a conv UNet want
different rates), a family and a one-line blurb. kaon entries build their optimizer with
:func:`kaon.build_optimizer`, so every optimizer gets the same model-aware groups (no weight
decay on biases and norms; Muon routing for Muon-style optimizers). Peers from other packages run
when their package is installed (``requires``) and are skipped with a note otherwise.

The learning rates are those of these small proxy tasks (found by sweeps on the quick profile),
not recommendations for real models.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Entry", "ENTRIES", "REFERENCE", "entry_from_spec", "select", "lr_for"]

Factory = Callable[[nn.Module, float], torch.optim.Optimizer]


@dataclass(frozen=True)
class Entry:
    """One optimizer configuration of the battery."""

    name: str
    factory: Factory = field(repr=False)
    lr: float | Mapping[str, float]
    lr_const: float | Mapping[str, float] | None = None
    family: str = "kaon"  # "kaon", "reference" (torch), "peer" (other packages) or "custom"
    blurb: str = ""
    requires: str | None = None  # "module" or "module:attribute" that must exist to run
    default: bool = True  # part of the default set
    config: str = ""  # the configuration as text (part of the cache key)
    spec: tuple[str, str] | None = None  # (MODULE:CLASS, ARGS) of an --optimizer entry

    @property
    def cache_key(self) -> str:
        """The configuration and the learning rates: a run is re-measured when either changes."""
        return f"{self.config} | lr={self.lr!r} | lr_const={self.lr_const!r}"

    def available(self) -> tuple[bool, str]:
        """Whether the entry can run here, and why not."""
        if self.requires:
            module, _, attribute = self.requires.partition(":")
            try:
                found = importlib.import_module(module)
            except Exception as error:  # noqa: BLE001 - any import failure means "not here"
                return False, f"{module} is not importable ({type(error).__name__})"
            if attribute and not hasattr(found, attribute):
                return False, f"{module} has no {attribute}"
        return True, ""

    def make(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return self.factory(model, lr)


def lr_for(entry: Entry, family: str, constant: bool = False) -> float:
    """The entry's learning rate for a task family (``constant``: its constant-LR rate)."""
    value = entry.lr_const if constant and entry.lr_const is not None else entry.lr
    if isinstance(value, Mapping):
        return float(value.get(family, value.get("default", next(iter(value.values())))))
    return float(value)


def _build(model: nn.Module, cls: type, lr: float, kwargs: dict[str, Any]
           ) -> torch.optim.Optimizer:
    from kaon.grouping import build_optimizer

    return build_optimizer(model, cls, lr=lr, **kwargs)


def _kaon(name: str, **kwargs: Any) -> tuple[Factory, str]:
    def factory(model: nn.Module, lr: float) -> torch.optim.Optimizer:
        import kaon

        return _build(model, getattr(kaon, name), lr, kwargs)

    text = name + ("(" + ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items())) + ")"
                   if kwargs else "")
    return factory, text


def _class(path: str, **kwargs: Any) -> tuple[Factory, str]:
    module_name, _, class_name = path.rpartition(".")

    def factory(model: nn.Module, lr: float) -> torch.optim.Optimizer:

        cls = getattr(importlib.import_module(module_name), class_name)
        return _build(model, cls, lr, kwargs)

    text = path + ("(" + ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items())) + ")"
                   if kwargs else "")
    return factory, text


def _entry(name: str, made: tuple[Factory, str], lr, **options: Any) -> Entry:
    factory, config = made
    if options.get("family", "kaon") == "kaon":
        options.setdefault("requires", "kaon:" + config.partition("(")[0])
    return Entry(name, factory, lr, config=config, **options)


REFERENCE = "torch.AdamW"
# peers run at the rates of their kaon counterparts, so the two columns compare like with like
_ADAMW_LR = {"diffusion": 9e-3, "lm": 3e-2}
_SF_LR = {"diffusion": 1.5e-2, "lm": 3.3e-3}

#: diffusion and LM learning rates of the proxy tasks: the best of registry lr x {1/2, 1, 2} in
#: benchmarks/battery_lr_sweep.py (quick profile of 120 steps, seed 0; x 4 and x 1/4 checked
#: where the best was at an edge; first found as the best of x {1/9 .. 9} at 240 steps; KProdigy
#: stays at its parameter-free lr = 1). The memory variants below run at their base entry's
#: rates. The LM task is sensitive: whether a run learns the language's order-2 structure in
#: 120 steps depends on the rate, so its column is the noisiest.
ENTRIES: list[Entry] = [
    _entry(REFERENCE, _class("torch.optim.AdamW", weight_decay=0.01),
           {"diffusion": 9e-3, "lm": 3e-2}, family="reference",
           blurb="torch.optim.AdamW: 8 B/param, the baseline"),
    _entry("Adakaon-bf16", _kaon("Adakaon"), {"diffusion": 9e-3, "lm": 6e-2},
           blurb="factored second moment, bf16 momentum (kaon's default)"),
    _entry("Adakaon-nomom", _kaon("Adakaon", betas=(0.0, 0.999), cautious=False),
           {"diffusion": 9e-3, "lm": 1e-2},
           blurb="no momentum: the least memory (~0.25 B/param)"),
    _entry("Nekaon", _kaon("Nekaon"), {"diffusion": 4.5e-3, "lm": 1e-2},
           blurb="Adakaon + negative-momentum lookahead, 4-bit momentum"),
    _entry("Lion", _kaon("Lion", betas=(0.95, 0.98)), {"diffusion": 3e-3, "lm": 1.8e-2},
           blurb="sign of the interpolated momentum, bf16 momentum"),
    _entry("AdaPNM", _kaon("AdaPNM"), {"diffusion": 4.5e-3, "lm": 1.5e-2},
           blurb="positive-negative momentum, factored second moment"),
    _entry("AdaMuon", _kaon("AdaMuon", momentum_dtype="int8"), {"diffusion": 9e-3, "lm": 3e-2},
           blurb="Newton-Schulz on the momentum, factored normalization, int8 momentum"),
    _entry("AdamW-int8", _kaon("AdamW", state_dtype="int8", weight_decay=0.01),
           {"diffusion": 9e-3, "lm": 3e-2}, blurb="kaon AdamW, int8 moments"),
    _entry("Muon", _kaon("Muon"), {"diffusion": 4e-2, "lm": 1.2e-1},
           blurb="orthogonalized momentum on hidden matrices, AdamW on the rest"),
    _entry("ScheduleFreeAdamW", _kaon("ScheduleFreeAdamW"), {"diffusion": 1.5e-2, "lm": 3.3e-3},
           blurb="schedule-free AdamW (its own averaging; no schedule needed)"),
    _entry("OAdamW", _kaon("OAdamW"), {"diffusion": 9e-3, "lm": 6e-2},
           blurb="StableAdamW core with optional Muon groups"),
    _entry("KProdigy", _kaon("KProdigy"), 1.0, blurb="parameter-free Prodigy, D per group"),
    _entry("Autokaon", _kaon("Autokaon"), 1.0, default=False,
           blurb="Adakaon with a discovered, then frozen lr (parameter-free)"),
    # the memory dial of every kaon optimizer (not in the default set: --only NAME or all)
    *[_entry(name, _kaon(cls, **kwargs), lr, default=False, blurb=blurb)
      for name, cls, kwargs, lr, blurb in [
          ("Adakaon-int8", "Adakaon", {"momentum_dtype": "int8"},
           {"diffusion": 9e-3, "lm": 6e-2}, "Adakaon, int8 momentum (~1.3 B/param)"),
          ("Adakaon-4bit", "Adakaon", {"momentum_dtype": "4bit"},
           {"diffusion": 9e-3, "lm": 6e-2}, "Adakaon, 4-bit momentum (~0.79 B/param)"),
          ("Nekaon-int8", "Nekaon", {"momentum_dtype": "int8"},
           {"diffusion": 4.5e-3, "lm": 1e-2}, "Nekaon, int8 momentum"),
          ("Lion-int8", "Lion", {"betas": (0.95, 0.98), "momentum_dtype": "int8"},
           {"diffusion": 3e-3, "lm": 1.8e-2}, "Lion, int8 momentum (~1 B/param)"),
          ("Lion-4bit", "Lion", {"betas": (0.95, 0.98), "momentum_dtype": "4bit"},
           {"diffusion": 3e-3, "lm": 1.8e-2}, "Lion, 4-bit momentum (~0.53 B/param)"),
          ("AdaPNM-int8", "AdaPNM", {"momentum_dtype": "int8"},
           {"diffusion": 4.5e-3, "lm": 1.5e-2}, "AdaPNM, int8 buffers (~2.3 B/param)"),
          ("AdaMuon-4bit", "AdaMuon", {"momentum_dtype": "4bit"},
           {"diffusion": 9e-3, "lm": 3e-2}, "AdaMuon, 4-bit momentum"),
          ("AdamW-bf16", "AdamW", {"state_dtype": "bfloat16", "weight_decay": 0.01},
           {"diffusion": 9e-3, "lm": 3e-2}, "kaon AdamW, bf16 moments (4 B/param)"),
          ("AdamW-4bit", "AdamW", {"state_dtype": "4bit", "weight_decay": 0.01},
           {"diffusion": 9e-3, "lm": 3e-2}, "kaon AdamW, 4-bit moments (~1.06 B/param)"),
          ("Muon-int8", "Muon", {"momentum_dtype": "int8"},
           {"diffusion": 4e-2, "lm": 1.2e-1}, "Muon, int8 momentum"),
          ("KProdigy-factored-4bit", "KProdigy",
           {"second_moment": "factored", "momentum_dtype": "4bit", "slice_p": 11}, 1.0,
           "KProdigy memory recipe (~1.5 B/param)"),
          # Adafactor8Bit unscaled (scale_parameter=False), so lr is an Adam-scale step like
          # Adakaon's; rates not swept (those of Adakaon-nomom / the CAME and AdamW peers)
          ("Adafactor8Bit", "Adafactor8Bit",
           {"relative_step": False, "scale_parameter": False},
           {"diffusion": 9e-3, "lm": 1e-2}, "log-space 8-bit Adafactor, no momentum "
           "(~0.002 B/param)"),
          ("Adafactor8Bit-4bit", "Adafactor8Bit",
           {"relative_step": False, "scale_parameter": False, "beta1": 0.9},
           {"diffusion": 9e-3, "lm": 1e-2}, "Adafactor8Bit, 4-bit momentum (~0.53 B/param)"),
          ("Adafactor8Bit-CAME", "Adafactor8Bit",
           {"relative_step": False, "scale_parameter": False, "beta1": 0.9, "beta2": 0.999,
            "beta3": 0.9999}, _ADAMW_LR, "quantized CAME, 4-bit momentum"),
          ("Adafactor8Bit-APOLLO", "Adafactor8Bit",
           {"relative_step": False, "scale_parameter": False, "beta1": 0.9, "beta2": 0.999,
            "apollo_rank": 16, "d": 0.0}, _ADAMW_LR,
           "APOLLO rank 16 with Fira, 4-bit low-rank momentum"),
      ]],
    # peers: run when their package is installed
    _entry("bnb AdamW8bit", _class("bitsandbytes.optim.AdamW8bit"), _ADAMW_LR, family="peer",
           requires="bitsandbytes", default=False, blurb="bitsandbytes 8-bit AdamW"),
    _entry("torchao AdamW8bit", _class("torchao.optim.AdamW8bit"), _ADAMW_LR, family="peer",
           requires="torchao", default=False, blurb="torchao 8-bit AdamW"),
    _entry("torchao AdamW4bit", _class("torchao.optim.AdamW4bit"), _ADAMW_LR, family="peer",
           requires="torchao", default=False, blurb="torchao 4-bit AdamW"),
    _entry("Prodigy", _class("prodigyopt.Prodigy"), 1.0, family="peer", requires="prodigyopt",
           default=False, blurb="prodigyopt.Prodigy (reference)"),
    _entry("schedulefree AdamW", _class("schedulefree.AdamWScheduleFree"), _SF_LR, family="peer",
           requires="schedulefree", default=False, blurb="schedulefree.AdamWScheduleFree"),
    _entry("CAME", _class("came_pytorch.CAME"), _ADAMW_LR, family="peer", requires="came_pytorch",
           default=False, blurb="came-pytorch CAME"),
    _entry("optimi StableAdamW", _class("optimi.StableAdamW", triton=False), _ADAMW_LR, family="peer",
           requires="optimi", default=False, blurb="torch-optimi StableAdamW"),
]


def select(only: str | None = None, entries: list[Entry] | None = None) -> list[Entry]:
    """The default set, or the entries named in ``only`` (comma-separated, case-insensitive;
    ``peers`` adds every peer, ``all`` everything)."""
    pool = ENTRIES if entries is None else entries
    if not only:
        return [e for e in pool if e.default]
    wanted = [w.strip().lower() for w in only.split(",") if w.strip()]
    chosen: list[Entry] = []
    for word in wanted:
        if word == "all":
            matches = list(pool)
        elif word == "peers":
            matches = [e for e in pool if e.family == "peer"]
        else:
            matches = [e for e in pool if e.name.lower() == word]
            if not matches:
                known = ", ".join(e.name for e in pool)
                raise ValueError(f"--only: unknown battery entry {word!r}; known: {known}, "
                                 "peers, all")
        chosen += [e for e in matches if e not in chosen]
    return chosen


def _rate(value: Any, key: str) -> float:
    """A learning rate from an argument string: a finite number > 0, else a ValueError naming
    ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 < value < float("inf")):
        raise ValueError(f"optimizer argument {key}={value!r}: {key} expects a finite number "
                         "> 0 (e.g. 1e-3)")
    return float(value)


def entry_from_spec(spec: str, args: str = "") -> Entry:
    """An entry for ``--optimizer module:Class`` with an argument string (``"lr=1e-3,..."``).

    ``lr`` (default 1e-3) is the learning rate of every task; ``lr_const`` (default ``lr``)
    that of the constant-LR runs; the other arguments go to the constructor. The class is
    built with :func:`kaon.build_optimizer`, like every other entry.
    """
    from kaon import registry

    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"--optimizer must be module:Class (e.g. torch.optim:SGD); got {spec!r}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--optimizer {spec!r}: {error}") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"--optimizer {spec!r} is not a torch.optim.Optimizer subclass")
    try:
        kwargs = registry.parse_kwargs(args)
        lr = _rate(kwargs.pop("lr", 1e-3), "lr")
        lr_const = _rate(kwargs.pop("lr_const", lr), "lr_const")
        registry._check_kinds(cls, kwargs)
    except ValueError as error:
        raise ValueError(f"--optimizer {spec!r}: {error}") from None

    def factory(model: nn.Module, rate: float) -> torch.optim.Optimizer:

        return _build(model, cls, rate, kwargs)

    config = f"{spec}({args})" if args else spec
    name = f"{class_name}({args})" if args else class_name
    return Entry(name, factory, lr, lr_const, family="custom", blurb=f"user optimizer {spec}",
                 config=config, spec=(spec, args), default=False)
