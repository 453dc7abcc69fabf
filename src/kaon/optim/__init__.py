"""One module per optimizer: its arguments, its state layout and its update rule."""

from kaon.optim.adakaon import Adakaon
from kaon.optim.adamuon import AdaMuon
from kaon.optim.lion import Lion

__all__ = ["AdaMuon", "Adakaon", "Lion"]
