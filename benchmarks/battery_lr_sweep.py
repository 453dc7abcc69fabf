"""Learning-rate sweep behind the battery registry's proxy learning rates.

For every default battery entry and every task family, train at the registry lr times
{1/2, 1, 2} (scheduled REX runs, seed 0, the quick profile) and print the held-out loss of each,
marking the best. The registry's ``lr`` values are the winners of this sweep; rerun it after
changing a task or an optimizer's defaults.

Usage: python benchmarks/battery_lr_sweep.py [--only NAME,...] [--factors 0.5,1,2]
"""

from __future__ import annotations

import argparse
import time

import torch

from kaon.battery.core import PROFILES
from kaon.battery.registry import lr_for, select
from kaon.battery.runner import make_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only")
    parser.add_argument("--factors", default="0.5,1,2")
    parser.add_argument("--tasks", default="diffusion,lm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    profile = PROFILES["quick"]
    factors = [float(f) for f in args.factors.split(",")]
    tasks = [t for t in make_tasks(profile) if t.name in args.tasks.split(",")]
    start = time.time()
    for entry in select(args.only):
        for task in tasks:
            base = lr_for(entry, task.family)
            results = []
            for factor in factors:
                lr = base * factor
                run = task.run(entry.make, lr, schedule="rex", seed=0, profile=profile)
                results.append((run.final_heldout, lr))
            best = min(results)
            cells = "  ".join(f"{lr:.2g}:{loss:.4f}{'*' if (loss, lr) == best else ''}"
                              for loss, lr in results)
            print(f"{entry.name:20s} {task.name:10s} {cells}", flush=True)
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
