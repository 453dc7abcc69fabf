"""``kaon bench``: optimizer state and step time against ``torch.optim.AdamW``, same run.

Each suite is a list of parameter shapes with fixed random gradients; only the optimizer step is
timed (no forward or backward pass). Every configuration steps the same parameters: ``warmup``
steps, then ``steps`` timed steps, and the median is reported with its ratio to
``torch.optim.AdamW(foreach=True)`` measured in the same run.

Suites: ``llm`` (a stack of transformer linear layers, about 56M parameters), ``sdxl`` (conv and
linear shapes of an SDXL-like UNet), ``lora`` (a LoRA bag of 1,434 rank-8 tensors over SDXL
attention dimensions), and the shapes of a user's model read from a ``.safetensors`` header.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kaon import registry

__all__ = [
    "Config",
    "Row",
    "suite_shapes",
    "read_safetensors_shapes",
    "lora_shapes_for",
    "optimizer_state_bytes",
    "run_suite",
    "default_configs",
    "format_table",
]

Shape = tuple[int, ...]


@dataclass
class Config:
    """One optimizer configuration: a label and ``registry`` name plus arguments."""

    label: str
    name: str
    args: dict[str, Any]

    def make(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return registry.create(self.name, params, self.args)


@dataclass
class Row:
    suite: str
    label: str
    params: int
    tensors: int
    state_bytes_per_param: float
    median_ms: float
    ratio_vs_adamw: float | None = None


# ------------------------------------------------------------------------------------ suites
def _llm_shapes(quick: bool) -> list[Shape]:
    width, blocks, vocab = (256, 4, 4096) if quick else (768, 7, 8192)
    shapes: list[Shape] = [(vocab, width)]
    for _ in range(blocks):
        shapes += [(width, width)] * 4  # q, k, v, o
        shapes += [(4 * width, width), (width, 4 * width)]  # mlp up, down
        shapes += [(width,)] * 4  # two norms, weight and bias
    return shapes


def _sdxl_shapes(quick: bool) -> list[Shape]:
    shapes: list[Shape] = [(320, 4, 3, 3), (1280, 320), (1280, 1280)]
    levels = [(320, 2, 0), (640, 2, 2), (1280, 2, 4)] if not quick else [(320, 1, 0), (640, 1, 1)]
    previous = 320
    for width, resnets, transformer_depth in levels:
        for index in range(resnets):
            source = previous if index == 0 else width
            shapes += [(width,), (width,), (width, source, 3, 3), (width, 1280), (width, width, 3, 3)]
            if source != width:
                shapes.append((width, source, 1, 1))
        for _ in range(transformer_depth):
            shapes += [(width, width)] * 4  # self-attention q, k, v, out
            shapes += [(width, width), (width, 2048), (width, 2048), (width, width)]  # cross
            shapes += [(8 * width, width), (width, 4 * width)]  # geglu feed-forward
            shapes += [(width,)] * 6
        previous = width
    return shapes


def _lora_shapes() -> list[Shape]:
    # (fan_in, fan_out) of SDXL attention projections; A is (rank, fan_in), B is (fan_out, rank)
    layers = [(640, 640), (640, 640), (640, 640), (640, 640), (2048, 640), (2048, 640),
              (1280, 1280), (1280, 1280), (1280, 1280), (1280, 1280), (2048, 1280), (2048, 1280),
              (320, 320), (768, 320)]
    shapes: list[Shape] = []
    for i in range(717):
        fan_in, fan_out = layers[i % len(layers)]
        shapes += [(8, fan_in), (fan_out, 8)]
    return shapes


def lora_shapes_for(shapes: Iterable[Shape], rank: int) -> list[Shape]:
    """LoRA pairs ``(rank, numel / out)`` and ``(out, rank)`` for every weight of ndim >= 2."""
    pairs: list[Shape] = []
    for shape in shapes:
        if len(shape) >= 2:
            pairs += [(rank, math.prod(shape[1:])), (shape[0], rank)]
    return pairs


def read_safetensors_shapes(path: str | Path, prefix: str = "") -> dict[str, Shape]:
    """Tensor shapes from a ``.safetensors`` header, without reading any weights.

    The file starts with an 8-byte little-endian header length and a JSON header that maps each
    tensor name to its dtype, shape and data offsets.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > 100 * 1024 * 1024:
                raise ValueError(f"{path}: header length {length} is implausible")
            raw = handle.read(length)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if len(raw) < length:
        raise ValueError(f"{path}: header truncated ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: header is not valid JSON ({error})") from None
    shapes: dict[str, Shape] = {}
    for name, entry in header.items():
        if name == "__metadata__" or not name.startswith(prefix):
            continue
        if not isinstance(entry, dict) or "shape" not in entry:
            raise ValueError(f"{path}: entry {name!r} has no shape")
        shapes[name] = tuple(int(s) for s in entry["shape"])
    return shapes


def suite_shapes(suite: str, quick: bool = False, *, prefix: str = "",
                 lora_rank: int | None = None) -> list[Shape]:
    """Shapes of a named suite, or of ``safetensors:PATH``."""
    if suite == "llm":
        return _llm_shapes(quick)
    if suite == "sdxl":
        return _sdxl_shapes(quick)
    if suite == "lora":
        return _lora_shapes()
    if suite.startswith("safetensors:"):
        shapes = [s for s in read_safetensors_shapes(suite.partition(":")[2], prefix).values() if s]
        return lora_shapes_for(shapes, lora_rank) if lora_rank else shapes
    raise ValueError(f"unknown suite {suite!r}; use llm, sdxl, lora or safetensors:PATH")


