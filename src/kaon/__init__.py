"""kaon: memory-efficient, fast PyTorch optimizers for bf16 training and fine-tuning.

The public names below are imported on first use (PEP 562), so ``import kaon`` and the ``kaon``
command's ``--help`` and ``--version`` do not import torch; ``kaon.Adakaon`` (or
``from kaon import Adakaon``) imports what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kaon._version import __version__

if TYPE_CHECKING:
    from kaon.engine import Batch, Slot
    from kaon.grouping import build_optimizer, create_optimizer, describe_groups
    from kaon.optim import (
        Adafactor8Bit,
        Adakaon,
        AdaMuon,
        AdamW,
        AdaPNM,
        Autokaon,
        KProdigy,
        Lion,
        Muon,
        Nekaon,
        OAdamW,
        ScheduleFreeAdamW,
    )
    from kaon.optim.adafactor8bit import build_param_groups
    from kaon.optimizer import KaonOptimizer
    from kaon.release import prepare_for_gradient_release, remove_gradient_release

#: public name -> the module that defines it
_LAZY: dict[str, str] = {
    "Batch": "kaon.engine",
    "Slot": "kaon.engine",
    "build_optimizer": "kaon.grouping",
    "create_optimizer": "kaon.grouping",
    "describe_groups": "kaon.grouping",
    "Adafactor8Bit": "kaon.optim",
    "Adakaon": "kaon.optim",
    "AdaMuon": "kaon.optim",
    "AdamW": "kaon.optim",
    "AdaPNM": "kaon.optim",
    "Autokaon": "kaon.optim",
    "KProdigy": "kaon.optim",
    "Lion": "kaon.optim",
    "Muon": "kaon.optim",
    "Nekaon": "kaon.optim",
    "OAdamW": "kaon.optim",
    "ScheduleFreeAdamW": "kaon.optim",
    "build_param_groups": "kaon.optim.adafactor8bit",
    "KaonOptimizer": "kaon.optimizer",
    "prepare_for_gradient_release": "kaon.release",
    "remove_gradient_release": "kaon.release",
}

#: submodules that ``import kaon`` used to import eagerly, reachable as ``kaon.NAME`` as before
_SUBMODULES = frozenset({
    "distributed", "engine", "grouping", "kernels", "lowrank", "ops", "optim", "optimizer",
    "precision", "registry", "release", "state", "validation",
})

__all__ = [
    "Adafactor8Bit",
    "Adakaon",
    "AdaMuon",
    "AdamW",
    "AdaPNM",
    "Autokaon",
    "Batch",
    "build_optimizer",
    "build_param_groups",
    "create_optimizer",
    "describe_groups",
    "KaonOptimizer",
    "KProdigy",
    "Lion",
    "Muon",
    "Nekaon",
    "OAdamW",
    "prepare_for_gradient_release",
    "remove_gradient_release",
    "ScheduleFreeAdamW",
    "Slot",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"kaon.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kaon' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
