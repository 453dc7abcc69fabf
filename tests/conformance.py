"""The conformance registry: one entry per optimizer configuration.

Every test in ``test_conformance.py`` runs for every entry, so adding an optimizer to kaon means
adding an entry here (its class, sample arguments, a learning rate that trains the tiny model,
arguments that must be rejected, and what it supports).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import kaon


@dataclass
class Entry:
    name: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    train_lr: float = 1e-2
    # (arguments, expected error type, substring the message must contain)
    bad_args: list[tuple[dict[str, Any], type, str]] = field(default_factory=list)
    supports_bf16: bool = True

    def make(self, params, **overrides):
        return self.cls(params, **{**self.kwargs, **overrides})

    def __repr__(self) -> str:
        return self.name


ADAKAON_BAD_ARGS = [
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(lr="fast"), TypeError, "lr"),
    (dict(betas=(1.0, 0.999)), ValueError, "betas[0]"),
    (dict(betas=(0.9, -0.1)), ValueError, "betas[1]"),
    (dict(betas=(0.9,)), TypeError, "betas"),
    (dict(eps=(0.0, 1e-3)), ValueError, "eps[0]"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(clip_threshold=0.0), ValueError, "clip_threshold"),
    (dict(momentum_dtype="fp8"), ValueError, "momentum_dtype"),
    (dict(momentum_4bit_block=1.5), TypeError, "momentum_4bit_block"),
    (dict(bf16_method="truncate"), ValueError, "bf16_method"),
    (dict(cautious="yes"), TypeError, "cautious"),
    (dict(foreach_batch_cutoff=0), ValueError, "foreach_batch_cutoff"),
    (dict(foreach_stack_budget=-5), ValueError, "foreach_stack_budget"),
    (dict(nonfinite_grad="ignore"), ValueError, "nonfinite_grad"),
]

OPTIMIZERS: list[Entry] = [
    Entry("Adakaon", kaon.Adakaon, {}, bad_args=ADAKAON_BAD_ARGS),
    Entry("Adakaon-float32", kaon.Adakaon, {"momentum_dtype": "float32"}),
    Entry("Adakaon-int8", kaon.Adakaon, {"momentum_dtype": "int8"}),
    Entry("Adakaon-4bit", kaon.Adakaon, {"momentum_dtype": "4bit", "momentum_4bit_block": 64}),
    Entry("Adakaon-nomomentum", kaon.Adakaon, {"betas": (0.0, 0.999)}),
    Entry("Adakaon-kahan-plain", kaon.Adakaon,
          {"bf16_method": "kahan", "cautious": False, "gradient_centralization": False}),
    Entry("Adakaon-rtn-wd", kaon.Adakaon, {"bf16_method": "none", "weight_decay": 0.0}),
]

LION_BAD_ARGS = [
    (dict(lr=-1e-4), ValueError, "lr"),
    (dict(betas=(0.9, 1.0)), ValueError, "betas[1]"),
    (dict(betas=(-0.1, 0.99)), ValueError, "betas[0]"),
    (dict(betas=0.9), TypeError, "betas"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(momentum_dtype="int4"), ValueError, "momentum_dtype"),
    (dict(momentum_4bit_block="64"), TypeError, "momentum_4bit_block"),
    (dict(cautious=1), TypeError, "cautious"),
    (dict(gradient_centralization=None), TypeError, "gradient_centralization"),
    (dict(bf16_method="kahan8"), ValueError, "bf16_method"),
    (dict(maximize="no"), TypeError, "maximize"),
    (dict(foreach_batch_cutoff=0), ValueError, "foreach_batch_cutoff"),
]

OPTIMIZERS += [
    Entry("Lion", kaon.Lion, {}, train_lr=3e-3, bad_args=LION_BAD_ARGS),
    Entry("Lion-float32-plain", kaon.Lion,
          {"momentum_dtype": "float32", "cautious": False, "gradient_centralization": False},
          train_lr=3e-3),
    Entry("Lion-int8-wd", kaon.Lion, {"momentum_dtype": "int8", "weight_decay": 0.1},
          train_lr=3e-3),
    Entry("Lion-4bit-kahan", kaon.Lion,
          {"momentum_dtype": "4bit", "momentum_4bit_block": 64, "bf16_method": "kahan"},
          train_lr=3e-3),
]

ADAMUON_BAD_ARGS = [
    (dict(lr=-2e-2), ValueError, "lr"),
    (dict(betas=(1.0, 0.999)), ValueError, "betas[0]"),
    (dict(betas=(0.95, 1.5)), ValueError, "betas[1]"),
    (dict(eps=(0.0, 1e-3)), ValueError, "eps[0]"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(ns_steps=0), ValueError, "ns_steps"),
    (dict(ns_steps=2.0), TypeError, "ns_steps"),
    (dict(clip_threshold=0.0), ValueError, "clip_threshold"),
    (dict(momentum_dtype="fp8"), ValueError, "momentum_dtype"),
    (dict(cautious="yes"), TypeError, "cautious"),
    (dict(compile="max-autotune"), TypeError, "compile"),
    (dict(bf16_method="truncate"), ValueError, "bf16_method"),
    (dict(foreach_stack_budget=0), ValueError, "foreach_stack_budget"),
]

OPTIMIZERS += [
    Entry("AdaMuon", kaon.AdaMuon, {}, train_lr=2e-2, bad_args=ADAMUON_BAD_ARGS),
    Entry("AdaMuon-int8-wd", kaon.AdaMuon, {"momentum_dtype": "int8", "weight_decay": 0.1},
          train_lr=2e-2),
    Entry("AdaMuon-4bit-gc", kaon.AdaMuon,
          {"momentum_dtype": "4bit", "momentum_4bit_block": 64, "gradient_centralization": True},
          train_lr=2e-2),
    Entry("AdaMuon-nomomentum-plain", kaon.AdaMuon,
          {"betas": (0.0, 0.999), "cautious": False, "ns_steps": 3}, train_lr=2e-2),
]
