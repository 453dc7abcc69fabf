"""Autokaon's discovered learning rate against a sweep of plain Adakaon on the battery's tasks.

For each task (the battery's diffusion and LM tasks, REX schedule, seed 0, the quick profile):
sweep plain Adakaon (kaon's defaults, the battery's groups) over a grid of learning rates, then
run Autokaon (lr=1.0, lr_freeze="auto") at its default cap and at the cap / 4 and x 4, and
print the rate it froze at, its ratio to the sweep's best rate (acceptance: within 2x), its
held-out loss against the tuned Adakaon's (acceptance: within 5 %) and the change of the
discovered rate when the cap changes 4x (acceptance: < 25 %).

Usage: python benchmarks/autokaon_discovery.py [--tasks diffusion,lm] [--tasks-extra images]
       [--grid 1e-3,...] [--d-coef 1.0]
"""

from __future__ import annotations

import argparse
import time

import torch

import kaon
from kaon.battery.core import PROFILES
from kaon.battery.runner import make_tasks
from kaon.grouping import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="diffusion,lm")
    parser.add_argument("--grid", default="1e-3,3e-3,1e-2,3e-2,1e-1")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--tasks-extra", default="", help="also run these tasks (e.g. images)")
    parser.add_argument("--d-coef", type=float, default=None,
                        help="Autokaon's d_coef (default: its default)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    profile = PROFILES[args.profile]
    grid = [float(v) for v in args.grid.split(",")]
    names = args.tasks.split(",") + [n for n in args.tasks_extra.split(",") if n]
    tasks = [t for t in make_tasks(profile) if t.name in names]
    extra = {} if args.d_coef is None else {"d_coef": args.d_coef}
    start = time.time()
    for task in tasks:
        sweep = []
        for lr in grid:
            run = task.run(lambda m, r: build_optimizer(m, kaon.Adakaon, lr=r), lr,
                           schedule="rex", seed=0, profile=profile)
            sweep.append((run.final_heldout, lr))
        best_loss, best_lr = min(sweep)
        print(f"{task.name}: Adakaon sweep " + "  ".join(
            f"{lr:.0e}:{loss:.4f}{'*' if lr == best_lr else ''}" for loss, lr in sweep),
            flush=True)
        found = {}
        for cap in (0.25, 1.0, 4.0):
            made: list[kaon.Autokaon] = []

            def factory(model, lr, cap=cap, made=made):
                made.append(build_optimizer(model, kaon.Autokaon, lr=lr, lr_cap=cap, **extra))
                return made[-1]

            run = task.run(factory, 1.0, schedule="rex", seed=0, profile=profile)
            opt = made[-1]
            rate = opt.frozen_lr if opt.is_frozen() else opt.get_d()
            found[cap] = rate
            state = f"frozen at step {opt._tuner['k']}" if opt.is_frozen() else "not frozen"
            print(f"{task.name}: Autokaon lr_cap={cap:g}: rate {rate:.3e} ({state}), "
                  f"rate / best {rate / best_lr:.2f}, held-out {run.final_heldout:.4f} "
                  f"({100 * (run.final_heldout / best_loss - 1):+.1f} % vs tuned "
                  f"Adakaon {best_loss:.4f} at {best_lr:.0e})", flush=True)
        change = max(abs(found[c] / found[1.0] - 1) for c in (0.25, 4.0))
        print(f"{task.name}: largest change of the rate for a 4x cap change: {100 * change:.1f} %",
              flush=True)
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
