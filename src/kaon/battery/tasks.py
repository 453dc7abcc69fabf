"""Small-data diffusion denoising: a task that measures generalization of an optimizer.

A procedurally generated image set (no downloads; fully determined by a seed), a 32-image train
split and a held-out split, a small conv denoiser trained with the DDPM noise-prediction loss
at random timesteps, and a deterministic evaluation (fixed noise and timestep draws) of the
loss on both splits. The train-to-held-out gap measures memorization: with 32 images and tens of
thousands of weights the model can learn the training images themselves.

Images (after the proxy of the original K-Optimizers battery, scaled down): each is a sum of
``waves`` plane waves ``amp * sin(2 pi (fx x + fy y) + phase)`` with integer frequencies
``fx in [1, max_frequency]``, ``fy in [-max_frequency, max_frequency]``, ``amp in [0, 1)``,
plus a Gaussian blob ``1.2 exp(-|r - c|^2 / 0.02)`` at a random centre, on a ``size x size``
grid over ``[0, 1)^2``; the whole set is normalized to zero mean and unit standard deviation.
All randomness comes from local ``torch.Generator`` objects, so nothing depends on (or
changes) the global random state.

Example::

    import torch, kaon
    from kaon.battery import DenoiseTask, run_denoise

    result = run_denoise(lambda params, lr: kaon.Nekaon(params, lr=lr), lr=3e-3, seed=0,
                         task=DenoiseTask(steps=200))
    print(result.train_loss, result.heldout_loss, result.gap)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional

__all__ = ["DenoiseTask", "TaskResult", "make_images", "build_denoiser", "run_denoise",
           "evaluate", "evaluate_draws"]

OptimizerFactory = Callable[[Iterable[Tensor], float], torch.optim.Optimizer]


def make_images(count: int, size: int = 16, seed: int = 7, waves: int = 4,
                max_frequency: int = 5) -> Tensor:
    """``count`` grayscale images ``[count, 1, size, size]``, normalized over the set."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float64) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.zeros(count, size, size, dtype=torch.float64)
    for i in range(count):
        fx = torch.randint(1, max_frequency + 1, (waves,), generator=gen, dtype=torch.int64)
        fy = torch.randint(-max_frequency, max_frequency + 1, (waves,), generator=gen,
                           dtype=torch.int64)
        phase = torch.rand(waves, generator=gen, dtype=torch.float64) * 2 * math.pi
        amp = torch.rand(waves, generator=gen, dtype=torch.float64)
        for w in range(waves):
            images[i] += amp[w] * torch.sin(2 * math.pi * (fx[w] * x + fy[w] * y) + phase[w])
        cx, cy = torch.rand(2, generator=gen, dtype=torch.float64)
        images[i] += 1.2 * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)
    images = (images - images.mean()) / images.std()
    return images.float().unsqueeze(1)


