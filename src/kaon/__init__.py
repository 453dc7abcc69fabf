"""kaon: memory-efficient, fast PyTorch optimizers for bf16 training and fine-tuning."""

from kaon._version import __version__
from kaon.engine import Batch, Slot
from kaon.optim import Adakaon, AdaMuon, Lion
from kaon.optimizer import KaonOptimizer

__all__ = ["AdaMuon", "Adakaon", "Batch", "KaonOptimizer", "Lion", "Slot", "__version__"]
