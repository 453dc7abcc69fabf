"""One module per optimizer: its arguments, its state layout and its update rule."""

from kaon.optim.adakaon import Adakaon
from kaon.optim.adamw import AdamW
from kaon.optim.muon import Muon

__all__ = ["Adakaon", "AdamW", "Muon"]
