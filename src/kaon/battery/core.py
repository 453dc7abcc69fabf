"""What the battery measures: profiles, run records, the training loop and LR schedules.

A *task* trains a small real model with one optimizer at one learning rate, schedule and seed
and returns a :class:`RunRecord`: the held-out curve at evenly spaced checkpoints, the final
held-out and train-split losses, and the optimizer's state bytes per parameter. Step times are
not part of a run: :mod:`kaon.battery.timing` measures them for all entries together. Everything a task needs is generated in-process or ships inside an installed
package; nothing is downloaded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "Profile", "PROFILES", "RunRecord", "checkpoint_steps", "rex_multiplier",
    "state_bytes_per_param", "train",
]


@dataclass(frozen=True)
class Profile:
    """Sizes of one battery profile (the cache keeps profiles apart)."""

    name: str
    seeds: tuple[int, ...]
    # small-data diffusion (synthetic and real images)
    width: int
    steps: int
    batch: int
    resolutions: tuple[int, ...]
    checkpoints: int
    eval_draws: int  # (noise, timestep) draws per image of the final held-out / train losses
    curve_draws: int  # draws per image of the held-out curve (the first curve_draws draws)
    sample_steps: int
    # language model
    lm_width: int
    lm_layers: int
    lm_steps: int
    lm_batch: int
    # LoRA bag step time
    lora_tensors: int
    lora_reps: int
    timing_rounds: int = 3  # step timing: round-robin rounds over the entries
    timing_steps: int = 6  # step timing: timed diffusion steps per entry and round
    # the extra diffusion seeds of the reference optimizer (seed-noise estimate: the spread of
    # its held-out loss over these and the profile's seeds)
    noise_seeds: tuple[int, ...] = (1, 2)
    tasks: tuple[str, ...] = ("diffusion", "images", "lm")
    constant_tasks: tuple[str, ...] = ("diffusion",)


PROFILES: dict[str, Profile] = {
    # a laptop CPU: the default set in 100-120 s of CPU time (2 worker processes); 120 steps
    # at twice the batch of the former 240 steps (these models cost nearly the same per step
    # at either batch)
    "quick": Profile("quick", seeds=(0,), width=16, steps=120, batch=16,
                     resolutions=(8, 12, 16), checkpoints=8, eval_draws=4, curve_draws=1,
                     sample_steps=25,
                     lm_width=48, lm_layers=2, lm_steps=120, lm_batch=32,
                     lora_tensors=512, lora_reps=9, timing_steps=4),
    # the upstream protocol sizes (C=128, N=2000, two seeds, 64x64 images): meant for a GPU
    "full": Profile("full", seeds=(0, 1), width=128, steps=2000, batch=8,
                    resolutions=(32, 48, 64), checkpoints=16, eval_draws=8, curve_draws=4,
                    sample_steps=100,
                    lm_width=256, lm_layers=4, lm_steps=2000, lm_batch=32,
                    lora_tensors=512, lora_reps=50),
    # for tests: seconds end to end
    "tiny": Profile("tiny", seeds=(0,), width=8, steps=12, batch=4,
                    resolutions=(8,), checkpoints=2, eval_draws=1, curve_draws=1, sample_steps=4,
                    lm_width=16, lm_layers=1, lm_steps=12, lm_batch=4,
                    lora_tensors=16, lora_reps=3, timing_rounds=1, timing_steps=2),
}


@dataclass
class RunRecord:
    """One training run of one optimizer on one task.

    ``heldout`` is the held-out curve at ``steps`` (the cheap estimator evaluated at every
    checkpoint); ``heldout_loss`` and ``train_loss`` are the end-of-run losses on the held-out
    and train splits (the full estimator, evaluated once). Runs record no timings that the report
    uses: step times are measured separately, for every entry together (:mod:`kaon.battery.timing`).
    """

    task: str
    schedule: str
    seed: int
    lr: float
    steps: list[int] = field(default_factory=list)
    heldout: list[float] = field(default_factory=list)
    heldout_loss: float = math.nan
    train_loss: float = math.nan
    bytes_per_param: float = math.nan
    diverged: bool = False
    seconds: float = 0.0  # wall time of the run (profiling only; never reported)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return (not self.diverged and math.isfinite(self.heldout_loss)
                and math.isfinite(self.train_loss))

    @property
    def final_heldout(self) -> float:
        return self.heldout_loss if self.finished else math.inf

    @property
    def final_train(self) -> float:
        return self.train_loss if self.finished else math.inf

    @property
    def gap(self) -> float:
        return self.heldout_loss - self.train_loss if self.finished else math.inf

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["heldout"] = [None if not math.isfinite(v) else v for v in data["heldout"]]
        for key in ("heldout_loss", "train_loss", "bytes_per_param"):
            data[key] = data[key] if math.isfinite(data[key]) else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        data = dict(data)
        data["heldout"] = [math.inf if v is None else v for v in data.get("heldout", [])]
        for key in ("heldout_loss", "train_loss", "bytes_per_param"):
            if data.get(key) is None:
                data[key] = math.nan
        return cls(**data)


def rex_multiplier(progress: float, d: float = 0.9) -> float:
    """The REX schedule: ``(1 - p) / ((1 - d) + d (1 - p))`` at progress ``p`` in [0, 1]."""
    rest = 1.0 - progress
    return rest / ((1.0 - d) + d * rest)


def state_bytes_per_param(opt: torch.optim.Optimizer, model: nn.Module) -> float:
    """Bytes of every tensor in the optimizer state (``.inner`` of wrappers included) divided
    by the number of trainable parameters."""
    seen: set[int] = set()
    total = 0
    stack: list[Any] = [opt]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for state in getattr(current, "state", {}).values():
            values = state.values() if isinstance(state, dict) else [state]
            for value in values:
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        for attribute in ("inner", "optimizer", "base_optimizer"):
            inner = getattr(current, attribute, None)
            if isinstance(inner, torch.optim.Optimizer):
                stack.append(inner)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total / max(count, 1)


def set_mode(opt: torch.optim.Optimizer, training: bool) -> None:
    """``opt.train()`` / ``opt.eval()`` when the optimizer has both (else nothing)."""
    method = getattr(opt, "train" if training else "eval", None)
    if callable(method) and callable(getattr(opt, "eval", None)) and callable(
            getattr(opt, "train", None)):
        method()


def checkpoint_steps(steps: int, checkpoints: int) -> list[int]:
    """The steps (1-based, the last one included) at which the held-out curve is evaluated."""
    return sorted({max(1, round(steps * (k + 1) / checkpoints)) for k in range(checkpoints)})


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    *,
    steps: int,
    schedule: str,
    loss_at_step: Callable[[int], torch.Tensor],
    evaluate_curve: Callable[[], float],
    evaluate_final: Callable[[], tuple[float, float, float]],
    checkpoints: int,
    record: RunRecord,
    progress: Callable[[int], None] | None = None,
) -> RunRecord:
    """Train for ``steps`` steps and fill ``record``.

    ``loss_at_step(i)`` computes the training loss of step ``i`` (gradients are taken here).
    At ``checkpoints`` evenly spaced steps the model is evaluated, bracketed by ``opt.eval()`` /
    ``opt.train()`` when the optimizer has both: ``evaluate_curve()`` returns the held-out
    curve's value; at the last step ``evaluate_final()`` instead returns ``(curve value,
    train-split loss, held-out loss)``, so the train split is evaluated once. ``schedule`` is
    ``"rex"`` or ``"constant"``; each group's own base lr is scaled, so per-group ratios
    survive. A non-finite loss stops the run and marks it diverged.
    """
    if schedule not in ("rex", "constant"):
        raise ValueError(f"schedule must be 'rex' or 'constant'; got {schedule!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    set_mode(opt, True)  # schedulefree's reference optimizers start in eval mode
    base = [group["lr"] for group in opt.param_groups]
    marks = set(checkpoint_steps(steps, checkpoints))
    started = time.perf_counter()
    for step in range(steps):
        if schedule == "rex":
            factor = rex_multiplier(step / steps)
            for group, lr in zip(opt.param_groups, base):
                group["lr"] = lr * factor
        opt.zero_grad(set_to_none=True)
        loss = loss_at_step(step)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            record.diverged = True
            break
        if step + 1 in marks:
            set_mode(opt, False)
            model.eval()
            with torch.no_grad():
                if step + 1 == steps:
                    curve, train_loss, heldout = evaluate_final()
                else:
                    curve, train_loss, heldout = evaluate_curve(), 0.0, 0.0
            model.train()
            set_mode(opt, True)
            if not all(map(math.isfinite, (curve, train_loss, heldout))):
                record.diverged = True
                break
            record.steps.append(step + 1)
            record.heldout.append(curve)
            if step + 1 == steps:
                record.train_loss, record.heldout_loss = train_loss, heldout
        if progress is not None:
            progress(1)
    record.bytes_per_param = state_bytes_per_param(opt, model)
    record.seconds = time.perf_counter() - started
    return record
