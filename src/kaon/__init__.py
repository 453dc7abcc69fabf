"""kaon: memory-efficient, fast PyTorch optimizers for bf16 training and fine-tuning."""

from kaon._version import __version__
from kaon.engine import Batch, Slot
from kaon.optim import Adakaon, AdaPNM, Nekaon
from kaon.optimizer import KaonOptimizer

__all__ = ["Adakaon", "AdaPNM", "Nekaon", "Batch", "KaonOptimizer", "Slot", "__version__"]
