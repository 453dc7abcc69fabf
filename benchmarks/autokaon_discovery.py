"""Autokaon's discovered learning rate against a sweep of plain Adakaon (the acceptance table).

For each task (the battery's diffusion, faces (``images``) and LM tasks, REX schedule, one
thread; plus small tasks that were not used to choose Autokaon's constants: ``regression``, an
MLP regression of a smooth target, ``regression-hf``, the high-frequency target of
tests/test_autokaon.py, and ``classify``, an MLP classifier on overlapping Gaussian clusters;
2048 train / 2048 held-out points each): sweep plain Adakaon (kaon's defaults, the battery's groups) over a grid of
learning rates, then run Autokaon (lr=1.0, lr_freeze="auto") at its default cap and at the
cap / 4 and x 4, and print the rate it froze at, its ratio to the sweep's best rate
(acceptance: within 2x), its held-out loss against the tuned Adakaon's (acceptance: within
5 %) and the change of the discovered rate when the cap changes 4x (acceptance: < 25 %). The
last lines are the markdown table of benchmarks/RESULTS.md.

Usage: python benchmarks/autokaon_discovery.py [--tasks diffusion,images,lm,regression,classify]
       [--grid 1e-3,...] [--seed 0] [--profile quick-240] [--steps-scale 3] [--autokaon k=v,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Any

import torch
from torch import nn

import kaon
from kaon.battery.core import PROFILES, Profile, rex_multiplier
from kaon.battery.runner import make_tasks
from kaon.grouping import build_optimizer

#: the battery's quick profile when the acceptance table was measured (240 steps at batch 8,
#: LM 240 steps at batch 16, 2 curve draws); the battery's quick profile now trains 120 steps at
#: twice the batch
QUICK_240 = dataclasses.replace(PROFILES["quick"], name="quick-240", steps=240, batch=8,
                                lm_steps=240, lm_batch=16, curve_draws=2)

DEFAULT_GRID = "3e-3,5e-3,7e-3,1e-2,1.5e-2,2e-2,3e-2,4e-2,5e-2,7e-2,1e-1"


@dataclasses.dataclass
class _Run:
    final_heldout: float


class _SmallTask:
    """A small MLP task trained with REX for ``steps`` (scaled like the battery's steps)."""

    def __init__(self, name: str, steps: int) -> None:
        self.name, self.steps = name, steps

    def data(self) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(99)
        count = 4096  # half train, half held out
        if self.name in ("regression", "regression-hf"):
            # "regression-hf" is tests/test_autokaon.py's target (sin of a projection of norm
            # ~sqrt(12): too high a frequency to generalize from 2048 points, so its held-out
            # optimum is to barely train); "regression" projects with norm ~1, a learnable target
            scale = 1.0 if self.name == "regression-hf" else 12 ** -0.5
            x = torch.randn(count, 12, generator=gen)
            y = torch.sin(x @ (scale * torch.randn(12, 1, generator=gen))) + 0.05 * torch.randn(
                count, 1, generator=gen)
        else:  # 8 overlapping Gaussian clusters in 16-D (a Bayes floor well above zero)
            centers = 0.5 * torch.randn(8, 16, generator=gen)
            labels = torch.randint(8, (count,), generator=gen)
            x = centers[labels] + torch.randn(count, 16, generator=gen)
            y = labels
        half = count // 2
        return x[:half], y[:half], x[half:], y[half:]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        if self.name.startswith("regression"):
            return (out - y).pow(2).mean()
        return nn.functional.cross_entropy(out, y)

    def run(self, make: Any, lr: float, *, schedule: str, seed: int, profile: Profile) -> _Run:
        del profile
        torch.manual_seed(seed)
        width_in, width_out = (12, 1) if self.name.startswith("regression") else (16, 8)
        model = nn.Sequential(nn.Linear(width_in, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                              nn.Linear(64, width_out))
        x, y, x_held, y_held = self.data()
        opt = make(model, lr)
        base = [g["lr"] for g in opt.param_groups]
        gen = torch.Generator().manual_seed(seed + 1)
        for step in range(self.steps):
            factor = rex_multiplier(step / self.steps) if schedule == "rex" else 1.0
            for group, value in zip(opt.param_groups, base):
                group["lr"] = value * factor
            idx = torch.randint(x.shape[0], (64,), generator=gen)
            loss = self.loss(model, x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not torch.isfinite(loss):
                return _Run(math.inf)
        with torch.no_grad():
            return _Run(float(self.loss(model, x_held, y_held)))


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"None": None, "True": True, "False": False}.get(text, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="diffusion,images,lm")
    parser.add_argument("--grid", default=DEFAULT_GRID)
    parser.add_argument("--profile", default="quick-240", choices=[*PROFILES, "quick-240"],
                        help="battery profile; quick-240 (default): the 240-step quick profile "
                        "on which the acceptance table and d_coef were measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-scale", type=int, default=1,
                        help="multiply the profile's training steps (a longer run)")
    parser.add_argument("--autokaon", default="",
                        help="Autokaon arguments, e.g. d_coef=10,probe_restart=False")
    parser.add_argument("--caps", default="0.25,1,4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    profile = QUICK_240 if args.profile == "quick-240" else PROFILES[args.profile]
    if args.steps_scale != 1:
        profile = dataclasses.replace(profile, name=f"{profile.name}x{args.steps_scale}",
                                      steps=profile.steps * args.steps_scale,
                                      lm_steps=profile.lm_steps * args.steps_scale)
    grid = [float(v) for v in args.grid.split(",")]
    caps = [float(v) for v in args.caps.split(",")]
    extra = {k: _value(v) for k, v in (kv.split("=") for kv in args.autokaon.split(",") if kv)}
    names = args.tasks.split(",")
    tasks: list[Any] = [t for t in make_tasks(profile) if t.name in names]
    tasks += [_SmallTask(n, 300 * args.steps_scale)
              for n in ("regression", "regression-hf", "classify") if n in names]
    seed = args.seed
    print(f"profile {profile.name}, seed {seed}, REX, Autokaon {extra or 'defaults'}", flush=True)
    rows = []
    start = time.time()
    for task in tasks:
        sweep = []
        for lr in grid:
            run = task.run(lambda m, r: build_optimizer(m, kaon.Adakaon, lr=r), lr,
                           schedule="rex", seed=seed, profile=profile)
            sweep.append((run.final_heldout, lr))
        best_loss, best_lr = min(sweep)
        print(f"{task.name}: Adakaon sweep " + "  ".join(
            f"{lr:.2g}:{loss:.4f}{'*' if lr == best_lr else ''}" for loss, lr in sweep),
            flush=True)
        found, held = {}, {}
        for cap in caps:
            made: list[kaon.Autokaon] = []

            def factory(model, lr, cap=cap, made=made):
                made.append(build_optimizer(model, kaon.Autokaon, lr=lr, lr_cap=cap, **extra))
                return made[-1]

            run = task.run(factory, 1.0, schedule="rex", seed=seed, profile=profile)
            opt = made[-1]
            rate = opt.frozen_lr if opt.is_frozen() else opt.get_d()
            found[cap], held[cap] = rate, run.final_heldout
            state = f"frozen at step {opt._tuner['k']}" if opt.is_frozen() else "not frozen"
            print(f"{task.name}: Autokaon lr_cap={cap:g}: rate {rate:.3e} ({state}), "
                  f"rate / best {rate / best_lr:.2f}, held-out {run.final_heldout:.4f} "
                  f"({100 * (run.final_heldout / best_loss - 1):+.1f} % vs tuned "
                  f"Adakaon {best_loss:.4f} at {best_lr:.2g})", flush=True)
        ref = 1.0 if 1.0 in found else caps[0]
        change = max(abs(found[c] / found[ref] - 1) for c in caps)
        print(f"{task.name}: largest change of the rate for a 4x cap change: {100 * change:.1f} %",
              flush=True)
        rate, loss = found[ref], held[ref]
        ok = (0.5 <= rate / best_lr <= 2) and loss <= 1.05 * best_loss and change < 0.25
        rows.append(f"| {task.name} | {best_lr:.2g} ({best_loss:.4f}) | {rate:.3g} | "
                    f"{rate / best_lr:.2f} | {loss:.4f} ({100 * (loss / best_loss - 1):+.1f} %) | "
                    f"{100 * change:.1f} % | {'pass' if ok else 'FAIL'} |")
    print(f"\n{time.time() - start:.0f} s; table (profile {profile.name}, seed {seed}):")
    print("| task | best Adakaon lr (held-out) | Autokaon rate | rate / best | "
          "Autokaon held-out (vs tuned) | rate change, cap x4 | 2x, 5 %, 25 % |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
