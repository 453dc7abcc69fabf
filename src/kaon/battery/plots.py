"""PNG plots of a battery run (matplotlib, installed by the ``battery`` extra).

* ``heldout_curves.png``: held-out loss over training on each task (scheduled runs);
* ``memory_vs_loss.png``: optimizer state bytes per parameter against held-out loss, with the
  Pareto front (no other optimizer is both smaller and better);
* ``gap_vs_loss.png``: train-to-held-out gap against held-out loss;
* ``samples.png``: a grid of images sampled from each optimizer's diffusion model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_all", "pareto_front"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point beats in both coordinates (lower is better)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not all(map(math.isfinite, (x, y))):
            continue
        dominated = any(
            (x2 <= x and y2 <= y) and (x2 < x or y2 < y)
            for j, (x2, y2) in enumerate(points) if j != i and math.isfinite(x2 + y2)
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def write_all(rows: Sequence[dict[str, Any]], out: Path,
              log: Callable[[str], None] = print) -> list[Path]:
    """Write every plot into ``out``; returns the paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("kaon battery: matplotlib is not installed; no plots (pip install 'kaon[battery]')")
        return []
    rows = [r for r in rows if math.isfinite(r["te"])]
    if not rows:
        return []
    written = [_curves(plt, rows, out), _scatter(plt, rows, out, "bpp", "memory_vs_loss.png",
                                                 "optimizer state, bytes per parameter", True),
               _scatter(plt, rows, out, "gap", "gap_vs_loss.png",
                        "train-to-held-out gap (diffusion)", False)]
    samples = _samples(plt, rows, out)
    if samples is not None:
        written.append(samples)
    return written


def _curves(plt, rows, out: Path) -> Path:
    panels = [("diffusion (procedural images)", "steps", "trajectory"),
              ("faces (LFW photographs)", "steps", "images_trajectory"),
              ("language model", "lm_steps", "lm_trajectory")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    colors = plt.get_cmap("tab20")
    markers = "os^vD<>pPX*h"
    for ax, (title, steps_key, key) in zip(axes, panels):
        for i, row in enumerate(rows):
            values = row.get(key) or []
            steps = row.get(steps_key) or row.get("steps") or []
            if values and len(values) == len(steps):
                ax.plot(steps, values, marker=markers[i % len(markers)], markersize=3,
                        color=colors(i % 20), label=row["name"])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Held-out loss during training (scheduled runs; lower is better)")
    fig.tight_layout()
    path = out / "heldout_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scatter(plt, rows, out: Path, key: str, name: str, label: str, log_x: bool) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    points = [(r[key], r["te"]) for r in rows]
    xs = [max(p[0], 1e-3) if log_x else p[0] for p in points]
    ax.scatter(xs, [p[1] for p in points])
    for x, row in zip(xs, rows):
        ax.annotate(row["name"], (x, row["te"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if log_x:
        ax.set_xscale("log")
        front = pareto_front(points)
        ax.plot([xs[i] for i in front], [points[i][1] for i in front], "r--", lw=1,
                label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("held-out loss (diffusion)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _samples(plt, rows, out: Path) -> Path | None:
    with_samples = [r for r in rows if r.get("samples")]
    if not with_samples:
        return None
    count = max(len(r["samples"]) for r in with_samples)
    fig, axes = plt.subplots(len(with_samples), count, squeeze=False,
                             figsize=(1.1 * count + 1.5, 1.1 * len(with_samples) + 0.4))
    for i, row in enumerate(with_samples):
        size = row["sample_size"]
        for j in range(count):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row["samples"]):
                pixels = row["samples"][j]
                image = [pixels[k * size:(k + 1) * size] for k in range(size)]
                ax.imshow(image, cmap="gray", vmin=-2.5, vmax=2.5)
            if j == 0:
                ax.set_ylabel(row["name"], rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("Samples from each optimizer's diffusion model (same noise)", fontsize=9)
    fig.tight_layout()
    path = out / "samples.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
