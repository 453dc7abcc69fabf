"""KProdigy vs ``prodigyopt.Prodigy``: median ``step()`` time on CPU, in the same run.

Shapes: ``kaon.bench.suite_shapes("llm", quick=True)`` (an LLM-like stack, 4.2M parameters; with
``--full`` the 56M-parameter stack of ``kaon bench``) and ``("lora")`` (1,434 LoRA
factors of SDXL's UNet, about 21M parameters); fixed random
gradients, fp32 parameters, only ``step()`` is timed (as ``kaon bench`` does). Prints the median
step time of each optimizer and the ratio to Prodigy (< 1: faster). The optimizers step in turn, so a
busy machine slows them alike; still, repeat and compare ratios, not absolute times.

Rows: Prodigy, KProdigy (eager), KProdigy ``compile=True`` (the compiled kernels; they compile
during the warm-up steps), and the memory recipe.

    python benchmarks/bench_kprodigy.py [--steps 10] [--warmup 3] [--threads 2] [--repeat 1]
                                        [--full]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import statistics
import time

import torch

import kaon
from kaon import bench


def step_times(makers: dict, shapes, steps: int, warmup: int) -> dict[str, float]:
    """Median step time of each optimizer; the optimizers step in turn (interleaved), so load
    from other processes affects them alike."""
    opts = {}
    with contextlib.redirect_stdout(io.StringIO()):  # prodigyopt prints notices
        for name, make in makers.items():
            opts[name] = make(bench.make_params(shapes))
    for _ in range(warmup):
        for opt in opts.values():
            opt.step()
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(steps):
        for name, opt in opts.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    del opts
    gc.collect()
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--full", action="store_true",
                        help="the full LLM-like stack of kaon bench (56M parameters)")
    args = parser.parse_args()
    from prodigyopt import Prodigy

    torch.set_num_threads(args.threads)
    configs = {
        "prodigyopt.Prodigy": lambda ps: Prodigy(ps),
        "KProdigy": lambda ps: kaon.KProdigy(ps),
        "KProdigy compile=True": lambda ps: kaon.KProdigy(ps, compile=True),
        "KProdigy factored 4bit slice_p=11": lambda ps: kaon.KProdigy(
            ps, second_moment="factored", momentum_dtype="4bit", slice_p=11),
    }
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} timed steps")
    for repeat in range(args.repeat):
        for suite in ("llm", "lora"):
            # lora: the whole 1,434-tensor bag (kaon bench --quick cuts it to 256)
            shapes = bench.suite_shapes(suite, quick=suite == "llm" and not args.full)
            times = step_times(configs, shapes, args.steps, args.warmup)
            base = times["prodigyopt.Prodigy"]
            row = ", ".join(f"{name} {t * 1e3:.1f} ms ({t / base:.2f}x)"
                            for name, t in times.items())
            print(f"[{repeat + 1}] {suite}: {row}")


if __name__ == "__main__":
    main()
