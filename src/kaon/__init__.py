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
    KProdigy,
    Lion,
    Muon,
    Nekaon,
    OAdamW,
    ScheduleFreeAdamW,
)
from kaon.optim.adafactor8bit import build_param_groups
from kaon.optimizer import KaonOptimizer

__all__ = [
    "Adafactor8Bit", "AdaMuon", "AdaPNM", "Adakaon", "AdamW", "Batch", "KProdigy", "KaonOptimizer", "Lion", "Muon",
    "Nekaon", "OAdamW", "ScheduleFreeAdamW", "Slot", "__version__", "build_optimizer", "build_param_groups",
    "create_optimizer", "describe_groups",
]
