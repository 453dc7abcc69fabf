"""Running the battery: every entry on every task, cached, then the report.

Results are cached in ``OUT/cache.json`` per (task, profile, entry configuration and learning
rates, seed, schedule, kaon version, torch version, device, threads), and saved after every run,
so adding an optimizer measures only that optimizer, an interrupted battery resumes where it
stopped, and ``--render-only`` rebuilds the report from the cache alone. The report ranks every
cached entry of the current registry (measured now or before) and every custom
``--optimizer`` entry; a cached entry whose registry configuration or learning rate has changed
since is stale and only listed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kaon import __version__
from kaon.battery.core import PROFILES, Profile, RunRecord
from kaon.battery.diffusion import DiffusionTask
from kaon.battery.lm import LanguageModelTask
from kaon.battery.lora import time_lora_bag
from kaon.battery.registry import REFERENCE, Entry, lr_for
from kaon.bench import machine_description

__all__ = ["Cache", "Context", "make_tasks", "run_battery"]

CACHE_VERSION = 1


@dataclass(frozen=True)
class Context:
    """What a cached number depends on besides the entry, task, seed and schedule."""

    profile: str
    device: str
    threads: int
    kaon: str = __version__
    torch: str = torch.__version__

    @property
    def key(self) -> str:
        return (f"{self.profile}|kaon-{self.kaon}|torch-{self.torch}|{self.device}|"
                f"threads-{self.threads}")

    def describe(self) -> str:
        name = machine_description(torch.device(self.device))
        device = name if self.device.startswith("cuda") else (
            f"CPU {name}, {self.threads} thread(s)")
        return (f"profile {self.profile}; {device}; torch {self.torch}; kaon {self.kaon}; "
                f"Python {platform.python_version()}")


@dataclass
class Cache:
    """``OUT/cache.json``: ``{context key: {entry config: {run key: record}}}``."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Cache:
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON ({error}); delete it to start over"
                                 ) from None
            if data.get("version") == CACHE_VERSION:
                return cls(path, data)
        return cls(path, {"version": CACHE_VERSION, "contexts": {}})

    def runs(self, context: Context, config: str) -> dict[str, Any]:
        contexts = self.data.setdefault("contexts", {})
        return contexts.setdefault(context.key, {}).setdefault(config, {"runs": {}})

    def entries(self, context: Context) -> dict[str, Any]:
        return self.data.get("contexts", {}).get(context.key, {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, allow_nan=True))
        os.replace(tmp, self.path)


def make_tasks(profile: Profile) -> list[Any]:
    tasks: list[Any] = []
    for name in profile.tasks:
        if name == "diffusion":
            tasks.append(DiffusionTask("synthetic"))
        elif name == "images":
            tasks.append(DiffusionTask("faces"))
        elif name == "lm":
            tasks.append(LanguageModelTask())
        else:
            raise ValueError(f"unknown battery task {name!r}")
    return tasks


def _planned_runs(entry: Entry, profile: Profile, tasks: Sequence[Any]) -> list[tuple]:
    """(task, schedule, seed) triples of one entry."""
    runs = []
    for task in tasks:
        seeds = list(profile.seeds)
        if entry.name == REFERENCE and task.name == "diffusion" and profile.noise_seed not in seeds:
            seeds.append(profile.noise_seed)  # the seed-noise estimate
        for seed in seeds:
            runs.append((task, "rex", seed))
        if task.name in profile.constant_tasks:
            runs += [(task, "constant", seed) for seed in profile.seeds]
    return runs


def _steps_of(task: Any, profile: Profile) -> int:
    return profile.lm_steps if task.family == "lm" else profile.steps


def run_battery(
    entries: Sequence[Entry],
    *,
    profile: str | Profile = "quick",
    out: str | Path = "battery-out",
    device: str = "cpu",
    threads: int | None = None,
    render_only: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure ``entries`` (skipping what the cache holds), then write the report.

    Returns the rendered results (the content of ``OUT/results.json``).
    """
    from kaon.battery import report

    prof = PROFILES[profile] if isinstance(profile, str) else profile
    out = Path(out)
    if threads is not None:
        torch.set_num_threads(threads)
    context = Context(prof.name, device, torch.get_num_threads())
    cache = Cache.load(out / "cache.json")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    tasks = make_tasks(prof)
    skipped: dict[str, str] = {}
    todo: list[tuple[Entry, Any, str, int]] = []
    for entry in entries:
        ok, why = entry.available()
        if not ok:
            skipped[entry.name] = why
            continue
        record = cache.runs(context, entry.cache_key)
        record.update(name=entry.name, family=entry.family, blurb=entry.blurb)
        if render_only:
            continue
        for task, schedule, seed in _planned_runs(entry, prof, tasks):
            if f"{task.name}/{schedule}/{seed}" not in record["runs"]:
                todo.append((entry, task, schedule, seed))
        if "lora_ms" not in record:
            todo.append((entry, None, "lora", 0))
    total = sum(_steps_of(t, prof) if t is not None else 1 for _, t, _, _ in todo)
    bar = _Progress(total, progress and bool(todo))
    started = time.perf_counter()
    for entry, task, schedule, seed in todo:
        record = cache.runs(context, entry.cache_key)
        label = f"{entry.name} {task.name if task else 'lora-bag'} {schedule} seed {seed}"
        bar.describe(label)
        try:
            if task is None:
                record["lora_ms"] = time_lora_bag(entry.make, lr_for(entry, "lm"),
                                                  prof.lora_tensors, prof.lora_reps, device)
                bar.update(1)
            else:
                lr = lr_for(entry, task.family, constant=schedule == "constant")
                run = task.run(entry.make, lr, schedule=schedule, seed=seed, profile=prof,
                               progress=bar.update, device=device)
                record["runs"][f"{task.name}/{schedule}/{seed}"] = run.to_json()
        except Exception as error:  # noqa: BLE001 - one failing optimizer must not stop the rest
            record.setdefault("errors", {})[label] = f"{type(error).__name__}: {error}"
            log(f"kaon battery: {label} failed: {type(error).__name__}: {error}")
        cache.save()
    bar.close()
    if todo:
        log(f"kaon battery: measured {len(todo)} run(s) in {time.perf_counter() - started:.0f} s")
    cache.save()
    from kaon.battery.registry import ENTRIES

    current = {e.cache_key for e in ENTRIES} | {e.cache_key for e in entries}
    cached = cache.entries(context)
    ranked = {k: v for k, v in cached.items() if k in current or v.get("family") == "custom"}
    stale = sorted(v.get("name", k) for k, v in cached.items() if k not in ranked)
    return report.render(ranked, context, prof, out, skipped=skipped, stale=stale, log=log)


class _Progress:
    """tqdm when installed, else a line per run."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)
            except ImportError:
                self.bar = None

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text[:48])
        elif self.enabled:
            print(f"  {text}", flush=True)

    def update(self, count: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def records_of(entry_data: dict[str, Any]) -> list[RunRecord]:
    return [RunRecord.from_json(r) for r in entry_data.get("runs", {}).values()]


def finite_mean(values: Sequence[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else math.inf
