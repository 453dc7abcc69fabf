"""Adafactor8Bit (factored, 8-bit, no momentum) against torch.optim.AdamW(foreach=True), CPU.

The two optimizers step the same parameters of ``kaon bench``'s ``llm`` suite (55.9M parameters,
fixed random gradients) in alternation, the order flipped every round, and the ratio of each
round's two step times is recorded; the median ratio is robust to the load drifting on a shared
machine (``kaon bench`` measures the configurations one after the other instead).

Usage: python benchmarks/adafactor8bit_speed.py [ROUNDS] [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import kaon
from kaon import bench


def main() -> None:
    rounds = int(next((a for a in sys.argv[1:] if a.isdigit()), "15"))
    shapes = bench.suite_shapes("llm", quick="--quick" in sys.argv)
    params = bench.make_params(shapes)
    contenders = {
        "torch AdamW foreach": torch.optim.AdamW(params, lr=1e-4, foreach=True),
        "Adafactor8Bit": kaon.Adafactor8Bit(params, lr=1e-4, relative_step=False),
    }
    for opt in contenders.values():
        for _ in range(3):
            opt.step()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    ratios = []
    names = list(contenders)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            contenders[name].step()
            times[name].append(time.perf_counter() - start)
        ratios.append(times["Adafactor8Bit"][-1] / times["torch AdamW foreach"][-1])
    print(f"{sum(p.numel() for p in params):,d} parameters, {torch.get_num_threads()} threads, "
          f"{rounds} rounds")
    for name, values in times.items():
        print(f"{name:22s} median {statistics.median(values) * 1e3:8.1f} ms")
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"Adafactor8Bit / AdamW foreach: median {statistics.median(ratios):.2f}x "
          f"(quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f})")


if __name__ == "__main__":
    main()
