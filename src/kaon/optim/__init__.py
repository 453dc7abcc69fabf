"""One module per optimizer: its arguments, its state layout and its update rule."""

from kaon.optim.adakaon import Adakaon
from kaon.optim.kprodigy import KProdigy

__all__ = ["Adakaon", "KProdigy"]
