"""PNG plots of a battery run (matplotlib, installed by the ``battery`` extra).

* ``heldout_curves.png``: held-out loss over training on each task (scheduled runs);
* ``memory_vs_loss.png``: optimizer state bytes per parameter against held-out loss, with the
  Pareto front (no other optimizer is both smaller and better);
* ``gap_vs_loss.png``: train-to-held-out gap against held-out loss;
* ``speed_vs_loss.png``: diffusion step time and LoRA-bag step time against held-out loss (the
  timings of this run);
* ``samples.png``: training images, then images sampled from each optimizer's diffusion model
  (same noise), upscaled with nearest-neighbour so every pixel stays visible.

Every entry keeps its colour and marker in every plot and every run: they come from its name
(:func:`style_of`), not from its position in the run. The scatter plots draw the seed noise: a
band above the best held-out loss (values inside it are within seed noise of the best) and
error bars of half the seed-to-seed difference on every point. Legends sit outside the axes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_all", "pareto_front", "style_of"]

# 20 + 20 distinguishable colours (matplotlib's tab20 and tab20b), as hex so no import is needed
_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5", "#393b79", "#5254a3", "#6b6ecf", "#9c9ede",
    "#637939", "#8ca252", "#b5cf6b", "#cedb9c", "#8c6d31", "#bd9e39", "#e7ba52", "#e7cb94",
    "#843c39", "#ad494a", "#d6616b", "#e7969c", "#7b4173", "#a55194", "#ce6dbd", "#de9ed6",
]
_MARKERS = "os^vD<>pPX*h"


def style_of(name: str) -> tuple[str, str]:
    """(colour, marker) of an entry: fixed by its name, whatever else is in the run.

    Registry entries take the colour of their position in the registry (new entries are added
    at its end, so existing colours never change); other names a colour from a hash of the
    name (:func:`zlib.crc32`, stable across processes) and the star marker.
    """
    from kaon.battery.registry import ENTRIES

    names = [e.name for e in ENTRIES]
    if name in names:
        i = names.index(name)
        return _PALETTE[i % len(_PALETTE)], _MARKERS[i % len(_MARKERS)]
    return _PALETTE[zlib.crc32(name.encode()) % len(_PALETTE)], "*"


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


def write_all(rows: Sequence[dict[str, Any]], out: Path, *,
              noise: dict[str, float] | None = None,
              speed: Sequence[dict[str, Any]] = (), target: float = math.inf,
              train_images: Any = None, log: Callable[[str], None] = print) -> list[Path]:
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
    written = [
        _curves(plt, rows, out, target),
        _scatter(plt, rows, out, noise, [("bpp", "optimizer state, bytes per parameter", True,
                                          None)], "memory_vs_loss.png",
                 "Memory against held-out loss (Pareto front dashed)", front=True),
        _scatter(plt, rows, out, noise, [("gap", "train-to-held-out gap (diffusion)", False,
                                          "gap")], "gap_vs_loss.png",
                 "Generalization gap against held-out loss"),
    ]
    timed = {s["config"]: s for s in speed}
    speed_rows = [{**r, "ms": timed[r["config"]]["ms"], "lora_ms": timed[r["config"]]["lora_ms"]}
                  for r in rows if r["config"] in timed and math.isfinite(timed[r["config"]]["ms"])]
    if speed_rows:
        written.append(_scatter(
            plt, speed_rows, out, noise,
            [("ms", "diffusion training step, ms (this run)", True, None),
             ("lora_ms", "LoRA-bag step(), ms (this run)", True, None)],
            "speed_vs_loss.png", "Step time against held-out loss (timed together in this run)",
            front=True))
    samples = _samples(plt, rows, out, train_images)
    if samples is not None:
        written.append(samples)
    return written


def _legend(fig, rows) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=style_of(r["name"])[0], marker=style_of(r["name"])[1],
                      linestyle="-", markersize=5, label=r["name"]) for r in rows]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)


def _curves(plt, rows, out: Path, target: float) -> Path:
    panels = [("diffusion (procedural images)", "steps", "trajectory"),
              ("faces (LFW photographs)", "steps", "images_trajectory"),
              ("language model", "lm_steps", "lm_trajectory")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, (title, steps_key, key) in zip(axes, panels):
        for row in rows:
            values = row.get(key) or []
            steps = row.get(steps_key) or row.get("steps") or []
            if values and len(values) == len(steps):
                colour, marker = style_of(row["name"])
                ax.plot(steps, values, marker=marker, markersize=3, lw=1, color=colour)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
    if math.isfinite(target):
        axes[0].axhline(target, color="k", lw=0.8, ls=":")
        axes[0].annotate("T", (0.01, target), xycoords=("axes fraction", "data"), fontsize=8,
                         va="bottom")
    # the late part of training is where optimizers differ: zoom to the last 60 % of the curves
    for ax, (_, steps_key, key) in zip(axes, panels):
        tails = [v for r in rows for s, v in zip(r.get(steps_key) or r.get("steps") or [],
                                                  r.get(key) or []) if math.isfinite(v)
                 and s >= 0.4 * max(r.get(steps_key) or r.get("steps") or [1])]
        if tails:
            low, high = min(tails), max(tails)
            pad = 0.05 * (high - low or abs(high) or 1.0)
            ax.set_ylim(low - pad, high + pad)
    fig.suptitle("Held-out loss during training (scheduled runs; lower is better; "
                 "y axis zoomed to the last 60 % of training)")
    fig.tight_layout()
    _legend(fig, rows)
    path = out / "heldout_curves.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _scatter(plt, rows, out: Path, noise, panels, name: str, title: str,
             front: bool = False) -> Path:
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    half_te = noise["te"] / 2 if noise else 0.0
    best = min(r["te"] for r in rows)
    for ax, (key, label, log_x, x_noise) in zip(axes[0], panels):
        points = [(r[key], r["te"]) for r in rows]
        xs = [max(p[0], 1e-3) if log_x else p[0] for p in points]
        half_x = noise[x_noise] / 2 if noise and x_noise else 0.0
        if noise:
            ax.axhspan(best, best + noise["te"], color="0.85", zorder=0,
                       label="within seed noise of the best held-out loss")
        for x, row in zip(xs, rows):
            colour, marker = style_of(row["name"])
            ax.errorbar(x, row["te"], yerr=half_te or None, xerr=half_x or None, fmt=marker,
                        color=colour, ms=6, capsize=2, lw=0.8)
            ax.annotate(row["name"], (x, row["te"]), fontsize=6.5, xytext=(4, 3),
                        textcoords="offset points", color="0.25")
        if log_x:
            ax.set_xscale("log")
        if front:
            idx = pareto_front(points)
            ax.plot([xs[i] for i in idx], [points[i][1] for i in idx], "r--", lw=1,
                    label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (diffusion)")
        ax.grid(alpha=0.3)
        if noise or front:
            ax.legend(fontsize=7, loc="upper right")
    if noise:
        title += (f"\nerror bars: +-half the seed-to-seed difference (held-out "
                  f"{noise['te']:.4f}, gap {noise['gap']:.4f})")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _legend(fig, rows)
    path = out / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _samples(plt, rows, out: Path, train_images: Any) -> Path | None:
    with_samples = [r for r in rows if r.get("samples")]
    if not with_samples:
        return None
    lines: list[tuple[str, list[list[list[float]]]]] = []
    if train_images is not None:
        lines.append(("training images", [img[0].tolist() for img in train_images]))
    for row in with_samples:
        size = row["sample_size"]
        lines.append((row["name"], [[pixels[k * size:(k + 1) * size] for k in range(size)]
                                    for pixels in row["samples"]]))
    # one mosaic in one image (one axes, not one per image: a grid of a hundred axes costs
    # seconds to lay out and draw); a 2-pixel gap separates the images
    import numpy as np

    count = max(len(images) for _, images in lines)
    size = max(len(images[0]) for _, images in lines if images)
    gap = 2
    stride = size + gap
    mosaic = np.full((len(lines) * stride - gap, count * stride - gap), np.nan)
    for i, (_, images) in enumerate(lines):
        for j, image in enumerate(images):
            pixels = np.asarray(image, dtype=float)
            h, w = pixels.shape
            mosaic[i * stride:i * stride + h, j * stride:j * stride + w] = pixels
    cell = 0.95  # inches per image: 16 px at 110 dpi become about 100 px (nearest-neighbour)
    fig, ax = plt.subplots(figsize=(cell * count + 1.8, cell * len(lines) + 0.6))
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=-2.5, vmax=2.5, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([i * stride + (size - 1) / 2 for i in range(len(lines))])
    ax.set_yticklabels([label for label, _ in lines], fontsize=8)
    ax.tick_params(axis="y", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if train_images is not None:
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((-1, -1), count * stride - gap + 1, size + 1, fill=False,
                               edgecolor="tab:blue", linewidth=2, clip_on=False))
    fig.suptitle("Top: training images (the model may memorize these). Below: DDIM samples "
                 "from each optimizer's diffusion model, same noise", fontsize=9)
    fig.tight_layout()
    path = out / "samples.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
