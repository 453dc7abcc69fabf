"""KempnerForge's optimizer layer on kaon: its ``OptimizerConfig`` and ``build_optimizer``.

A KempnerForge training script keeps its config and its call::

    from kaon.integrations.kempnerforge import OptimizerConfig, build_optimizer

    config = OptimizerConfig(name="muon", lr=3e-3, weight_decay=0.1, muon_momentum=0.95)
    opt = build_optimizer(model, config)

:func:`kaon.build_optimizer` accepts the same config object (KempnerForge's own too: any object
with its field names), so ``kaon.build_optimizer(model, config)`` is the same call. The fields
are mapped by :func:`kaon.upstream.kempnerforge_config`; the names are ``adamw``, ``lion``,
``muon`` and ``schedule_free_adamw``. Groups are kaon's (docs/grouping.md): no weight decay for
biases, norms and other 1-D parameters, nor for embeddings (KempnerForge's code decayed them
against its own docstring; ``decay_embeddings=True`` restores that); Muon routes embeddings and
output heads to its AdamW path. The element counts of the groups are logged (logger
``"kaon"``, INFO), as KempnerForge logged its decay / no-decay and Muon / AdamW split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["OptimizerConfig", "build_optimizer"]


@dataclass
class OptimizerConfig:
    """KempnerForge's optimizer config: the same fields, defaults and checks.

    name ("adamw" | "lion" | "muon" | "schedule_free_adamw", default "adamw"); lr (> 0, default
    3e-4); weight_decay (>= 0, default 0.1); betas (each in [0, 1), default (0.9, 0.95)); eps
    (default 1e-8); fused (default True: torch's fused AdamW where available); muon_momentum (in
    (0, 1), default 0.95); muon_ns_steps (> 0, default 5); muon_adam_lr (None: the Muon lr);
    schedule_free_warmup_steps (>= 0, default 0). ``ValueError`` naming the field otherwise.
    """

    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    fused: bool = True
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    muon_adam_lr: float | None = None
    schedule_free_warmup_steps: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"OptimizerConfig: lr must be > 0; got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"OptimizerConfig: weight_decay must be >= 0; got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimizerConfig: betas must be two values in [0, 1); got {self.betas!r}")
        if not 0 < self.muon_momentum < 1:
            raise ValueError(
                f"OptimizerConfig: muon_momentum must be in (0, 1); got {self.muon_momentum!r}")
        if not self.muon_ns_steps > 0:
            raise ValueError(
                f"OptimizerConfig: muon_ns_steps must be > 0; got {self.muon_ns_steps!r}")
        if not self.schedule_free_warmup_steps >= 0:
            raise ValueError("OptimizerConfig: schedule_free_warmup_steps must be >= 0; got "
                             f"{self.schedule_free_warmup_steps!r}")


def build_optimizer(model: nn.Module, config: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """KempnerForge's ``build_optimizer(model, config)``: :func:`kaon.build_optimizer` with the
    config object (``kwargs`` override its fields' constructor arguments)."""
    from kaon.grouping import build_optimizer as _build

    return _build(model, config, **kwargs)
