"""One module per optimizer: its arguments, its state layout and its update rule."""

from kaon.optim.adakaon import Adakaon
from kaon.optim.oadamw import OAdamW
from kaon.optim.schedulefree_adamw import ScheduleFreeAdamW

__all__ = ["Adakaon", "OAdamW", "ScheduleFreeAdamW"]
