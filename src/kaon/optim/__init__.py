"""One module per optimizer: its arguments, its state layout and its update rule.

Every module here is imported, and each optimizer class registers itself where it is defined
(``class Adakaon(KaonOptimizer, names=("Adakaon", ...))``), so the names exported here, by
``kaon`` and by :mod:`kaon.registry` come from that one place: adding an optimizer is adding
its module.
"""

import importlib
import pkgutil

from kaon import registry

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")

globals().update(registry.builtin())
__all__ = sorted(registry.builtin(), key=str.lower)
