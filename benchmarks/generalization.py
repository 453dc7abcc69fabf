"""Generalization on the small-data denoising task (kaon.battery.tasks), constant lr.

Runs the acceptance comparisons and prints tables:

A. Nekaon with betas=(0.2, 0.999) at k = 0 (its no-lookahead twin), 1.5 and 3, same lr:
   train-to-held-out gap averaged over the seeds, and its change against k = 0.
B. AdaPNM (defaults) against torch.optim.AdamW (defaults), each over a small lr grid: held-out
   loss and gap per lr (mean over seeds), and the gaps at matched held-out loss (the pair of
   configurations whose held-out losses are closest, within 5 %).

Usage: python benchmarks/generalization.py [--steps 1600] [--seeds 0 1 2 3] [--threads 1]
       [--nekaon-lr 4e-3 8e-3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kaon
from kaon.battery import DenoiseTask, run_denoise


def mean_result(make, lr, seeds, task):
    runs = [run_denoise(make, lr, seed, task) for seed in seeds]
    return (statistics.fmean(r.heldout_loss for r in runs),
            statistics.fmean(r.train_loss for r in runs),
            statistics.fmean(r.gap for r in runs),
            [r.gap for r in runs],
            statistics.fmean(r.seconds for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nekaon-lr", type=float, nargs="+", default=[4e-3, 8e-3])
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = DenoiseTask(steps=args.steps, eval_draws=16)
    print(f"task: {task}; seeds {args.seeds}; torch {torch.__version__}; "
          f"threads {args.threads}", flush=True)
    start = time.time()

    for nekaon_lr in [] if args.skip_a else args.nekaon_lr:
        print(f"\nA. Nekaon betas=(0.2, 0.999), constant lr {nekaon_lr:g}, wd 0.1, 4bit")
        print("| k | held-out | train | gap (mean) | gap per seed | gap vs k=0 | s/run |")
        print("|---|---|---|---|---|---|---|")
        base = None
        for k in (0.0, 1.5, 3.0):
            def make(params, lr, k=k):
                return kaon.Nekaon(params, lr=lr, k=k, betas=(0.2, 0.999))
            held, tr, gap, gaps, sec = mean_result(make, nekaon_lr, args.seeds, task)
            base = gap if base is None else base
            change = f"{100 * (gap / base - 1):+.0f} %" if k else "-"
            per_seed = ", ".join(f"{g:+.4f}" for g in gaps)
            print(f"| {k:g} | {held:.4f} | {tr:.4f} | {gap:+.4f} | {per_seed} | {change} | "
                  f"{sec:.1f} |", flush=True)

    if not args.skip_b:
        grids = {
            "AdaPNM": ([1e-3, 2e-3, 4e-3, 8e-3], lambda params, lr: kaon.AdaPNM(params, lr=lr)),
            "AdamW": ([5e-4, 1e-3, 2e-3, 4e-3],
                      lambda params, lr: torch.optim.AdamW(params, lr=lr)),
        }
        rows = {}
        print("\nB. AdaPNM (defaults: betas=(0.8, 0.999), beta0=0.5, bf16 momentum) vs "
              "torch.optim.AdamW (defaults: wd 0.01), constant lr")
        print("| optimizer | lr | held-out | train | gap (mean) | gap per seed | s/run |")
        print("|---|---|---|---|---|---|---|")
        for name, (lrs, make) in grids.items():
            for lr in lrs:
                held, tr, gap, gaps, sec = mean_result(make, lr, args.seeds, task)
                rows[(name, lr)] = (held, gap)
                per_seed = ", ".join(f"{g:+.4f}" for g in gaps)
                print(f"| {name} | {lr:g} | {held:.4f} | {tr:.4f} | {gap:+.4f} | {per_seed} | "
                      f"{sec:.1f} |", flush=True)
        print("\nMatched held-out loss (AdamW lr -> the AdaPNM lr with the closest held-out):")
        print("| AdamW lr | AdamW held-out / gap | AdaPNM lr | AdaPNM held-out / gap | "
              "held-out diff | gap ratio |")
        print("|---|---|---|---|---|---|")
        for lr_w in grids["AdamW"][0]:
            held_w, gap_w = rows[("AdamW", lr_w)]
            lr_a = min(grids["AdaPNM"][0], key=lambda lr: abs(rows[("AdaPNM", lr)][0] - held_w))
            held_a, gap_a = rows[("AdaPNM", lr_a)]
            print(f"| {lr_w:g} | {held_w:.4f} / {gap_w:+.4f} | {lr_a:g} | {held_a:.4f} / "
                  f"{gap_a:+.4f} | {100 * (held_a / held_w - 1):+.1f} % | "
                  f"{gap_a / gap_w:.2f} |", flush=True)
        best_w = min(grids["AdamW"][0], key=lambda lr: rows[("AdamW", lr)][0])
        best_a = min(grids["AdaPNM"][0], key=lambda lr: rows[("AdaPNM", lr)][0])
        (hw, gw), (ha, ga) = rows[("AdamW", best_w)], rows[("AdaPNM", best_a)]
        print(f"\nBest held-out of each: AdamW lr {best_w:g} {hw:.4f}/{gw:+.4f}; AdaPNM lr "
              f"{best_a:g} {ha:.4f}/{ga:+.4f} (held-out diff {100 * (ha / hw - 1):+.1f} %, "
              f"gap ratio {ga / gw:.2f})")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
