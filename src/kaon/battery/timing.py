"""Step times of every entry, measured together in one pass (never taken from the cache).

Training runs are cached and may run in parallel worker processes, so their wall times say
nothing comparable. The step times of the report come from here instead: after the training
runs, every entry's diffusion training step (forward, backward and ``step()`` at the top
resolution) and its ``step()`` on the LoRA bag are timed in this process, round-robin over the
entries (``profile.timing_rounds`` rounds), so a change of machine load during the pass spreads
over all entries instead of landing on a few. Each number is the median of its samples, after
three warmup steps per entry; the garbage collector is run once before the pass and paused
during it.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kaon.battery.core import Profile
from kaon.battery.lora import LoraBag
from kaon.battery.registry import Entry, lr_for

__all__ = ["time_entries"]

WARMUP = 3


def _lora_step(entry: Entry, profile: Profile, device: torch.device) -> Callable[[], None]:
    from kaon.battery.core import set_mode

    bag = LoraBag(profile.lora_tensors).to(device)
    gen = torch.Generator().manual_seed(1)
    for p in bag.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    opt = entry.make(bag, lr_for(entry, "lm"))
    set_mode(opt, True)
    return opt.step


def time_entries(entries: Sequence[Entry], task: Any, profile: Profile, *,
                 device: str = "cpu", log: Callable[[str], None] = print
                 ) -> dict[str, dict[str, float]]:
    """``{entry.cache_key: {"ms": diffusion step ms, "lora_ms": LoRA-bag step ms}}``.

    ``task`` is the ``diffusion`` task (:class:`kaon.battery.diffusion.DiffusionTask`). An entry
    whose optimizer fails here is left out (and logged).
    """
    if profile.timing_rounds < 1 or profile.timing_steps < 1:
        raise ValueError("profile.timing_rounds and profile.timing_steps must be at least 1")
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    lora_per_round = max(1, profile.lora_reps // profile.timing_rounds)
    steps: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
    for entry in entries:
        try:
            train_step = task.timed_step(entry.make, lr_for(entry, task.family),
                                         profile=profile, device=dev)
            lora_step = _lora_step(entry, profile, dev)
            for _ in range(WARMUP):
                train_step()
                lora_step()
        except Exception as error:  # noqa: BLE001 - one failing optimizer must not stop the rest
            log(f"kaon battery: timing {entry.name} failed: {type(error).__name__}: {error}")
            continue
        steps[entry.cache_key] = (train_step, lora_step)
    samples: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in steps}
    # one collection before the pass, none during it: a collection inside a timed step would
    # land on whichever entry happens to run then (and a full collection per entry and round
    # cost more than the steps themselves)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(profile.timing_rounds):
            for key, (train_step, lora_step) in steps.items():
                for function, out, count in ((train_step, samples[key][0], profile.timing_steps),
                                             (lora_step, samples[key][1], lora_per_round)):
                    for _ in range(count):
                        sync()
                        tick = time.perf_counter()
                        function()
                        sync()
                        out.append(time.perf_counter() - tick)
    finally:
        if enabled:
            gc.enable()
    return {key: {"ms": 1e3 * statistics.median(train), "lora_ms": 1e3 * statistics.median(lora)}
            for key, (train, lora) in samples.items()}