# ----------------------------------------------------------------------------- measurement
def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in an optimizer's state (works for any torch optimizer)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_config(config: Config, params: list[torch.Tensor], steps: int, warmup: int,
                 device: torch.device) -> tuple[float, int]:
    optimizer = config.make(params)
    for _ in range(warmup):
        optimizer.step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    state = optimizer_state_bytes(optimizer)
    del optimizer
    gc.collect()
    return statistics.median(times) * 1e3, state


def run_suite(suite: str, shapes: Sequence[Shape], configs: Sequence[Config], *, steps: int = 20,
              warmup: int = 5, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Row]:
    """Time every configuration on the same parameters; ratios are against the AdamW row."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device, dtype))
        p.grad = torch.randn(shape, generator=generator).to(device, dtype)
        params.append(p)
    count = sum(p.numel() for p in params)
    rows = []
    for config in configs:
        median, state = _time_config(config, params, steps, warmup, device)
        rows.append(Row(suite, config.label, count, len(params), state / count, median))
    baseline = next((r.median_ms for r in rows if r.label == BASELINE), None)
    for row in rows:
        row.ratio_vs_adamw = row.median_ms / baseline if baseline else None
    return rows


BASELINE = "torch AdamW foreach"
LOOP = "Adakaon int8 foreach=False"


def default_configs(suite: str, device: torch.device) -> list[Config]:
    """torch AdamW (foreach, fused) and the Adakaon memory dial; the LoRA suite adds the loop."""
    configs = [
        Config(BASELINE, "AdamW", {"lr": 1e-4, "foreach": True}),
        Config("torch AdamW fused", "AdamW", {"lr": 1e-4, "fused": True}),
        Config("Adakaon no momentum", "Adakaon", {"lr": 1e-4, "betas": (0.0, 0.999)}),
        Config("Adakaon 4bit", "Adakaon", {"lr": 1e-4, "momentum_dtype": "4bit"}),
        Config("Adakaon int8", "Adakaon", {"lr": 1e-4, "momentum_dtype": "int8"}),
        Config("Adakaon bfloat16", "Adakaon", {"lr": 1e-4, "momentum_dtype": "bfloat16"}),
    ]
    if suite == "lora":
        configs.append(Config(LOOP, "Adakaon",
                              {"lr": 1e-4, "momentum_dtype": "int8", "foreach": False}))
    return configs


def fused_adamw_supported(device: torch.device, dtype: torch.dtype) -> bool:
    probe = torch.nn.Parameter(torch.zeros(4, device=device, dtype=dtype))
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.AdamW([probe], fused=True).step()
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table of one suite's rows."""
    header = f"{'config':30s} {'params':>12s} {'state B/param':>14s} {'step ms':>10s} {'x AdamW':>8s}"
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = f"{row.ratio_vs_adamw:.2f}" if row.ratio_vs_adamw is not None else "-"
        lines.append(f"{row.label:30s} {row.params:>12,d} {row.state_bytes_per_param:>14.3f} "
                     f"{row.median_ms:>10.2f} {ratio:>8s}")
    return "\n".join(lines)


def loop_speedup(rows: Sequence[Row]) -> float | None:
    """How much faster batched int8 Adakaon is than its per-parameter loop, if both ran."""
    batched = next((r.median_ms for r in rows if r.label == "Adakaon int8"), None)
    loop = next((r.median_ms for r in rows if r.label == LOOP), None)
    return loop / batched if batched and loop else None


def run(suites: Sequence[str], *, configs: Sequence[Config] | None = None, quick: bool = False,
        steps: int = 20, warmup: int = 5, device: str | None = None, dtype: str = "float32",
        prefix: str = "", lora_rank: int | None = None,
        out: Callable[[str], None] = print) -> list[Row]:
    """Run suites, print a table per suite and return every row."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out(f"kaon bench: device {target}, dtype {dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, {warmup} warmup + {steps} timed steps (median)")
    all_rows: list[Row] = []
    for suite in suites:
        shapes = suite_shapes(suite, quick, prefix=prefix, lora_rank=lora_rank)
        chosen = list(configs) if configs else default_configs(suite, target)
        if configs and not any(c.label == BASELINE for c in chosen):
            chosen.insert(0, default_configs(suite, target)[0])
        if not fused_adamw_supported(target, torch_dtype):
            chosen = [c for c in chosen if not c.args.get("fused")]
        rows = run_suite(suite, shapes, chosen, steps=steps, warmup=warmup, device=target,
                         dtype=torch_dtype)
        out(f"\n[{suite}] {len(shapes)} tensors, {rows[0].params:,d} parameters")
        out(format_table(rows))
        speedup = loop_speedup(rows)
        if speedup is not None:
            out(f"batched vs per-parameter loop: {speedup:.1f}x faster")
        all_rows += rows
    return all_rows


def write_json(rows: Sequence[Row], path: str | Path) -> None:
    Path(path).write_text(json.dumps([asdict(r) for r in rows], indent=2))
