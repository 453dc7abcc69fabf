"""Turning cached runs into metrics, rankings, tables, ``report.md``, ``results.json`` and plots.

Metrics per optimizer (lower is better for all of them):

* ``te`` / ``tr`` / ``gap``: held-out loss, train-split loss and their difference at the end of
  the scheduled (REX) ``diffusion`` runs, averaged over seeds;
* ``conv``: steps until the held-out curve first reaches the common target ``T`` (interpolated
  linearly between the checkpoints around the crossing), the
  :data:`TARGET_QUANTILE` quantile of the best held-out losses of the *default* entries present
  (added or optional entries never move ``T``);
* ``bpp``: optimizer state bytes per parameter on the ``diffusion`` model;
* ``cte`` / ``cgap``: held-out loss and gap of the constant-LR ``diffusion`` runs;
* ``img_te`` / ``img_gap``: the real-image task; ``lm_te`` / ``lm_gap``: the language model.

These are deterministic for a fixed machine, thread count and versions. Columns that reward
doing less (a small gap, little state) rank only the entries that train well enough to reach
the target (``T`` for ``gap`` and ``bpp``; the same quantile of the default entries' final
constant-LR losses for ``cgap``); the others share the last rank there, so an optimizer that
barely learns does not win them. Ranks are competition ranks of the values as the table shows
them: equal shown values share a rank, and a shared first place is a tie, not a win.

Step times (``ms``: a diffusion training step; ``lora_ms``: ``step()`` on the LoRA bag; ``ttq``,
seconds to T = ``ms * conv / 1000``) are measured for all entries together in each run
(:mod:`kaon.battery.timing`), ranked separately, and kept in their own section of the report and
of ``results.json`` (``timing``), so everything else is byte-for-byte reproducible.

A mean rank hides that optimizers are specialists, so the report also lists each optimizer's
wins, and it states the seed noise: the spread (largest minus smallest) of the reference
optimizer's held-out loss over its seeds (the profile's seeds plus ``noise_seeds``), below
which held-out differences are not meaningful.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kaon.battery.core import Profile, RunRecord
from kaon.battery.registry import REFERENCE

__all__ = ["METRICS", "SPEED_METRICS", "TARGET_QUANTILE", "compute", "competition_ranks",
           "quantile", "render", "steps_to", "markdown_table", "text_table"]

#: the quantile of the default entries' best held-out losses that sets the common target T
TARGET_QUANTILE = 0.75

#: (key, column title, what rank 1 is called, digits shown, gate): deterministic metrics; a
#: gated metric ranks only the rows that reach its target ("T" or "T_const")
METRICS = [
    ("te", "held-out", "loss", 4, None),
    ("gap", "gap", "generalization", 4, "T"),
    ("conv", "steps to T", "convergence", 0, None),
    ("bpp", "B/param", "memory", 3, "T"),
    ("cgap", "const gap", "constant-LR", 4, "T_const"),
    ("img_te", "faces held-out", "real images", 4, None),
    ("lm_te", "LM held-out", "language model", 3, None),
]

#: (key, column title, what rank 1 is called, digits shown): timed in each run
SPEED_METRICS = [
    ("ms", "ms/step", "iteration speed", 1),
    ("lora_ms", "LoRA ms", "LoRA speed", 2),
]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite and len(finite) == len(values) else math.inf


def _runs(entry: dict[str, Any], task: str, schedule: str,
          seeds: Sequence[int]) -> list[RunRecord]:
    runs = entry.get("runs", {})
    return [RunRecord.from_json(runs[f"{task}/{schedule}/{s}"]) for s in seeds
            if f"{task}/{schedule}/{s}" in runs]


def _mean_trajectory(runs: Sequence[RunRecord]) -> tuple[list[int], list[float]]:
    if not runs or any(r.diverged for r in runs):
        return [], []
    steps = runs[0].steps
    return steps, [statistics.fmean(r.heldout[i] for r in runs) for i in range(len(steps))]


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of the finite ``values`` (linear interpolation; ``inf`` if none)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1]; got {q!r}")
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.inf
    position = q * (len(finite) - 1)
    low = math.floor(position)
    high = min(low + 1, len(finite) - 1)
    return finite[low] + (finite[high] - finite[low]) * (position - low)


def steps_to(steps: Sequence[int], curve: Sequence[float], target: float) -> float:
    """The step at which ``curve`` first reaches ``target``, interpolated linearly between the
    two checkpoints around the crossing (``inf`` if it never does)."""
    previous: tuple[float, float] | None = None
    for step, value in zip(steps, curve):
        if value <= target:
            if previous is None or previous[1] <= value:
                return float(step)
            s0, v0 = previous
            return s0 + (step - s0) * (v0 - target) / (v0 - value)
        previous = (float(step), value)
    return math.inf


def _shown(value: float, digits: int) -> float:
    return round(value, digits) if math.isfinite(value) else math.inf


def competition_ranks(values: Sequence[float], digits: int,
                      eligible: Sequence[bool] | None = None) -> list[int]:
    """Ranks (1 = lowest) of ``values`` rounded to ``digits``: equal shown values share a rank
    (1, 2, 2, 4); non-finite values and rows not ``eligible`` share the last rank."""
    if eligible is None:
        eligible = [True] * len(values)
    keys = [_shown(v, digits) if ok else math.inf for v, ok in zip(values, eligible)]
    return [1 + sum(other < key for other in keys) for key in keys]


def _is_default(config: str, entry: dict[str, Any]) -> bool:
    if entry.get("family") == "custom":
        return False
    if "default" in entry:
        return bool(entry["default"])
    from kaon.battery.registry import ENTRIES

    return any(e.cache_key == config and e.default for e in ENTRIES)


def compute(entries: dict[str, Any], profile: Profile,
            timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics, ranks, the targets and the seed noise for every entry with its diffusion runs;
    ``timing`` (from :func:`kaon.battery.timing.time_entries`) adds the speed rows."""
    seeds = list(profile.seeds)
    rows: dict[str, dict[str, Any]] = {}
    for config, entry in entries.items():
        diffusion = _runs(entry, "diffusion", "rex", seeds)
        if len(diffusion) < len(seeds):
            continue
        const = _runs(entry, "diffusion", "constant", seeds)
        images = _runs(entry, "images", "rex", seeds)
        lm = _runs(entry, "lm", "rex", seeds)
        steps, trajectory = _mean_trajectory(diffusion)
        rows[config] = {
            "name": entry.get("name", config), "config": config,
            "family": entry.get("family", ""), "blurb": entry.get("blurb", ""),
            "default": _is_default(config, entry),
            "te": _mean([r.final_heldout for r in diffusion]),
            "tr": _mean([r.final_train for r in diffusion]),
            "gap": _mean([r.gap for r in diffusion]),
            "bpp": _mean([r.bytes_per_param for r in diffusion]),
            "cte": _mean([r.final_heldout for r in const]) if const else math.inf,
            "cgap": _mean([r.gap for r in const]) if const else math.inf,
            "img_te": _mean([r.final_heldout for r in images]) if images else math.inf,
            "img_gap": _mean([r.gap for r in images]) if images else math.inf,
            "lm_te": _mean([r.final_heldout for r in lm]) if lm else math.inf,
            "lm_gap": _mean([r.gap for r in lm]) if lm else math.inf,
            "steps": steps, "trajectory": trajectory,
            "images_trajectory": _mean_trajectory(images)[1],
            "lm_trajectory": _mean_trajectory(lm)[1],
            "lm_steps": _mean_trajectory(lm)[0],
            "diverged": [f"{r.task}/{r.schedule}/{r.seed}" for r in diffusion + const + images + lm
                         if r.diverged],
            "errors": entry.get("errors", {}),
            "samples": next((r.extra.get("samples") for r in diffusion if r.extra.get("samples")),
                            None),
            "sample_size": next((r.extra.get("sample_size") for r in diffusion
                                 if r.extra.get("sample_size")), None),
        }
    # the common targets: a quantile of the default entries present (all entries if none is)
    basis = [r for r in rows.values() if r["default"]] or list(rows.values())
    target = quantile([min(r["trajectory"]) for r in basis if r["trajectory"]], TARGET_QUANTILE)
    target_const = quantile([r["cte"] for r in basis], TARGET_QUANTILE)
    for row in rows.values():
        row["conv"] = steps_to(row["steps"], row["trajectory"], target)
    reached = {"T": lambda r: math.isfinite(r["conv"]),
               "T_const": lambda r: r["cte"] <= target_const}
    ordered = list(rows.values())
    for key, _, _, digits, gate in METRICS:
        eligible = [reached[gate](r) if gate else True for r in ordered]
        for row, rank in zip(ordered, competition_ranks([r[key] for r in ordered], digits,
                                                        eligible)):
            row.setdefault("ranks", {})[key] = rank
    firsts = _first_places(ordered, [(k, label) for k, _, label, _, _ in METRICS])
    for row in ordered:
        row["mean_rank"] = statistics.fmean(row["ranks"].values()) if row.get("ranks") else math.inf
        row["wins"] = _wins(row, firsts)
    ordered.sort(key=lambda r: (_shown(r["mean_rank"], 1), r["name"]))
    for row, rank in zip(ordered, competition_ranks([r["mean_rank"] for r in ordered], 1)):
        row["place"] = rank
    return {"target": target, "target_const": target_const,
            "target_basis": len([r for r in basis if r["trajectory"]]),
            "noise": _seed_noise(entries, profile), "rows": ordered,
            "speed": _speed_rows(ordered, timing), "ties": _ties(ordered, firsts)}


