"""Small-data diffusion: a conv UNet trained as a pixel DDPM (epsilon prediction).

Two tasks share the protocol and differ in their images:

* ``diffusion``: the procedural images of :func:`kaon.battery.tasks.make_images` (sums of plane
  waves plus a Gaussian blob), the upstream battery's proxy data scaled to the profile;
* ``images``: real photographs, the 200 face crops of scikit-image's ``lfw_subset`` (shipped
  inside the package, nothing is downloaded), so conclusions are not artefacts of synthetic data.

Both use 32 train images and 96 held-out images, never trained on. Training follows the
progressive-resolution curriculum of the upstream battery: the first 40 % of the steps alternate
the lowest and highest resolution, the next 40 % the middle and highest, the last 20 % the
highest only (each resolution is normalized to zero mean and unit standard deviation over the
set). The held-out and train-split losses are the epsilon-MSE over fixed noise and timestep
draws at the highest resolution (:func:`kaon.battery.tasks.evaluate_draws`): the held-out curve
uses the first ``profile.curve_draws`` draws at every checkpoint, the final losses all
``profile.eval_draws`` draws (the train split is evaluated once, at the end). After training, a few
images are sampled deterministically (DDIM, eta = 0, from fixed noise) for the report's grid.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional

from kaon.battery.core import Profile, RunRecord, set_mode, train
from kaon.battery.tasks import (
    _noise_loss,
    alpha_bars,
    build_denoiser,
    evaluate,
    evaluate_draws,
    make_images,
)

__all__ = ["DiffusionTask", "resolution_schedule", "ddim_samples", "face_images"]

TRAIN_IMAGES, HELDOUT_IMAGES = 32, 96
TIMESTEPS = 1000
SAMPLES = 8


def _normalize(images: Tensor) -> Tensor:
    return (images - images.mean()) / images.std()


def _pyramid(images: Tensor, resolutions: tuple[int, ...]) -> dict[int, Tensor]:
    """``images`` at each resolution (area downsampling), each normalized over the set."""
    out = {}
    for size in resolutions:
        scaled = images if images.shape[-1] == size else functional.interpolate(
            images, size=(size, size), mode="area")
        out[size] = _normalize(scaled)
    return out


def face_images(count: int, size: int) -> Tensor:
    """The first ``count`` LFW face crops of scikit-image at ``size x size`` (centre 24 x 24
    crop of the 25 x 25 originals, area-resized), ``[count, 1, size, size]``."""
    try:
        from skimage import data
    except ImportError as error:  # the battery extra installs it
        raise RuntimeError("the 'images' task needs scikit-image (pip install 'kaon[battery]')"
                           ) from error
    faces = torch.from_numpy(data.lfw_subset()[:count]).float()[:, None, :24, :24]
    return functional.interpolate(faces, size=(size, size), mode="area")


def resolution_schedule(steps: int, resolutions: tuple[int, ...]) -> list[int]:
    """The resolution of every step (40 % {low, high}, 40 % {mid, high}, 20 % high)."""
    low, high = min(resolutions), max(resolutions)
    mid = sorted(resolutions)[len(resolutions) // 2]
    first, second = int(0.4 * steps), int(0.4 * steps)
    phase1 = [low, high] * (first // 2) + [high] * (first % 2)
    phase2 = [mid, high] * (second // 2) + [high] * (second % 2)
    random.Random(123).shuffle(phase1)
    random.Random(124).shuffle(phase2)
    return phase1 + phase2 + [high] * (steps - first - second)


@torch.no_grad()
def ddim_samples(model: nn.Module, size: int, steps: int, bars: Tensor,
                 count: int = SAMPLES, seed: int = 777) -> Tensor:
    """Deterministic DDIM (eta = 0) samples ``[count, 1, size, size]`` from fixed noise."""
    gen = torch.Generator().manual_seed(seed)
    device = bars.device
    x = torch.randn(count, 1, size, size, generator=gen).to(device)
    times = torch.linspace(bars.shape[0] - 1, 0, steps).round().long().to(device)
    for i, t in enumerate(times):
        a = bars[t]
        eps = model(x, t.repeat(count))
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp_(-4.0, 4.0)
        a_next = bars[times[i + 1]] if i + 1 < len(times) else torch.ones((), device=device)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


class DiffusionTask:
    """Pixel DDPM on 32 train / 96 held-out images (``source``: "synthetic" or "faces")."""

    family = "diffusion"

    def __init__(self, source: str = "synthetic") -> None:
        if source not in ("synthetic", "faces"):
            raise ValueError(f"source must be 'synthetic' or 'faces'; got {source!r}")
        self.source = source
        self.name = "diffusion" if source == "synthetic" else "images"
        what = "procedural images" if source == "synthetic" else "LFW face photographs"
        self.description = (f"conv UNet pixel DDPM on {what}, {TRAIN_IMAGES} train / "
                            f"{HELDOUT_IMAGES} held-out, progressive resolution")
        self._data: dict[tuple[int, ...], dict[int, Tensor]] = {}

    def data(self, resolutions: tuple[int, ...]) -> dict[int, Tensor]:
        if resolutions not in self._data:
            count, top = TRAIN_IMAGES + HELDOUT_IMAGES, max(resolutions)
            base = (make_images(count, size=top, seed=7) if self.source == "synthetic"
                    else face_images(count, top))
            self._data[resolutions] = _pyramid(base, resolutions)
        return self._data[resolutions]

    def run(self, make: Callable[[nn.Module, float], torch.optim.Optimizer], lr: float, *,
            schedule: str, seed: int, profile: Profile,
            progress: Callable[[int], None] | None = None,
            device: torch.device | str = "cpu") -> RunRecord:
        device = torch.device(device)
        data = {size: images.to(device) for size, images in self.data(profile.resolutions).items()}
        top = max(profile.resolutions)
        bars = alpha_bars(TIMESTEPS).to(device)
        model = build_denoiser(profile.width, seed).to(device)
        opt = make(model, lr)
        sizes = resolution_schedule(profile.steps, profile.resolutions)
        gen = torch.Generator().manual_seed(seed + 12345)
        orders: list[Tensor] = []

        def loss_at_step(step: int) -> Tensor:
            start = (step * profile.batch) % TRAIN_IMAGES
            if start < profile.batch or not orders:
                orders.append(torch.randperm(TRAIN_IMAGES, generator=gen))
            index = orders[-1][start:start + profile.batch].to(device)
            x0 = data[sizes[step]][:TRAIN_IMAGES][index]
            t = torch.randint(0, TIMESTEPS, (x0.shape[0],), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            return _noise_loss(model, x0, t, noise, bars)

        heldout_images, train_images = data[top][TRAIN_IMAGES:], data[top][:TRAIN_IMAGES]
        curve_draws = min(profile.curve_draws, profile.eval_draws)

        def evaluate_curve() -> float:
            values = evaluate_draws(model, heldout_images, bars, curve_draws)
            return sum(values) / len(values)

        def evaluate_final() -> tuple[float, float, float]:
            values = evaluate_draws(model, heldout_images, bars, profile.eval_draws)
            return (sum(values[:curve_draws]) / curve_draws,
                    evaluate(model, train_images, bars, profile.eval_draws),
                    sum(values) / len(values))

        record = RunRecord(self.name, schedule, seed, lr)
        train(model, opt, steps=profile.steps, schedule=schedule, loss_at_step=loss_at_step,
              evaluate_curve=evaluate_curve, evaluate_final=evaluate_final,
              checkpoints=profile.checkpoints, record=record, progress=progress)
        if not record.diverged and schedule == "rex" and seed == profile.seeds[0]:
            set_mode(opt, False)
            model.eval()
            samples = ddim_samples(model, top, profile.sample_steps, bars)
            record.extra["samples"] = [[round(v, 3) for v in img.flatten().cpu().tolist()]
                                       for img in samples]
            record.extra["sample_size"] = top
        return record

    def train_images(self, profile: Profile, count: int = SAMPLES) -> Tensor:
        """The first ``count`` training images at the top resolution (for the samples plot)."""
        return self.data(profile.resolutions)[max(profile.resolutions)][:count]

    def timed_step(self, make: Callable[[nn.Module, float], torch.optim.Optimizer], lr: float,
                   *, profile: Profile, device: torch.device | str = "cpu",
                   seed: int = 0) -> Callable[[], None]:
        """One training step (forward, backward, ``step()``) at the top resolution, as a
        callable, for :mod:`kaon.battery.timing`; batches and draws repeat deterministically."""
        device = torch.device(device)
        top = max(profile.resolutions)
        images = self.data(profile.resolutions)[top][:TRAIN_IMAGES].to(device)
        bars = alpha_bars(TIMESTEPS).to(device)
        model = build_denoiser(profile.width, seed).to(device)
        opt = make(model, lr)
        set_mode(opt, True)
        gen = torch.Generator().manual_seed(seed + 12345)
        batches = [(torch.randperm(TRAIN_IMAGES, generator=gen)[:profile.batch].to(device),
                    torch.randint(0, TIMESTEPS, (profile.batch,), generator=gen).to(device),
                    torch.randn((profile.batch, 1, top, top), generator=gen).to(device))
                   for _ in range(4)]
        calls = [0]

        def step() -> None:
            index, t, noise = batches[calls[0] % len(batches)]
            calls[0] += 1
            opt.zero_grad(set_to_none=True)
            _noise_loss(model, images[index], t, noise, bars).backward()
            opt.step()

        return step