def _time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of timesteps ``t`` (int) ``[B] -> [B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32,
                                                         device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _Block(nn.Module):
    def __init__(self, channels_in: int, channels: int, embed: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(4, channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels, 3, padding=1)
        self.time = nn.Linear(embed, channels)
        self.norm2 = nn.GroupNorm(4, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.skip = (nn.Conv2d(channels_in, channels, 1) if channels_in != channels
                     else nn.Identity())

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(functional.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        h = self.conv2(functional.silu(self.norm2(h)))
        return h + self.skip(x)


class Denoiser(nn.Module):
    """A two-level conv UNet of width ``width`` predicting the noise of ``x_t``."""

    def __init__(self, width: int = 16, embed: int = 32) -> None:
        super().__init__()
        self.embed = embed
        self.time_mlp = nn.Sequential(nn.Linear(embed, embed), nn.SiLU(), nn.Linear(embed, embed))
        self.inp = nn.Conv2d(1, width, 3, padding=1)
        self.down_block = _Block(width, width, embed)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = _Block(2 * width, 2 * width, embed)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.up_block = _Block(2 * width, width, embed)
        self.out_norm = nn.GroupNorm(4, width)
        self.out = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_mlp(_time_embedding(t, self.embed))
        h0 = self.down_block(self.inp(x), emb)
        h = self.mid(self.down(h0), emb)
        h = self.up_block(torch.cat([self.up(h), h0], dim=1), emb)
        return self.out(functional.silu(self.out_norm(h)))


def build_denoiser(width: int = 16, seed: int = 0) -> Denoiser:
    """The denoiser with weights initialized from ``seed`` (global RNG state is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Denoiser(width)


def alpha_bars(timesteps: int = 1000) -> Tensor:
    """DDPM's cumulative signal fractions for linear betas 1e-4 ... 2e-2."""
    betas = torch.linspace(1e-4, 2e-2, timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


def _noise_loss(model: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, bars: Tensor) -> Tensor:
    a = bars[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
    return functional.mse_loss(model(x_t, t), noise)


def _draw(n: int, shape: tuple[int, ...], steps: int, seed: int) -> tuple[Tensor, Tensor]:
    """Timesteps ``[n]`` and noise ``shape`` of one evaluation draw (generator ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.rand((), generator=gen).item()
    t = ((torch.arange(n) + offset) * steps / n).long().clamp_(0, steps - 1)
    t = t[torch.randperm(n, generator=gen)]
    return t, torch.randn(shape, generator=gen)


@torch.no_grad()
def evaluate_draws(model: nn.Module, images: Tensor, bars: Tensor, draws: int = 8,
                   seed: int = 5000, batch: int = 512) -> list[float]:
    """Noise-prediction MSE of each of ``draws`` fixed draws of (timestep, noise) per image.

    Draw ``j`` uses a generator seeded ``seed + j`` and stratified timesteps (image ``i`` at
    ``T (i + u) / n`` for a fixed ``u``), so the values are deterministic, the same noise is used
    for every optimizer, and the first ``k`` draws of a longer evaluation are those of a shorter
    one. All draws go through the model together, ``batch`` images per forward pass.
    """
    if draws < 1:
        raise ValueError(f"draws must be at least 1; got {draws}")
    n, steps = images.shape[0], bars.shape[0]
    ts, noises = zip(*(_draw(n, tuple(images.shape), steps, seed + j) for j in range(draws)))
    t = torch.cat(ts).to(images.device)
    noise = torch.cat(noises).to(images.device)
    x0 = images.repeat(draws, *([1] * (images.dim() - 1)))
    a = bars[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
    errors = torch.cat([(model(x_t[i:i + batch], t[i:i + batch]) - noise[i:i + batch])
                        .pow(2).flatten(1).mean(1) for i in range(0, x_t.shape[0], batch)])
    return [float(v) for v in errors.view(draws, n).mean(1)]


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, bars: Tensor, draws: int = 8,
             seed: int = 5000) -> float:
    """Noise-prediction MSE over ``draws`` fixed draws (the mean of :func:`evaluate_draws`)."""
    values = evaluate_draws(model, images, bars, draws, seed)
    return sum(values) / len(values)


@dataclass(frozen=True)
class DenoiseTask:
    """Settings of the small-data denoising task (defaults: about 3 s per run on one CPU core)."""

    size: int = 16
    train_images: int = 32
    heldout_images: int = 96
    data_seed: int = 7
    width: int = 16
    steps: int = 400
    batch_size: int = 8
    timesteps: int = 1000
    eval_draws: int = 8


@dataclass(frozen=True)
class TaskResult:
    train_loss: float
    heldout_loss: float
    seconds: float
    final_batch_loss: float

    @property
    def gap(self) -> float:
        """Held-out minus train loss (larger: more memorization)."""
        return self.heldout_loss - self.train_loss


def run_denoise(make_optimizer: OptimizerFactory, lr: float, seed: int = 0,
                task: DenoiseTask = DenoiseTask()) -> TaskResult:
    """Train a fresh denoiser with ``make_optimizer(params, lr)`` for ``task.steps`` steps at
    the constant ``lr`` and return its train and held-out losses.

    Batches cycle through the (shuffled) train images; timesteps and noise come from a
    generator seeded ``seed + 12345``; weights are initialized from ``seed``. Evaluation is
    bracketed by ``opt.eval()`` / ``opt.train()`` when the optimizer has them, so an optimizer
    that keeps its weights displaced during training (Nekaon) is measured at its true iterate.
    """
    images = make_images(task.train_images + task.heldout_images, task.size, task.data_seed)
    train, heldout = images[: task.train_images], images[task.train_images:]
    bars = alpha_bars(task.timesteps)
    model = build_denoiser(task.width, seed)
    opt = make_optimizer(model.parameters(), lr)
    gen = torch.Generator().manual_seed(seed + 12345)
    order = torch.randperm(task.train_images, generator=gen)
    start = time.perf_counter()
    loss = torch.zeros(())
    for step in range(task.steps):
        first = (step * task.batch_size) % task.train_images
        if first < task.batch_size and step:
            order = torch.randperm(task.train_images, generator=gen)
        index = order[first : first + task.batch_size]
        x0 = train[index]
        t = torch.randint(0, task.timesteps, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = _noise_loss(model, x0, t, noise, bars)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    has_modes = callable(getattr(opt, "eval", None)) and callable(getattr(opt, "train", None))
    if has_modes:
        opt.eval()
    model.eval()
    train_loss = evaluate(model, train, bars, task.eval_draws)
    heldout_loss = evaluate(model, heldout, bars, task.eval_draws)
    model.train()
    if has_modes:
        opt.train()
    return TaskResult(train_loss, heldout_loss, seconds, float(loss.detach()))
