"""kaon: memory-efficient, fast PyTorch optimizers for bf16 training and fine-tuning."""

from kaon import registry
from kaon._version import __version__
from kaon.engine import Batch, Slot
from kaon.grouping import build_optimizer, create_optimizer, describe_groups
from kaon.optim.adafactor8bit import build_param_groups
from kaon.optimizer import KaonOptimizer
from kaon.release import prepare_for_gradient_release, remove_gradient_release

__all__ = [
    "Batch",
    "build_optimizer",
    "build_param_groups",
    "create_optimizer",
    "describe_groups",
    "KaonOptimizer",
    "prepare_for_gradient_release",
    "remove_gradient_release",
    "Slot",
    "__version__",
]

#: kaon's optimizers come from the registry they register themselves in where they are
#: defined (see kaon.optim), so the exports cannot drift from it
globals().update(registry.builtin())
__all__.extend(registry.builtin())