def _first_places(rows: Sequence[dict[str, Any]], metrics: Sequence[tuple[str, str]],
                  ranks_key: str = "ranks") -> dict[str, list[str]]:
    """``{label: names ranked first}`` for every metric someone is ranked first on."""
    out = {}
    for key, label in metrics:
        names = [r["name"] for r in rows if r[ranks_key].get(key) == 1
                 and math.isfinite(r[key])]
        if names:
            out[label] = names
    return out


def _wins(row: dict[str, Any], firsts: dict[str, list[str]]) -> list[str]:
    return [label if len(names) == 1 else f"{label} (tie of {len(names)})"
            for label, names in firsts.items() if row["name"] in names]


def _ties(rows: Sequence[dict[str, Any]], firsts: dict[str, list[str]]) -> list[str]:
    return [f"{label}: {', '.join(names)}" for label, names in firsts.items() if len(names) > 1]


def _speed_rows(rows: Sequence[dict[str, Any]],
                timing: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The timed columns, in the order of ``rows``, with their own ranks and wins."""
    measured = (timing or {}).get("entries", {})
    speed = []
    for row in rows:
        times = measured.get(row["config"], {})
        ms = times.get("ms", math.inf)
        ms = ms if ms is not None else math.inf
        lora = times.get("lora_ms", math.inf)
        lora = lora if lora is not None else math.inf
        ttq = ms * row["conv"] / 1000 if math.isfinite(row["conv"]) else math.inf
        speed.append({"name": row["name"], "config": row["config"], "ms": ms, "lora_ms": lora,
                      "ttq": ttq, "te": row["te"], "ranks": {}})
    for key, _, _, digits in SPEED_METRICS:
        for entry, rank in zip(speed, competition_ranks([s[key] for s in speed], digits)):
            entry["ranks"][key] = rank
    firsts = _first_places(speed, [(k, label) for k, _, label, _ in SPEED_METRICS])
    for entry in speed:
        entry["wins"] = _wins(entry, firsts)
    return speed


def _seed_noise(entries: dict[str, Any], profile: Profile) -> dict[str, float] | None:
    """Seed-to-seed spread of held-out loss and gap (reference optimizer, or all entries)."""
    spreads_te, spreads_gap, counts = [], [], []
    for entry in entries.values():
        runs = entry.get("runs", {})
        finals = [RunRecord.from_json(v) for k, v in runs.items()
                  if k.startswith("diffusion/rex/")]
        finals = [r for r in finals if r.finished]
        if len(finals) >= 2 and (entry.get("name") == REFERENCE or len(profile.seeds) > 1):
            spreads_te.append(max(r.final_heldout for r in finals)
                              - min(r.final_heldout for r in finals))
            spreads_gap.append(max(r.gap for r in finals) - min(r.gap for r in finals))
            counts.append(len(finals))
    if not spreads_te:
        return None
    return {"te": statistics.fmean(spreads_te), "gap": statistics.fmean(spreads_gap),
            "pairs": len(spreads_te), "seeds": max(counts)}


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


COLUMNS = [
    ("#", lambda r: str(r["place"])),
    ("optimizer", lambda r: r["name"]),
    ("held-out", lambda r: _fmt(r["te"])),
    ("gap", lambda r: _fmt(r["gap"])),
    ("steps to T", lambda r: _fmt(r["conv"], 0)),
    ("B/param", lambda r: _fmt(r["bpp"], 3)),
    ("const held-out", lambda r: _fmt(r["cte"])),
    ("const gap", lambda r: _fmt(r["cgap"])),
    ("faces held-out", lambda r: _fmt(r["img_te"])),
    ("LM held-out", lambda r: _fmt(r["lm_te"], 3)),
    ("mean rank", lambda r: _fmt(r["mean_rank"], 1)),
    ("wins", lambda r: ", ".join(r["wins"])),
]

SPEED_COLUMNS = [
    ("optimizer", lambda s: s["name"]),
    ("ms/step", lambda s: f"{_fmt(s['ms'], 1)} ({s['ranks']['ms']})"
     if math.isfinite(s["ms"]) else "-"),
    ("LoRA ms", lambda s: f"{_fmt(s['lora_ms'], 2)} ({s['ranks']['lora_ms']})"
     if math.isfinite(s["lora_ms"]) else "-"),
    ("time to T s", lambda s: _fmt(s["ttq"], 2)),
    ("wins", lambda s: ", ".join(s["wins"])),
]


def _cells(rows: Sequence[dict[str, Any]], columns=COLUMNS) -> tuple[list[str], list[list[str]]]:
    return [title for title, _ in columns], [[cell(row) for _, cell in columns] for row in rows]


def markdown_table(rows: Sequence[dict[str, Any]], columns=COLUMNS) -> str:
    """The rows as a markdown table (``columns``: the ranking's by default)."""
    header, body = _cells(rows, columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def text_table(rows: Sequence[dict[str, Any]], columns=COLUMNS) -> str:
    """The rows as an aligned plain-text table for the terminal."""
    header, body = _cells(rows, columns)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h)
              for i, h in enumerate(header)]
    text_columns = {"#", "optimizer", "wins"}
    fmt = "  ".join(f"{{:<{w}}}" if header[i] in text_columns else f"{{:>{w}}}"
                    for i, w in enumerate(widths))
    lines = [fmt.format(*header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [fmt.format(*cells) for cells in body]
    return "\n".join(lines)


def _noise_text(noise: dict[str, float] | None, profile: Profile) -> str:
    if noise is None:
        return ("Seed noise: not measured (one seed); treat held-out differences of a few "
                "thousandths as noise.")
    if len(profile.seeds) == 1:
        count = noise.get("seeds", 2)
        who = f"the reference optimizer (AdamW) trained with {count} seeds"
    else:
        who = f"{noise['pairs']} optimizers trained with {len(profile.seeds)} seeds"
    return (f"Seed noise, from {who}: held-out loss differs by {noise['te']:.4f} and the gap by "
            f"{noise['gap']:.4f} between seeds (largest minus smallest). Differences smaller "
            "than that are within seed noise and do not separate optimizers (the plots draw it "
            "as bands and error bars).")


def _close_calls(rows: Sequence[dict[str, Any]], noise: dict[str, float] | None) -> list[str]:
    if noise is None or len(rows) < 2:
        return []
    lines = []
    for key, what in (("te", "held-out loss"), ("lm_te", "LM held-out loss"),
                      ("img_te", "faces held-out loss")):
        by = sorted((r for r in rows if math.isfinite(r[key])), key=lambda r: (r[key], r["name"]))
        if not by:
            continue
        best = by[0]
        # the seed noise is measured on diffusion; it is a floor for the other tasks
        tied = [r["name"] for r in by[1:] if r[key] - best[key] <= noise["te"]]
        digits = 3 if key == "lm_te" else 4
        if not tied:
            lines.append(f"Best {what}: {best['name']} ({_fmt(best[key], digits)}), ahead of "
                         "every other optimizer by more than the seed noise.")
        else:
            lines.append(f"Best {what}: {best['name']} ({_fmt(best[key], digits)}); within "
                         "seed noise of it: " + ", ".join(tied) + ".")
    return lines


def _timing_lines(results: dict[str, Any], timing: dict[str, Any] | None, fresh: bool,
                  clock: tuple[float, float] | None) -> list[str]:
    lines = ["## Step times (timed together in this run; they vary between runs)", ""]
    if not timing:
        return lines + ["Not measured (`--render-only` before any timed run).", ""]
    when = timing.get("when", "?")
    lines += [
        ("Timed in this run" if fresh else f"Timed in an earlier run ({when}; `--render-only` "
         "does not re-time)") + ", every entry in one pass, round-robin over the entries, in "
        "the main process after the training runs: `ms/step` is the median diffusion training "
        "step (forward, backward, `step()`) at the top resolution, `LoRA ms` the median "
        "`step()` on the LoRA bag, `time to T` = ms/step x steps to T. Ranks in parentheses; "
        "equal shown values share a rank.", "",
        markdown_table(results["speed"], SPEED_COLUMNS), "",
    ]
    facts = [f"timed {when}"]
    if timing.get("runs_measured") is not None:
        facts.append(f"{timing['runs_measured']} training run(s) measured, in "
                     f"{timing.get('jobs') or 1} worker process(es)")
    if timing.get("seconds") is not None:
        facts.append(f"timing pass {timing['seconds']:.0f} s")
    if timing.get("load_before"):
        facts.append("load average at the start "
                     + " / ".join(f"{v:.2f}" for v in timing["load_before"]) + " (1/5/15 min)")
    if clock is not None and fresh:
        facts.append(f"the whole command until this report: {clock[0]:.0f} s wall, "
                     f"{clock[1]:.0f} s CPU (user + system, workers included)")
    return lines + ["Run: " + "; ".join(facts) + ".", ""]


def render(entries: dict[str, Any], context: Any, profile: Profile, out: Path, *,
           skipped: dict[str, str] | None = None, stale: Sequence[str] = (),
           log: Callable[[str], None] = print, timing: dict[str, Any] | None = None,
           fresh_timing: bool = True, train_images: Any = None) -> dict[str, Any]:
    """Write ``report.md``, ``results.json`` and the plots into ``out``; print the tables.

    Everything but the ``timing`` parts (the last section of ``report.md``, the ``timing`` key
    of ``results.json``, ``speed_vs_loss.png``) is deterministic for a fixed cache.
    """
    from kaon.battery import plots

    results = compute(entries, profile, timing)
    rows = results["rows"]
    out.mkdir(parents=True, exist_ok=True)
    written = plots.write_all(rows, out, noise=results["noise"], speed=results["speed"],
                              target=results["target"], train_images=train_images, log=log)
    noise_line = _noise_text(results["noise"], profile)
    every = max(1, round(profile.steps / profile.checkpoints))
    lines = [
        "# kaon battery report", "",
        f"Machine and settings: {context.describe()}.", "",
        f"Tasks: diffusion ({profile.steps} steps, UNet width {profile.width}, resolutions "
        f"{'/'.join(map(str, profile.resolutions))}), faces (same protocol on LFW photographs), "
        f"language model ({profile.lm_steps} steps), LoRA bag ({profile.lora_tensors} tensors). "
        f"Seeds {', '.join(map(str, profile.seeds))}. Held-out data is never trained on.", "",
        f"Common convergence target T = {_fmt(results['target'])}: the "
        f"{round(100 * TARGET_QUANTILE)}th percentile of the best held-out losses of the "
        f"{results['target_basis']} default entries (entries added to the default set do not "
        f"move it). Steps to T: where the held-out curve (checkpoints every {every} steps) first "
        f"reaches T, interpolated linearly between the two checkpoints around it. The gap and B/param columns rank only the entries that reach T, and "
        f"const gap only those whose constant-LR held-out loss reaches "
        f"{_fmt(results['target_const'])} (the same percentile); the others share the last "
        "rank there. Lower is better in every column; equal shown values share a rank.", "",
        noise_line, "",
        *_close_calls(rows, results["noise"]), "",
    ]
    if results["ties"]:
        lines += ["Shared first places (ties, not wins): " + "; ".join(results["ties"]) + ".",
                  ""]
    lines += [
        "## Ranking (by mean rank over the metrics)", "",
        markdown_table(rows), "",
        "A mean rank is not how to choose: optimizers are specialists. Use the column that "
        "matters for your run (held-out loss and gap for small-data fine-tuning, B/param for "
        "memory, const columns when you train without a schedule, and the step times below "
        "for speed).", "",
        "The metrics rank overfitting and convergence on small proxy tasks, not perceptual "
        "quality. Step times are not in this table: they depend on the machine and its load, "
        "so they have their own section, timed for all entries together.", "",
    ]
    problems = [(r["name"], r["diverged"], r["errors"]) for r in rows if r["diverged"] or r["errors"]]
    shown = {r["config"] for r in rows}
    problems += [(entry.get("name", config), [], entry["errors"])
                 for config, entry in entries.items()
                 if config not in shown and entry.get("errors")]
    problems += [(name, [], {"skipped": why}) for name, why in (skipped or {}).items()]
    if problems:
        lines += ["## Problems", ""]
        for name, diverged, errors in problems:
            if diverged:
                lines.append(f"- {name}: diverged in {', '.join(diverged)}")
            for what, message in errors.items():
                lines.append(f"- {name}: {what}: {message}")
        lines.append("")
    if stale:
        lines += ["## Stale cache entries (not ranked)", "",
                  "Measured with a configuration or learning rate the registry no longer has: "
                  + ", ".join(stale) + ".", ""]
    if written:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in written] + [""]
    lines += ["## Optimizers", ""] + [f"- **{r['name']}** ({r['family']}): {r['blurb']}; "
                                      f"configuration `{r['config']}`" for r in rows] + [""]
    from kaon.battery.runner import process_times

    clock = process_times()
    lines += _timing_lines(results, timing, fresh_timing, clock)
    (out / "report.md").write_text("\n".join(lines))
    payload = {"context": context.describe(), "profile": profile.name,
               "target": results["target"], "target_const": results["target_const"],
               "target_quantile": TARGET_QUANTILE, "noise": results["noise"],
               "rows": [{k: v for k, v in r.items() if k != "samples"} for r in rows],
               "ties": results["ties"], "skipped": skipped or {}, "stale": list(stale),
               # everything below varies between runs
               "timing": {**(timing or {}), "fresh": fresh_timing,
                          "command_wall_s": clock[0] if fresh_timing else None,
                          "command_cpu_s": clock[1] if fresh_timing else None,
                          "rows": [{k: v for k, v in s.items() if k != "te"}
                                   for s in results["speed"]]}}
    (out / "results.json").write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    log("")
    log(text_table(rows))
    log("")
    log(text_table(results["speed"], SPEED_COLUMNS))
    log("")
    log(noise_line)
    for line in _close_calls(rows, results["noise"]):
        log(line)
    for name, why in (skipped or {}).items():
        log(f"skipped {name}: {why}")
    log(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}  plots: "
        f"{', '.join(p.name for p in written) or 'none'}")
    return payload


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
