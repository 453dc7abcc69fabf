"""kaon: memory-efficient, fast PyTorch optimizers for bf16 training and fine-tuning.

The public names are imported on first use (PEP 562), so ``import kaon`` and the ``kaon``
command's ``--help`` and ``--version`` do not import torch; ``kaon.Adakaon`` (or
``from kaon import Adakaon``) imports what it needs. The optimizers are not listed here: they
come from the registry they register themselves in where they are defined (see
:mod:`kaon.optim`), so the exports cannot drift from it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from kaon._version import __version__ as __version__

if TYPE_CHECKING:
    from kaon.engine import Batch as Batch
    from kaon.engine import Slot as Slot
    from kaon.grouping import build_optimizer as build_optimizer
    from kaon.grouping import create_optimizer as create_optimizer
    from kaon.grouping import describe_groups as describe_groups
    from kaon.optim.adafactor8bit import build_param_groups as build_param_groups
    from kaon.optimizer import KaonOptimizer as KaonOptimizer
    from kaon.release import prepare_for_gradient_release as prepare_for_gradient_release
    from kaon.release import remove_gradient_release as remove_gradient_release

#: public name -> the module that defines it (the optimizers come from the registry)
_LAZY: dict[str, str] = {
    "Batch": "kaon.engine",
    "Slot": "kaon.engine",
    "build_optimizer": "kaon.grouping",
    "create_optimizer": "kaon.grouping",
    "describe_groups": "kaon.grouping",
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

_NAMES = ["Batch", "build_optimizer", "build_param_groups", "create_optimizer",
          "describe_groups", "KaonOptimizer", "prepare_for_gradient_release",
          "remove_gradient_release", "Slot", "__version__"]


def _optimizers() -> dict[str, Any]:
    return importlib.import_module("kaon.registry").builtin()


def __getattr__(name: str) -> Any:
    if name == "__all__":  # computed on first use: the registered optimizers plus _NAMES
        value: Any = sorted(_NAMES + list(_optimizers()), key=str.lower)
    elif name in _SUBMODULES or importlib.util.find_spec(f"kaon.{name}") is not None:
        # a submodule (``from kaon import upstream`` while kaon.optimizer is importing): never
        # the optimizers' registry, which would import kaon.optim in the middle of that import
        return importlib.import_module(f"kaon.{name}")
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        optimizers = _optimizers()
        if name not in optimizers:
            raise AttributeError(f"module 'kaon' has no attribute {name!r}")
        value = optimizers[name]
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_optimizers()})
