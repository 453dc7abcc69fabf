"""Turning cached runs into metrics, rankings, tables, ``report.md``, ``results.json`` and plots.

Metrics per optimizer (lower is better for all of them):

* ``te`` / ``tr`` / ``gap``: held-out loss, train-split loss and their difference at the end of
  the scheduled (REX) ``diffusion`` runs, averaged over seeds;
* ``conv`` / ``ttq``: steps (and seconds, ``ms * conv / 1000``) until the held-out loss first
  reaches the common target ``T`` = the worst optimizer's best held-out loss;
* ``ms``: median milliseconds per training step (forward, backward and step) on ``diffusion``;
  ``lora_ms``: median ``step()`` time on the LoRA bag; ``bpp``: optimizer state bytes per
  parameter on the ``diffusion`` model;
* ``cte`` / ``cgap``: held-out loss and gap of the constant-LR ``diffusion`` runs;
* ``img_te`` / ``img_gap``: the real-image task; ``lm_te`` / ``lm_gap``: the language model.

Each metric is ranked; the overall order is the mean rank. A mean rank hides that optimizers
are specialists, so the report also lists each optimizer's wins, and it states the seed noise:
the difference between two seeds of the reference optimizer, below which held-out differences
are not meaningful.
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

__all__ = ["METRICS", "compute", "render", "markdown_table", "text_table"]

#: (key, column title, what rank 1 is called)
METRICS = [
    ("te", "held-out", "loss"),
    ("gap", "gap", "generalization"),
    ("conv", "steps to T", "convergence"),
    ("ms", "ms/step", "iteration speed"),
    ("lora_ms", "LoRA ms", "LoRA speed"),
    ("bpp", "B/param", "memory"),
    ("cgap", "const gap", "constant-LR"),
    ("img_te", "faces held-out", "real images"),
    ("lm_te", "LM held-out", "language model"),
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


def compute(entries: dict[str, Any], profile: Profile) -> dict[str, Any]:
    """Metrics, ranks and the seed noise for every entry that has its diffusion runs."""
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
        row = {
            "name": entry.get("name", config), "config": config,
            "family": entry.get("family", ""), "blurb": entry.get("blurb", ""),
            "te": _mean([r.final_heldout for r in diffusion]),
            "tr": _mean([r.final_train for r in diffusion]),
            "gap": _mean([r.gap for r in diffusion]),
            "ms": _mean([r.ms_per_step for r in diffusion]),
            "bpp": _mean([r.bytes_per_param for r in diffusion]),
            "lora_ms": entry.get("lora_ms", math.inf),
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
        rows[config] = row
    # the common target: the worst optimizer's best held-out loss
    bests = [min(r["trajectory"]) for r in rows.values() if r["trajectory"]]
    target = max(bests) if bests else math.inf
    for row in rows.values():
        hit = next((s for s, v in zip(row["steps"], row["trajectory"]) if v <= target), None)
        row["conv"] = float(hit) if hit is not None else math.inf
        row["ttq"] = row["ms"] * row["conv"] / 1000 if math.isfinite(row["conv"]) else math.inf
    for key, _, _ in METRICS:
        ordered = sorted(rows.values(), key=lambda r, k=key: r[k])
        for rank, row in enumerate(ordered, 1):
            row.setdefault("ranks", {})[key] = rank
    for row in rows.values():
        row["mean_rank"] = statistics.fmean(row["ranks"].values()) if row.get("ranks") else math.inf
        row["wins"] = [label for key, _, label in METRICS if row["ranks"][key] == 1]
    noise = _seed_noise(entries, profile)
    ordered = sorted(rows.values(), key=lambda r: (r["mean_rank"], r["te"]))
    return {"target": target, "noise": noise, "rows": ordered}


def _seed_noise(entries: dict[str, Any], profile: Profile) -> dict[str, float] | None:
    """Seed-to-seed spread of held-out loss and gap (reference optimizer, or all entries)."""
    spreads_te, spreads_gap = [], []
    for entry in entries.values():
        runs = entry.get("runs", {})
        finals = [RunRecord.from_json(v) for k, v in runs.items()
                  if k.startswith("diffusion/rex/")]
        finals = [r for r in finals if not r.diverged]
        if len(finals) >= 2 and (entry.get("name") == REFERENCE or len(profile.seeds) > 1):
            spreads_te.append(max(r.final_heldout for r in finals)
                              - min(r.final_heldout for r in finals))
            spreads_gap.append(max(r.gap for r in finals) - min(r.gap for r in finals))
    if not spreads_te:
        return None
    return {"te": statistics.fmean(spreads_te), "gap": statistics.fmean(spreads_gap),
            "pairs": len(spreads_te)}


def _fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


COLUMNS = [
    ("#", lambda i, r: str(i)),
    ("optimizer", lambda i, r: r["name"]),
    ("held-out", lambda i, r: _fmt(r["te"])),
    ("gap", lambda i, r: _fmt(r["gap"])),
    ("steps to T", lambda i, r: _fmt(r["conv"], 0)),
    ("time to T s", lambda i, r: _fmt(r["ttq"], 2)),
    ("ms/step", lambda i, r: _fmt(r["ms"], 1)),
    ("LoRA ms", lambda i, r: _fmt(r["lora_ms"], 2)),
    ("B/param", lambda i, r: _fmt(r["bpp"], 3)),
    ("const held-out", lambda i, r: _fmt(r["cte"])),
    ("const gap", lambda i, r: _fmt(r["cgap"])),
    ("faces held-out", lambda i, r: _fmt(r["img_te"])),
    ("LM held-out", lambda i, r: _fmt(r["lm_te"], 3)),
    ("mean rank", lambda i, r: _fmt(r["mean_rank"], 1)),
    ("wins", lambda i, r: ", ".join(r["wins"])),
]


def _cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [title for title, _ in COLUMNS]
    return header, [[cell(i, row) for _, cell in COLUMNS] for i, row in enumerate(rows, 1)]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header, body = _cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def text_table(rows: Sequence[dict[str, Any]]) -> str:
    header, body = _cells(rows)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h)
              for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 or i == len(header) - 1 else f"{{:>{w}}}"
                    for i, w in enumerate(widths))
    lines = [fmt.format(*header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [fmt.format(*cells) for cells in body]
    return "\n".join(lines)


def _noise_text(noise: dict[str, float] | None, profile: Profile) -> str:
    if noise is None:
        return ("Seed noise: not measured (one seed); treat held-out differences of a few "
                "thousandths as noise.")
    who = ("the reference optimizer (AdamW) trained with two seeds" if len(profile.seeds) == 1
           else f"{noise['pairs']} optimizers trained with {len(profile.seeds)} seeds")
    return (f"Seed noise, from {who}: held-out loss differs by {noise['te']:.4f} and the gap by "
            f"{noise['gap']:.4f} between seeds. Differences smaller than that are within seed "
            "noise and do not separate optimizers.")


def _close_calls(rows: Sequence[dict[str, Any]], noise: dict[str, float] | None) -> list[str]:
    if noise is None or len(rows) < 2:
        return []
    by_te = sorted(rows, key=lambda r: r["te"])
    best = by_te[0]
    tied = [r["name"] for r in by_te[1:] if r["te"] - best["te"] <= noise["te"]]
    if not tied:
        return [f"Best held-out loss: {best['name']} ({_fmt(best['te'])}), ahead of every "
                "other optimizer by more than the seed noise."]
    return [f"Best held-out loss: {best['name']} ({_fmt(best['te'])}); within seed noise of it: "
            + ", ".join(tied) + "."]


def render(entries: dict[str, Any], context: Any, profile: Profile, out: Path, *,
           skipped: dict[str, str] | None = None, stale: Sequence[str] = (),
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``report.md``, ``results.json`` and the plots into ``out``; print the tables."""
    from kaon.battery import plots

    results = compute(entries, profile)
    rows = results["rows"]
    out.mkdir(parents=True, exist_ok=True)
    written = plots.write_all(rows, out, log=log)
    noise_line = _noise_text(results["noise"], profile)
    lines = [
        "# kaon battery report", "",
        f"Machine and settings: {context.describe()}.", "",
        f"Tasks: diffusion ({profile.steps} steps, UNet width {profile.width}, resolutions "
        f"{'/'.join(map(str, profile.resolutions))}), faces (same protocol on LFW photographs), "
        f"language model ({profile.lm_steps} steps), LoRA bag ({profile.lora_tensors} tensors). "
        f"Seeds {', '.join(map(str, profile.seeds))}. Held-out data is never trained on.", "",
        f"Common convergence target T = {_fmt(results['target'])} (the worst optimizer's best "
        "held-out loss). Lower is better in every column.", "",
        noise_line, "",
        *_close_calls(rows, results["noise"]), "",
        "## Ranking (by mean rank over the metrics)", "",
        markdown_table(rows), "",
        "A mean rank is not how to choose: optimizers are specialists. Use the column that "
        "matters for your run (held-out loss and gap for small-data fine-tuning, B/param for "
        "memory, LoRA ms for adapter training, const columns when you train without a "
        "schedule).", "",
        "The metrics rank overfitting and convergence on small proxy tasks, not perceptual "
        "quality; step times depend on the machine and on what else runs on it.", "",
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
    (out / "report.md").write_text("\n".join(lines))
    payload = {"context": context.describe(), "profile": profile.name,
               "target": results["target"], "noise": results["noise"],
               "rows": [{k: v for k, v in r.items() if k != "samples"} for r in rows],
               "skipped": skipped or {}, "stale": list(stale)}
    (out / "results.json").write_text(json.dumps(_jsonable(payload), indent=1))
    log("")
    log(text_table(rows))
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
