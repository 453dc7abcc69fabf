"""Gradient memory and step time: gradient release against a normal loop.

A bf16 transformer-style stack (embedding, blocks of attention-sized and MLP linears, norms,
head) is trained with one kaon optimizer three ways, interleaved step by step:

* ``normal``: ``loss.backward(); opt.step(); opt.zero_grad()``;
* ``release``: ``kaon.prepare_for_gradient_release`` (each parameter stepped from its hook);
* ``release+acc``: the same with ``optimizer_accumulation`` over 2 micro-batches per step.

Measured: the peak bytes of parameter gradients alive during a step (``p.grad`` tensors plus
the optimizer-accumulation buffers), sampled from a post-accumulate-grad hook registered before
kaon's and once after backward; and the median wall time of one training step (forward,
backward and update; for ``release+acc`` per micro-batch). On CUDA the peak allocated memory
(``torch.cuda.max_memory_allocated``) of a step is printed too.

Run::

    python benchmarks/gradient_release_memory.py [--device cpu] [--width 512] [--depth 4]
        [--optimizer Adakaon] [--steps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import kaon
from kaon.bench import machine_description
from kaon.release import ACCUMULATED_GRAD


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        x = x + self.out(att)
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class Net(nn.Module):
    def __init__(self, width: int, depth: int, vocab: int = 512) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Meter:
    """Peak bytes of gradients alive (p.grad plus accumulation buffers)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.params, self.opt, self.peak = list(model.parameters()), opt, 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(lambda _: self.sample())

    def sample(self) -> None:
        alive = 0
        for p in self.params:
            if p.grad is not None:
                alive += p.grad.numel() * p.grad.element_size()
            buffer = self.opt.state.get(p, {}).get(ACCUMULATED_GRAD)
            if buffer is not None:
                alive += buffer.numel() * buffer.element_size()
        self.peak = max(self.peak, alive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--optimizer", default="Adakaon")
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)

    runs = {}
    for name in ("normal", "release", "release+acc"):
        torch.manual_seed(0)
        model = Net(args.width, args.depth).to(device, torch.bfloat16)
        opt = kaon.create_optimizer(args.optimizer, model.parameters(), lr=1e-4)
        meter = Meter(model, opt)  # registered first: samples before kaon's hook frees
        if name != "normal":
            kaon.prepare_for_gradient_release(model, opt)
        runs[name] = (model, opt, meter, [], [])
    weights = sum(p.numel() * p.element_size() for p in runs["normal"][0].parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        ids = torch.randint(0, 512, (8, 64), generator=gen).to(device)
        for name, (model, opt, meter, times, cuda_peaks) in runs.items():
            micro = 2 if name == "release+acc" else 1
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for m in range(micro):
                opt.optimizer_accumulation = m < micro - 1
                logits = model(ids[:, :-1]).float()
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
                (loss / micro).backward()
                meter.sample()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
                cuda_peaks.append(torch.cuda.max_memory_allocated())
            times.append((time.perf_counter() - start) / micro)

    print(f"machine: {machine_description(device)}; torch {torch.__version__}; "
          f"optimizer {args.optimizer}; bf16 weights {weights / 2**20:.1f} MiB; "
          f"{args.steps} interleaved steps (first one dropped)")
    base = runs["normal"]
    print(f"{'run':12s} {'peak grad MiB':>14s} {'x normal':>9s} {'step ms':>9s} {'x normal':>9s}"
          + ("  cuda peak MiB" if device.type == "cuda" else ""))
    for name, (_, _, meter, times, cuda_peaks) in runs.items():
        t = statistics.median(times[1:]) * 1e3
        t0 = statistics.median(base[3][1:]) * 1e3
        line = (f"{name:12s} {meter.peak / 2**20:14.2f} {meter.peak / base[2].peak:9.3f} "
                f"{t:9.1f} {t / t0:9.2f}")
        if cuda_peaks:
            line += f"  {max(cuda_peaks[1:]) / 2**20:13.1f}"
        print(line)


if __name__ == "__main__":
    main()
