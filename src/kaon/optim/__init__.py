"""One module per optimizer: its arguments, its state layout and its update rule."""

from kaon.optim.adafactor8bit import Adafactor8Bit
from kaon.optim.adakaon import Adakaon
from kaon.optim.adamuon import AdaMuon
from kaon.optim.adamw import AdamW
from kaon.optim.adapnm import AdaPNM
from kaon.optim.autokaon import Autokaon
from kaon.optim.kprodigy import KProdigy
from kaon.optim.lion import Lion
from kaon.optim.muon import Muon
from kaon.optim.nekaon import Nekaon
from kaon.optim.oadamw import OAdamW
from kaon.optim.schedulefree_adamw import ScheduleFreeAdamW

__all__ = [
    "Adafactor8Bit",
    "Adakaon",
    "AdaMuon",
    "AdamW",
    "AdaPNM",
    "Autokaon",
    "KProdigy",
    "Lion",
    "Muon",
    "Nekaon",
    "OAdamW",
    "ScheduleFreeAdamW",
]
