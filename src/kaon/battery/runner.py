"""Running the battery: every entry on every task, cached, then the report.

Results are cached in ``OUT/cache.json`` per (task, profile, entry configuration and learning
rates, seed, schedule, kaon version, torch version, device, threads), and saved after every run,
so adding an optimizer measures only that optimizer, an interrupted battery resumes where it
stopped, and ``--render-only`` rebuilds the report from the cache alone. Training runs may run
in parallel worker processes (``jobs``); their results do not depend on it. Step times are not
cached with the runs: every invocation times all ranked entries together afterwards
(:mod:`kaon.battery.timing`) and stores that one pass, replacing the previous one. The report ranks every
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
from kaon.battery.registry import REFERENCE, Entry, lr_for
from kaon.bench import machine_description

__all__ = ["Cache", "Context", "default_jobs", "make_tasks", "process_times", "run_battery"]

CACHE_VERSION = 2


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
        if entry.name == REFERENCE and task.name == "diffusion":
            seeds += [s for s in profile.noise_seeds if s not in seeds]  # the seed-noise estimate
        for seed in seeds:
            runs.append((task, "rex", seed))
        if task.name in profile.constant_tasks:
            runs += [(task, "constant", seed) for seed in profile.seeds]
    return runs


def _steps_of(task: Any, profile: Profile) -> int:
    return profile.lm_steps if task.family == "lm" else profile.steps


def _reference(entry: Entry) -> tuple[str, ...]:
    """How a worker process finds ``entry``: its registry cache key or its ``--optimizer`` spec."""
    if entry.spec is not None:
        return ("custom", *entry.spec)
    return ("registry", entry.cache_key)


def _resolve(reference: Sequence[str]) -> Entry:
    from kaon.battery import registry

    if reference[0] == "custom":
        return registry.entry_from_spec(reference[1], reference[2])
    for entry in registry.ENTRIES:
        if entry.cache_key == reference[1]:
            return entry
    raise LookupError(f"no battery entry with configuration {reference[1]!r}")


_WORKER_TASKS: dict[str, Any] = {}


def _worker_init(threads: int, profile: Profile) -> None:
    torch.set_num_threads(threads)
    _WORKER_TASKS.update({task.name: task for task in make_tasks(profile)})


def _worker_run(reference: tuple[str, ...], task_name: str, schedule: str, seed: int,
                profile: Profile, device: str) -> dict[str, Any]:
    """One training run in a worker process (the same code and seeds as in-process)."""
    entry = _resolve(reference)
    task = _WORKER_TASKS[task_name]
    lr = lr_for(entry, task.family, constant=schedule == "constant")
    return task.run(entry.make, lr, schedule=schedule, seed=seed, profile=profile,
                    device=device).to_json()


def default_jobs() -> int:
    """Worker processes for the training runs: the CPUs this process may use, at most 4."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    return max(1, min(4, count))


def process_times() -> tuple[float, float]:
    """(wall seconds since this process started, CPU seconds: user + system of this process
    and of its finished child processes)."""
    try:
        import resource
    except ImportError:  # not Unix: this process only
        cpu = time.process_time()
    else:
        cpu = sum(u.ru_utime + u.ru_stime for u in
                  (resource.getrusage(resource.RUSAGE_SELF),
                   resource.getrusage(resource.RUSAGE_CHILDREN)))
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        wall = float(Path("/proc/uptime").read_text().split()[0]) - start
    except (OSError, ValueError, IndexError):
        wall = time.perf_counter() - _IMPORTED
    return wall, cpu


_IMPORTED = time.perf_counter()


