"""kaon: memory-efficient, fast PyTorch optimizers for bf16 training and fine-tuning."""

from kaon._version import __version__
from kaon.engine import Batch, Slot
from kaon.optim import Adakaon, OAdamW, ScheduleFreeAdamW
from kaon.optimizer import KaonOptimizer

__all__ = [
    "Adakaon", "Batch", "KaonOptimizer", "OAdamW", "ScheduleFreeAdamW", "Slot", "__version__",
]
