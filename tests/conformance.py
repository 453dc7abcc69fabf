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
    # the weights carry a displacement between steps (Nekaon): the iterate is what eval() shows
    lookahead: bool = False

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

ADAPNM_BAD_ARGS = [
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(betas=(1.0, 0.999)), ValueError, "betas[0]"),
    (dict(betas=(0.8, 1.0)), ValueError, "betas[1]"),
    (dict(beta0=1.5), ValueError, "beta0"),
    (dict(beta0="half"), TypeError, "beta0"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(clip_threshold=-1.0), ValueError, "clip_threshold"),
    (dict(ams_bound="yes"), TypeError, "ams_bound"),
    (dict(momentum_dtype="fp8"), ValueError, "momentum_dtype"),
    (dict(bf16_method="truncate"), ValueError, "bf16_method"),
    (dict(cautious=1), TypeError, "cautious"),
]

NEKAON_BAD_ARGS = [
    (dict(k=-1.0), ValueError, "k"),
    (dict(k="far"), TypeError, "k"),
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(betas=(1.0, 0.999)), ValueError, "betas[0]"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(clip_threshold=0.0), ValueError, "clip_threshold"),
    (dict(momentum_dtype="fp8"), ValueError, "momentum_dtype"),
]

OPTIMIZERS += [
    Entry("AdaPNM", kaon.AdaPNM, {}, bad_args=ADAPNM_BAD_ARGS),
    Entry("AdaPNM-int8", kaon.AdaPNM, {"momentum_dtype": "int8"}),
    Entry("AdaPNM-4bit-ams", kaon.AdaPNM,
          {"momentum_dtype": "4bit", "momentum_4bit_block": 64, "ams_bound": True}),
    Entry("AdaPNM-float32-plain", kaon.AdaPNM,
          {"momentum_dtype": "float32", "cautious": False, "gradient_centralization": False,
           "clip_threshold": 0.0, "beta0": 1.0}),
    Entry("AdaPNM-kahan", kaon.AdaPNM, {"bf16_method": "kahan"}),
    Entry("Nekaon", kaon.Nekaon, {}, bad_args=NEKAON_BAD_ARGS, lookahead=True),
    Entry("Nekaon-int8-b0.2", kaon.Nekaon, {"momentum_dtype": "int8", "betas": (0.2, 0.999)},
          lookahead=True),
    Entry("Nekaon-bfloat16-b0.9-k3", kaon.Nekaon,
          {"momentum_dtype": "bfloat16", "betas": (0.9, 0.999), "k": 3.0}, lookahead=True),
    Entry("Nekaon-float32-nowd", kaon.Nekaon,
          {"momentum_dtype": "float32", "weight_decay": 0.0, "cautious": False}, lookahead=True),
    Entry("Nekaon-kahan", kaon.Nekaon, {"bf16_method": "kahan"}, lookahead=True),
]
