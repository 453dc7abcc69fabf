"""kaon: memory-efficient, fast PyTorch optimizers for bf16 training and fine-tuning."""

from kaon._version import __version__
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
