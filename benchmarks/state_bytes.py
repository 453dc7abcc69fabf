"""State bytes per parameter of the memory targets of issues 3, 4, 5 and 6.

Measured on an LLM-like stack ([1024, 1024], [4096, 1024], [1024, 4096] and two 1-D norms)
after one step; Muon on the three matrices only.

Usage: python benchmarks/state_bytes.py
"""

from __future__ import annotations

import torch

import kaon

SHAPES = [(1024, 1024), (4096, 1024), (1024, 4096), (1024,), (1024,)]

CONFIGS = [
    ("AdamW fp32", kaon.AdamW, {}),
    ("AdamW bf16", kaon.AdamW, {"state_dtype": "bfloat16"}),
    ("AdamW int8", kaon.AdamW, {"state_dtype": "int8"}),
    ("AdamW 4bit", kaon.AdamW, {"state_dtype": "4bit"}),
    ("Lion 4bit", kaon.Lion, {"momentum_dtype": "4bit"}),
    ("Lion int8", kaon.Lion, {"momentum_dtype": "int8"}),
    ("Nekaon default", kaon.Nekaon, {}),
    ("AdaMuon int8", kaon.AdaMuon, {"momentum_dtype": "int8"}),
    ("AdaPNM int8", kaon.AdaPNM, {"momentum_dtype": "int8"}),
    ("KProdigy factored 4bit slice_p=11", kaon.KProdigy,
     {"second_moment": "factored", "momentum_dtype": "4bit", "slice_p": 11}),
    ("KProdigy factored int8 slice_p=11", kaon.KProdigy,
     {"second_moment": "factored", "momentum_dtype": "int8", "slice_p": 11}),
    # issue 4 targets: <= 0.02, <= 0.56, <= 0.6
    ("Adafactor8Bit 8bit factored, no momentum", kaon.Adafactor8Bit, {"relative_step": False}),
    ("Adafactor8Bit 8bit + 4bit momentum", kaon.Adafactor8Bit,
     {"relative_step": False, "beta1": 0.9}),
    ("Adafactor8Bit APOLLO r16 + 4bit momentum", kaon.Adafactor8Bit,
     {"relative_step": False, "beta1": 0.9, "beta2": 0.999, "apollo_rank": 16}),
    ("Adafactor8Bit CAME 8bit + 4bit momentum", kaon.Adafactor8Bit,
     {"relative_step": False, "beta1": 0.9, "beta2": 0.999, "beta3": 0.9999}),
]


def bytes_per_param(cls, shapes, **kwargs) -> float:
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    opt = cls(params, **kwargs)
    for p in params:
        p.grad = torch.randn(p.shape) * 1e-3
    opt.step()
    return opt.bytes_per_param()


def main() -> None:
    torch.manual_seed(0)
    for name, cls, kwargs in CONFIGS:
        print(f"{name:36s} {bytes_per_param(cls, SHAPES, **kwargs):.3f}")
    print(f"{'Muon (matrices only)':36s} {bytes_per_param(kaon.Muon, SHAPES[:3]):.3f}")


if __name__ == "__main__":
    main()
