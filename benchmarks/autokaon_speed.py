"""Step time of Autokaon (tuning and frozen) against plain Adakaon, interleaved, same run.

Shapes: ``kaon.bench.suite_shapes(suite, quick=True)`` (the whole 1,434-tensor bag for lora); fixed random gradients, fp32 weights;
only ``step()`` is timed. Prints the median step time of each and the ratio to Adakaon at the
same rate. A frozen Autokaon should be Adakaon's speed (ratio about 1); a tuning step adds the
statistics pass.

    python benchmarks/autokaon_speed.py [--suite llm] [--steps 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kaon
from kaon import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="llm")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # the whole LoRA bag (its quick form is cut to 256 tensors since kaon bench --quick)
    shapes = bench.suite_shapes(args.suite, quick=args.suite != "lora")
    opts = {
        "Adakaon": kaon.Adakaon(bench.make_params(shapes), lr=1e-4),
        "Autokaon tuning": kaon.Autokaon(bench.make_params(shapes), lr_freeze=None),
        "Autokaon frozen": kaon.Autokaon(bench.make_params(shapes), lr_freeze=1),
    }
    for opt in opts.values():
        opt.step()
        opt.step()
    assert opts["Autokaon frozen"].is_frozen()
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(args.steps):
        for name, opt in opts.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["Adakaon"])
    print(f"{args.suite}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.steps} interleaved steps: " + ", ".join(
              f"{name} {statistics.median(t) * 1e3:.1f} ms ({statistics.median(t) / base:.2f}x)"
              for name, t in times.items()))
    print("state bytes/param: " + ", ".join(f"{name} {opt.bytes_per_param():.3f}"
                                            for name, opt in opts.items()))


if __name__ == "__main__":
    main()
