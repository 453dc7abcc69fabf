"""One module per optimizer: its arguments, its state layout and its update rule."""

from kaon.optim.adakaon import Adakaon
from kaon.optim.adapnm import AdaPNM
from kaon.optim.nekaon import Nekaon

__all__ = ["Adakaon", "AdaPNM", "Nekaon"]
