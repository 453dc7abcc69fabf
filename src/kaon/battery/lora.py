"""The LoRA bag: step-time overhead of an optimizer on many small tensors.

A trainer fine-tuning a LoRA steps hundreds of tiny tensors, so an optimizer's per-tensor
overhead (Python bookkeeping, kernel launches) dominates its step time. The bag is ``count``
rank-8 factor tensors, half ``[8, 64]`` (A) and half ``[64, 8]`` (B), with fixed random
gradients; only ``optimizer.step()`` is timed (median over ``reps`` steps after 5 warmup steps,
synchronizing the device around each step).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from kaon.battery.core import set_mode

__all__ = ["LoraBag", "time_lora_bag"]

RANK, WIDTH = 8, 64


class LoraBag(nn.Module):
    """``count`` LoRA factors as parameters of one module (so model-aware builders work)."""

    def __init__(self, count: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        shapes = [(RANK, WIDTH) if i % 2 == 0 else (WIDTH, RANK) for i in range(count)]
        self.factors = nn.ParameterList(
            nn.Parameter(torch.randn(shape, generator=gen) * 0.02) for shape in shapes
        )


def time_lora_bag(make: Callable[[nn.Module, float], torch.optim.Optimizer], lr: float,
                  count: int, reps: int, device: torch.device | str = "cpu",
                  warmup: int = 5) -> float:
    """Median milliseconds of one ``step()`` over the bag (fixed gradients)."""
    device = torch.device(device)
    bag = LoraBag(count).to(device)
    gen = torch.Generator().manual_seed(1)
    for p in bag.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    opt = make(bag, lr)
    set_mode(opt, True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + reps):
        sync()
        start = time.perf_counter()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]
