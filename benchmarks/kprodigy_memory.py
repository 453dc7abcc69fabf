"""State bytes per parameter of KProdigy configurations on the ``kaon bench`` LLM-like stack.

    python benchmarks/kprodigy_memory.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

import kaon
from kaon import bench

CONFIGS = {
    "defaults": {},
    "factored bfloat16": {"second_moment": "factored", "momentum_dtype": "bfloat16"},
    "factored int8 slice_p=11": {"second_moment": "factored", "momentum_dtype": "int8",
                                 "slice_p": 11},
    "factored 4bit slice_p=11": {"second_moment": "factored", "momentum_dtype": "4bit",
                                 "slice_p": 11},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    shapes = bench.suite_shapes("llm", quick=args.quick)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    print(f"llm stack: {sum(p.numel() for p in params):,} parameters in {len(params)} tensors")
    for name, kwargs in CONFIGS.items():
        opt = kaon.KProdigy(params, **kwargs)
        opt.step()
        print(f"{name:28s} {opt.bytes_per_param():.3f} B/param")
        del opt


if __name__ == "__main__":
    main()
