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

SCHEDULEFREE_BAD_ARGS = [
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(betas=(0.0, 0.999)), ValueError, "betas[0]"),
    (dict(betas=(0.9, 1.0)), ValueError, "betas[1]"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps"),
    (dict(warmup_steps=2.5), TypeError, "warmup_steps"),
    (dict(r=-1.0), ValueError, "r"),
    (dict(weight_lr_power=-2.0), ValueError, "weight_lr_power"),
    (dict(maximize="no"), TypeError, "maximize"),
    (dict(bf16_method="fast"), ValueError, "bf16_method"),
]

OADAMW_BAD_ARGS = [
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(betas=(0.9, 1.5)), ValueError, "betas[1]"),
    (dict(weight_decay=-0.01), ValueError, "weight_decay"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(decouple_lr=1), TypeError, "decouple_lr"),
    (dict(max_lr=0.0), ValueError, "max_lr"),
    (dict(muon="yes"), TypeError, "muon"),
    (dict(ns_steps=0), ValueError, "ns_steps"),
    (dict(update_proj_gap=0), ValueError, "update_proj_gap"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(ns_dtype="float16"), ValueError, "ns_dtype"),
    (dict(bf16_method="truncate"), ValueError, "bf16_method"),
]

OPTIMIZERS += [
    Entry("ScheduleFreeAdamW", kaon.ScheduleFreeAdamW, {}, train_lr=1e-2,
          bad_args=SCHEDULEFREE_BAD_ARGS),
    Entry("ScheduleFreeAdamW-warmup-wd-kahan", kaon.ScheduleFreeAdamW,
          {"warmup_steps": 3, "r": 1.0, "bf16_method": "kahan"},
          train_lr=1e-2),
    # weight decay moves weights even at a zero gradient, so the entries run without it
    # (test_per_group_lr_and_weight_decay sets it per group)
    Entry("OAdamW", kaon.OAdamW, {"weight_decay": 0.0}, bad_args=OADAMW_BAD_ARGS),
    Entry("OAdamW-decoupled-sr", kaon.OAdamW,
          {"decouple_lr": True, "weight_decay": 0.0, "bf16_method": "stochastic_rounding"}),
    Entry("OAdamW-muon", kaon.OAdamW, {"muon": True, "weight_decay": 0.0}),
    Entry("OAdamW-muon-bf16ns", kaon.OAdamW,
          {"muon": True, "ns_dtype": "bfloat16", "ns_steps": 3, "scale": 0.5, "weight_decay": 0.0}),
]