def run_battery(
    entries: Sequence[Entry],
    *,
    profile: str | Profile = "quick",
    out: str | Path = "battery-out",
    device: str = "cpu",
    threads: int | None = None,
    jobs: int = 1,
    render_only: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure ``entries`` (skipping what the cache holds), time every ranked entry's steps
    together, then write the report.

    ``jobs`` worker processes run the training runs (``1``: all in this process; the results
    are the same either way, since every run seeds its own generators and each worker uses
    ``threads`` threads). Step times are never cached: they are measured again, for all ranked
    entries together, in this process after the training runs (``render_only`` reuses the
    timings of the last run, and the report says so). Returns the rendered results (the
    content of ``OUT/results.json``).
    """
    from kaon.battery import report
    from kaon.battery.timing import time_entries

    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer; got {jobs!r}")
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    out = Path(out)
    if threads is not None:
        torch.set_num_threads(threads)
    context = Context(prof.name, device, torch.get_num_threads())
    cache = Cache.load(out / "cache.json")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    load_before = _load()
    tasks = make_tasks(prof)
    skipped: dict[str, str] = {}
    todo: list[tuple[Entry, Any, str, int]] = []
    for entry in entries:
        ok, why = entry.available()
        if not ok:
            skipped[entry.name] = why
            continue
        record = cache.runs(context, entry.cache_key)
        record.update(name=entry.name, family=entry.family, blurb=entry.blurb,
                      default=entry.default)
        if entry.spec is not None:
            record["spec"] = list(entry.spec)
        if render_only:
            continue
        record.pop("errors", None)  # a failure is retried
        for task, schedule, seed in _planned_runs(entry, prof, tasks):
            if f"{task.name}/{schedule}/{seed}" not in record["runs"]:
                todo.append((entry, task, schedule, seed))
    total = sum(_steps_of(t, prof) for _, t, _, _ in todo)
    bar = _Progress(total, progress and bool(todo))
    started = time.perf_counter()

    def finish(entry: Entry, task: Any, schedule: str, seed: int,
               result: dict[str, Any] | BaseException) -> None:
        record = cache.runs(context, entry.cache_key)
        label = f"{entry.name} {task.name} {schedule} seed {seed}"
        if isinstance(result, BaseException):
            record.setdefault("errors", {})[label] = f"{type(result).__name__}: {result}"
            log(f"kaon battery: {label} failed: {type(result).__name__}: {result}")
        else:
            record["runs"][f"{task.name}/{schedule}/{seed}"] = result
        cache.save()

    workers = min(jobs, len(todo))
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        bar.describe(f"{len(todo)} runs in {workers} worker processes")
        with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init, initargs=(torch.get_num_threads(), prof)) as pool:
            futures = {pool.submit(_worker_run, _reference(e), t.name, s, seed, prof, device):
                       (e, t, s, seed) for e, t, s, seed in todo}
            for future in concurrent.futures.as_completed(futures):
                entry, task, schedule, seed = futures[future]
                error = future.exception()
                finish(entry, task, schedule, seed, error if error else future.result())
                bar.update(_steps_of(task, prof))
    else:
        for entry, task, schedule, seed in todo:
            bar.describe(f"{entry.name} {task.name} {schedule} seed {seed}")
            try:
                lr = lr_for(entry, task.family, constant=schedule == "constant")
                result: dict[str, Any] | BaseException = task.run(
                    entry.make, lr, schedule=schedule, seed=seed, profile=prof,
                    progress=bar.update, device=device).to_json()
            except Exception as error:  # noqa: BLE001 - one failing optimizer must not stop the rest
                result = error
            finish(entry, task, schedule, seed, result)
    bar.close()
    if todo:
        log(f"kaon battery: measured {len(todo)} run(s) in {time.perf_counter() - started:.0f} s")
    from kaon.battery.registry import ENTRIES

    current = {e.cache_key for e in ENTRIES} | {e.cache_key for e in entries}
    cached = cache.entries(context)
    ranked = {k: v for k, v in cached.items() if k in current or v.get("family") == "custom"}
    stale = sorted(v.get("name", k) for k, v in cached.items() if k not in ranked)
    timings = cache.data.setdefault("timings", {})
    if render_only:
        timing = timings.get(context.key)
    else:
        timed = _timable(ranked, entries, skipped)
        diffusion = next(t for t in tasks if t.name == "diffusion")
        tick = time.perf_counter()
        measured = time_entries(timed, diffusion, prof, device=device, log=log)
        timing = {"entries": measured, "seconds": time.perf_counter() - tick,
                  "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_before": load_before,
                  "runs_measured": len(todo), "jobs": workers if todo else 0}
        timings[context.key] = timing  # replaced as a whole: timings are never mixed
        cache.save()
    images = next((t for t in tasks if t.name == "diffusion"), None)
    train_images = images.train_images(prof) if images is not None else None
    payload = report.render(ranked, context, prof, out, skipped=skipped, stale=stale, log=log,
                            timing=timing, fresh_timing=not render_only,
                            train_images=train_images)
    wall, cpu = process_times()
    log(f"kaon battery: done in {wall:.0f} s wall, {cpu:.0f} s CPU (user + system of this "
        f"process and its workers); load average {_load_text(_load())}")
    return payload


def _timable(ranked: dict[str, Any], entries: Sequence[Entry],
             skipped: dict[str, str]) -> list[Entry]:
    """The entries to time: every ranked configuration that can be built here."""
    from kaon.battery import registry

    given = {e.cache_key: e for e in entries}
    chosen = []
    for config, data in ranked.items():
        entry = given.get(config)
        if entry is None and data.get("spec"):
            try:
                entry = registry.entry_from_spec(*data["spec"])
            except (ValueError, TypeError):
                entry = None
        if entry is None:
            entry = next((e for e in registry.ENTRIES if e.cache_key == config), None)
        if entry is not None and entry.name not in skipped and entry.available()[0]:
            chosen.append(entry)
    return chosen


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _load_text(load: list[float] | None) -> str:
    return "unknown" if load is None else " / ".join(f"{v:.2f}" for v in load) + " (1/5/15 min)"


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
