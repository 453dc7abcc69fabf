"""``kaon bench``: optimizer state and step time against ``torch.optim.AdamW``, in the same run.

Each suite is a list of parameter shapes. The parameters get fixed random gradients (seeded) and
only ``optimizer.step()`` is timed: no forward or backward pass, and the gradients do not change
between steps. Every configuration starts from the same parameter values, runs ``warmup``
untimed steps, then ``steps`` steps each timed with ``time.perf_counter`` (after a
``torch.cuda.synchronize`` on CUDA); the median is reported with its ratio to
``torch.optim.AdamW(foreach=True)`` measured in the same run. ``torch.optim.AdamW(fused=True)``
is measured too when torch supports it for the device and dtype.

Every row also reports the bytes a step must move (each parameter read and written, each
gradient read, each state tensor read and written: ``2 P + G + 2 S``) and, on CUDA, the
bandwidth that implies at the median step time as a fraction of the device's peak memory
bandwidth (from its memory clock and bus width, a table of known devices, or ``peak_gbps``).
On CUDA the default rows add kaon's Triton kernels (``fused="triton"``: Adakaon and Lion with int8
momentum) and the 8-bit / 4-bit AdamW of bitsandbytes and torchao when they are installed
(:func:`kernel_configs`; ``kaon bench --kernels`` adds them on any device, where rows that
cannot run there are skipped with a note).

Suites (see :func:`suite_shapes`):

``llm``
    A transformer stack: 7 blocks of d_model 768 (q, k, v, o ``768x768``, MLP ``3072x768`` and
    ``768x3072``, two LayerNorms) and an ``8192x768`` embedding: 55,858,176 parameters in 71
    tensors. ``quick``: d_model 256, 4 blocks, 4096x256 embedding (4.2M).
``sdxl``
    Representative SDXL UNet shapes: conv kernels ``[320,320,3,3]``, ``[640,320,3,3]``,
    ``[640,640,3,3]``, ``[1280,1280,3,3]``, attention ``[640,640]``, ``[1280,1280]``, cross-attention
    k/v ``[640,2048]``, ``[1280,2048]``, GEGLU feed-forward ``[5120,640]`` / ``[640,2560]``, group
    and layer norms (53,164,800 parameters in 57 tensors). ``quick``: the same layout at width 96
    with a 768-wide context (5.0M).
``lora``
    A rank-8 LoRA of SDXL's UNet: for the Linear layers of its transformer blocks (q, k, v, out
    of self- and cross-attention, feed-forward in and out, proj_in/proj_out), an ``A = (8,
    fan_in)`` and ``B = (fan_out, 8)`` pair each; the first 717 of those 722 layers, so exactly
    1,434 tensors (about 21M parameters). ``quick``: the first 128 pairs (256 tensors, 3.4M
    parameters, both widths 640 and 1280), enough for the batched-vs-loop ratio.
``safetensors:PATH``
    The shapes of a model read from a ``.safetensors`` header (no weights are read); optionally
    only names starting with a prefix, or rank-``R`` LoRA pairs synthesized for its weights.
"""

from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kaon import registry
from kaon.optimizer import KaonOptimizer

__all__ = [
    "BASELINE",
    "FUSED",
    "LOOP",
    "SUITES",
    "Config",
    "Row",
    "adafactor8bit_configs",
    "baseline_configs",
    "check_configs",
    "default_configs",
    "format_table",
    "kernel_configs",
    "peak_bandwidth",
    "step_bytes",
    "lora_shapes_for",
    "loop_speedup",
    "optimizer_state_bytes",
    "parse_config",
    "read_safetensors_shapes",
    "run",
    "run_suite",
    "suite_shapes",
    "write_json",
]

Shape = tuple[int, ...]

SUITES = ("llm", "sdxl", "lora")
BASELINE = "torch AdamW foreach"
FUSED = "torch AdamW fused"
BATCHED = "Adakaon int8"
LOOP = "Adakaon int8 foreach=False"
LR = 1e-4
LORA_RANK = 8
LORA_PAIRS = 717
QUICK_LORA_PAIRS = 128
_MAX_HEADER = 100 * 1024 * 1024
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Config:
    """One row of a table: a label, a :mod:`kaon.registry` name and keyword arguments.

    ``optional`` rows are skipped, with a note, when the optimizer cannot be created or stepped
    on the device and dtype (``torch.optim.AdamW(fused=True)`` on an old torch, say).
    """

    label: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    optional: bool = False

    def make(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """Create the optimizer over ``params``."""
        return registry.create(self.name, params, self.args)


@dataclass
class Row:
    """One measured configuration of one suite (the JSON written by ``--json`` is a list of
    these).

    ``state_bytes`` counts every tensor in ``optimizer.state``; ``scratch_bytes`` is kaon's
    reusable CPU work memory kept between steps (not optimizer state, 0 for torch optimizers).
    """

    suite: str
    label: str
    optimizer: str
    args: dict[str, Any]
    params: int
    tensors: int
    state_bytes: int
    state_bytes_per_param: float
    scratch_bytes: int
    median_ms: float
    min_ms: float
    ratio_vs_adamw: float | None
    steps: int
    warmup: int
    device: str
    dtype: str
    threads: int
    torch: str
    moved_bytes: int = 0
    achieved_gbps: float = 0.0
    bandwidth_fraction: float | None = None
    ratio_vs_fused: float | None = None
    first_step_ms: float = 0.0


# ------------------------------------------------------------------------------------ suites
def _llm_shapes(quick: bool) -> list[Shape]:
    width, blocks, vocab = (256, 4, 4096) if quick else (768, 7, 8192)
    shapes: list[Shape] = [(vocab, width)]  # token embedding
    for _ in range(blocks):
        shapes += [(width, width)] * 4  # attention q, k, v, o
        shapes += [(4 * width, width), (width, 4 * width)]  # MLP up, down
        shapes += [(width,)] * 4  # two LayerNorms: weight, bias
    return shapes


def _norm(width: int) -> list[Shape]:
    return [(width,), (width,)]  # weight, bias


def _sdxl_shapes(quick: bool) -> list[Shape]:
    c, context = (96, 768) if quick else (320, 2048)  # base width, cross-attention context
    c2, c4, time_dim = 2 * c, 4 * c, 4 * c
    shapes: list[Shape] = [(c, 4, 3, 3), (time_dim, c), (time_dim, time_dim)]  # conv_in, time MLP
    # resnet at c: two group norms, two 3x3 convs, the time projection
    shapes += _norm(c) + [(c, c, 3, 3)] + _norm(c) + [(c, c, 3, 3), (c, time_dim)]
    # resnet c -> 2c with a 1x1 skip conv
    shapes += _norm(c) + [(c2, c, 3, 3)] + _norm(c2) + [(c2, c2, 3, 3), (c2, time_dim)]
    shapes += [(c2, c, 1, 1)]
    # transformer block at 2c: group norm, proj_in, self- and cross-attention, GEGLU, proj_out
    shapes += _norm(c2) + [(c2, c2)]
    shapes += _norm(c2) + [(c2, c2)] * 4
    shapes += _norm(c2) + [(c2, c2), (c2, context), (c2, context), (c2, c2)]
    shapes += _norm(c2) + [(8 * c2, c2), (c2, 4 * c2)]
    shapes += [(c2, c2)]
    # at 4c: one 3x3 conv with its time projection, self- and cross-attention (no feed-forward)
    shapes += _norm(c4) + [(c4, c4, 3, 3), (c4, time_dim)]
    shapes += _norm(c4) + [(c4, c4)] * 4
    shapes += _norm(c4) + [(c4, c4), (c4, context), (c4, context), (c4, c4)]
    shapes += _norm(c) + [(4, c, 3, 3)]  # output norm, conv_out
    return shapes


def _sdxl_lora_layers() -> list[tuple[int, int]]:
    """``(fan_in, fan_out)`` of the Linear layers in SDXL's UNet transformer blocks, in order."""
    context = 2048
    # (width, transformer depth) of the 11 transformer stages: down 640 x2, down 1280 x2, mid,
    # up 1280 x3, up 640 x3
    stages = [(640, 2)] * 2 + [(1280, 10)] * 3 + [(1280, 10)] * 3 + [(640, 2)] * 3
    layers: list[tuple[int, int]] = []
    for width, depth in stages:
        layers.append((width, width))  # proj_in
        for _ in range(depth):
            layers += [(width, width)] * 4  # self-attention q, k, v, out
            layers += [(width, width), (context, width), (context, width), (width, width)]
            layers += [(width, 8 * width), (4 * width, width)]  # GEGLU in, feed-forward out
        layers.append((width, width))  # proj_out
    return layers


def _lora_shapes(rank: int = LORA_RANK, pairs: int = LORA_PAIRS) -> list[Shape]:
    shapes: list[Shape] = []
    for fan_in, fan_out in _sdxl_lora_layers()[:pairs]:
        shapes += [(rank, fan_in), (fan_out, rank)]  # A (down), B (up)
    return shapes


def lora_shapes_for(shapes: Iterable[Shape], rank: int) -> list[Shape]:
    """LoRA pairs for every weight of ndim >= 2: ``A = (rank, numel / out)``, ``B = (out, rank)``.

    ``out`` is ``shape[0]``; a conv kernel ``[out, in, kh, kw]`` gets ``A = (rank, in*kh*kw)``.
    1-D and 0-D shapes (norms, biases) get no pair.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1; got {rank}")
    pairs: list[Shape] = []
    for shape in shapes:
        if len(shape) >= 2 and math.prod(shape) > 0:
            pairs += [(rank, math.prod(shape[1:])), (shape[0], rank)]
    return pairs


def read_safetensors_shapes(path: str | Path, prefix: str = "") -> dict[str, Shape]:
    """Tensor shapes from a ``.safetensors`` header, without reading any weights.

    The file starts with an 8-byte little-endian unsigned header length ``N`` and ``N`` bytes of
    JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets"}``; the optional
    ``"__metadata__"`` entry is skipped. With ``prefix``, only names starting with it are kept.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is too
    short, truncated or whose header is not valid safetensors JSON.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a .safetensors file")
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError(
                    f"{path}: too short to be a safetensors file ({len(head)} bytes; the "
                    "8-byte header length is missing)"
                )
            (length,) = struct.unpack("<Q", head)
            if length < 2 or length > _MAX_HEADER:
                raise ValueError(
                    f"{path}: header length {length} is implausible (not a safetensors file?)"
                )
            raw = handle.read(length)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if len(raw) < length:
        raise ValueError(f"{path}: header truncated ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is a JSON {type(header).__name__}, not an object")
    shapes: dict[str, Shape] = {}
    for name, entry in header.items():
        if name == "__metadata__" or not name.startswith(prefix):
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise ValueError(f"{path}: entry {name!r} has no valid shape ({entry!r:.80})")
        shapes[name] = tuple(shape)
    return shapes


def suite_shapes(suite: str, quick: bool = False, *, prefix: str = "",
                 lora_rank: int | None = None) -> list[Shape]:
    """Parameter shapes of a named suite (``llm``, ``sdxl``, ``lora``) or of
    ``safetensors:PATH`` (empty tensors and scalars left out; ``prefix`` filters names and
    ``lora_rank`` turns the weights into LoRA pairs)."""
    if suite == "llm":
        return _llm_shapes(quick)
    if suite == "sdxl":
        return _sdxl_shapes(quick)
    if suite == "lora":
        return _lora_shapes(pairs=QUICK_LORA_PAIRS) if quick else _lora_shapes()
    if suite.startswith("safetensors:"):
        path = suite.partition(":")[2]
        found = read_safetensors_shapes(path, prefix)
        shapes = [s for s in found.values() if s and math.prod(s) > 0]
        if lora_rank:
            shapes = lora_shapes_for(shapes, lora_rank)
        if not shapes:
            where = f" starting with {prefix!r}" if prefix else ""
            raise ValueError(f"{path}: no tensors{where} to benchmark")
        return shapes
    raise ValueError(f"unknown suite {suite!r}; use llm, sdxl, lora or safetensors:PATH")


# ----------------------------------------------------------------------------- measurement
def _tensor_bytes(value: Any, seen: set[tuple]) -> int:
    if isinstance(value, torch.Tensor):
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), value.dtype,
               tuple(value.shape), value.stride())
        if key in seen:  # the same memory reached twice
            return 0
        seen.add(key)
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in value)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state``, for any torch optimizer.

    Tensors nested in lists, tuples and dicts count; a tensor reached twice counts once.
    """
    seen: set[tuple] = set()
    return sum(_tensor_bytes(state, seen) for state in optimizer.state.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# peak memory bandwidth (GB/s) of common devices, for when the properties lack the memory clock
_PEAK_GBPS = {
    "H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0, "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0,
    "A100-SXM4-40GB": 1555.0, "A100-PCIE-40GB": 1555.0, "L40S": 864.0, "L4": 300.0,
    "RTX 4090": 1008.0, "RTX 4080": 716.8, "RTX 3090": 936.0, "A10G": 600.0, "T4": 320.0,
}


def peak_bandwidth(device: torch.device) -> float | None:
    """Peak memory bandwidth of a CUDA device in bytes/s (None on CPU or when unknown).

    From the device properties (``2 x memory clock x bus width``, double data rate) when torch
    reports them, else from a table of device names.
    """
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8.0
    name = props.name
    for key, gbps in sorted(_PEAK_GBPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return gbps * 1e9
    return None


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 7) -> float:
    """The machine's measured copy bandwidth in bytes/s: the median of ``repeats`` copies of a
    ``mib`` MiB fp32 buffer into another (each moves ``2 x mib`` MiB: one read, one write), with
    the current thread count. The physical limit every row's traffic is measured against."""
    numel = mib * 2**20 // 4
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * numel * 4 / statistics.median(times)


def step_bytes(params: Sequence[torch.Tensor], state_bytes: int) -> int:
    """The bytes one step must move: every parameter read and written, every gradient read,
    every state tensor read and written (``2 P + G + 2 S``). A kernel that reads something twice
    moves more; this is the floor the bandwidth fraction is measured against."""
    total = 2 * state_bytes
    for p in params:
        total += 2 * p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
    return total


def make_params(shapes: Sequence[Shape], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters of the given shapes (N(0, 0.02^2)) with fixed N(0, 1) gradients, as every
    benchmark row uses them."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device, dtype))
        p.grad = torch.randn(shape, generator=generator).to(device, dtype)
        params.append(p)
    return params


def _measure(config: Config, params: list[torch.nn.Parameter], steps: int, warmup: int,
             device: torch.device) -> tuple[list[float], int, int, float]:
    """Step times (s), state bytes, held scratch bytes and the first step's time (s) of one
    configuration (the first step is one of the ``warmup`` steps, never timed with them)."""
    optimizer = config.make(params)
    try:
        start = time.perf_counter()
        optimizer.step()  # the first step: state creation and, on the fused path, compiling
        _sync(device)
        first = time.perf_counter() - start
        for _ in range(max(0, warmup - 1)):
            optimizer.step()
        _sync(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            optimizer.step()
            _sync(device)
            times.append(time.perf_counter() - start)
        state = optimizer_state_bytes(optimizer)
        scratch = 0
        if isinstance(optimizer, KaonOptimizer):
            if optimizer.state_bytes() != state:
                raise RuntimeError(
                    f"{config.label}: state_bytes() reports {optimizer.state_bytes()} bytes, "
                    f"the tensors in optimizer.state hold {state}"
                )
            scratch = optimizer.workspace_bytes()
        return times, state, scratch, first
    finally:
        del optimizer  # free the state before the next configuration
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_suite(suite: str, shapes: Sequence[Shape], configs: Sequence[Config], *,
              steps: int = 20, warmup: int = 5, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, seed: int = 0,
              notes: list[str] | None = None, peak_gbps: float | None = None) -> list[Row]:
    """Measure every configuration on the same parameters and gradients.

    Each configuration starts from the same parameter values. Ratios are against the
    ``torch AdamW foreach`` row when there is one (else ``None``). A skipped optional
    configuration adds a line to ``notes`` (when given).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0; got {steps} and {warmup}")
    if not shapes:
        raise ValueError(f"suite {suite!r} has no tensors")
    device = torch.device(device)
    params = make_params(shapes, device, dtype, seed)
    initial = [p.detach().clone() for p in params]
    count = sum(p.numel() for p in params)
    rows: list[Row] = []
    for config in configs:
        with torch.no_grad():
            for p, start in zip(params, initial):
                p.copy_(start)
        try:
            times, state, scratch, first = _measure(config, params, steps, warmup, device)
        except (RuntimeError, TypeError, ValueError, ImportError, NotImplementedError) as error:
            if not config.optional:
                raise
            if notes is not None:
                notes.append(f"{config.label}: skipped ({type(error).__name__}: {error})")
            continue
        rows.append(Row(
            suite=suite, label=config.label, optimizer=config.name, args=dict(config.args),
            params=count, tensors=len(params), state_bytes=state,
            state_bytes_per_param=state / count, scratch_bytes=scratch,
            median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3,
            ratio_vs_adamw=None, steps=steps, warmup=warmup, device=str(device),
            dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(),
            torch=torch.__version__, first_step_ms=first * 1e3,
        ))
        row = rows[-1]
        row.moved_bytes = step_bytes(params, state)
        row.achieved_gbps = row.moved_bytes / (row.median_ms * 1e-3) / 1e9
        peak = peak_gbps * 1e9 if peak_gbps else peak_bandwidth(device)
        if peak:
            row.bandwidth_fraction = row.achieved_gbps * 1e9 / peak
    baseline = next((r.median_ms for r in rows if r.label == BASELINE), None)
    fused_ms = next((r.median_ms for r in rows if r.label == FUSED), None)
    for row in rows:
        row.ratio_vs_adamw = row.median_ms / baseline if baseline else None
        row.ratio_vs_fused = row.median_ms / fused_ms if fused_ms else None
    return rows


# ------------------------------------------------------------------------------ configurations
def baseline_configs() -> list[Config]:
    """``torch.optim.AdamW`` with ``foreach=True`` (the ratio baseline) and ``fused=True``."""
    return [
        Config(BASELINE, "torch.optim.AdamW", {"lr": LR, "foreach": True}),
        Config(FUSED, "torch.optim.AdamW", {"lr": LR, "fused": "triton"}, optional=True),
    ]


def kernel_configs() -> list[Config]:
    """kaon's Triton kernels against the quantized AdamWs of bitsandbytes and torchao.

    Optional rows: a fused row without CUDA or Triton, or a peer that is not installed (or does
    not run on the device), is skipped with a note. ``Lion int8`` is the reference path of the
    fused Lion row; ``kaon AdamW int8`` runs kaon's AdamW kernel on CUDA with Triton (its
    reference rule elsewhere), the counterpart of the 8-bit peers.
    """
    return [
        Config("Adakaon int8 fused", "Adakaon", {"lr": LR, "momentum_dtype": "int8",
                                                 "fused": "triton"}, optional=True),
        Config("Adakaon 4bit fused", "Adakaon", {"lr": LR, "momentum_dtype": "4bit",
                                                 "fused": "triton"}, optional=True),
        Config("Lion int8 fused", "Lion", {"lr": LR, "momentum_dtype": "int8", "fused": "triton"},
               optional=True),
        Config("Lion int8", "Lion", {"lr": LR, "momentum_dtype": "int8", "fused": False}),
        Config("kaon AdamW int8", "AdamW", {"lr": LR, "state_dtype": "int8"}),
        Config("bitsandbytes AdamW8bit", "bitsandbytes.optim.AdamW8bit", {"lr": LR},
               optional=True),
        Config("torchao AdamW8bit", "torchao.optim.AdamW8bit", {"lr": LR}, optional=True),
        Config("torchao AdamW4bit", "torchao.optim.AdamW4bit", {"lr": LR}, optional=True),
    ]


def default_configs(suite: str, device: torch.device | str | None = None) -> list[Config]:
    """The baselines and Adakaon's memory dial, then Adafactor8Bit's (not on ``lora``); the
    ``lora`` suite adds the per-parameter loop; on CUDA the kernel rows (:func:`kernel_configs`)
    follow."""
    configs = baseline_configs() + [
        Config("Adakaon no momentum (beta1=0)", "Adakaon", {"lr": LR, "betas": (0.0, 0.999)}),
        Config("Adakaon 4bit", "Adakaon", {"lr": LR, "momentum_dtype": "4bit"}),
        Config(BATCHED, "Adakaon", {"lr": LR, "momentum_dtype": "int8"}),
        Config("Adakaon bfloat16", "Adakaon", {"lr": LR, "momentum_dtype": "bfloat16"}),
    ]
    if suite != "lora":
        configs += adafactor8bit_configs()
    if suite == "lora":
        configs.append(Config(LOOP, "Adakaon",
                              {"lr": LR, "momentum_dtype": "int8", "foreach": False}))
    if device is not None and torch.device(device).type == "cuda":
        configs += kernel_configs()
    return configs


def adafactor8bit_configs() -> list[Config]:
    """Adafactor8Bit's memory dial: factored log-space 8-bit, no momentum (the lean default);
    with 4-bit momentum; APOLLO rank 16 with 4-bit momentum."""
    lean = {"lr": LR, "relative_step": False}
    return [
        Config("Adafactor8Bit 8bit factored, no momentum", "Adafactor8Bit", lean),
        Config("Adafactor8Bit 8bit + 4bit momentum", "Adafactor8Bit", {**lean, "beta1": 0.9}),
        Config("Adafactor8Bit APOLLO r16 + 4bit momentum", "Adafactor8Bit",
               {**lean, "beta1": 0.9, "beta2": 0.999, "apollo_rank": 16}),
    ]


def parse_config(text: str) -> Config:
    """``"NAME"`` or ``"NAME:k=v,..."`` (the ``--config`` form) -> a :class:`Config`.

    ``lr`` defaults to 1e-4 like every other row; the label is the text itself.
    """
    name, _, args = text.partition(":")
    if not name.strip():
        raise ValueError(f"--config {text!r}: the optimizer name is missing")
    registry.get(name)  # fail early on unknown names
    return Config(text.strip(), name.strip(), {"lr": LR, **registry.parse_kwargs(args)})


# ----------------------------------------------------------------------------------- output
def format_table(rows: Sequence[Row], notes: Sequence[str] = ()) -> str:
    """A plain-text table of one suite's rows, followed by ``notes``."""
    columns = ("config", "params", "state B/param", "scratch MiB", "median step ms",
               "vs AdamW foreach", "vs AdamW fused", "MB moved", "GB/s", "of limit",
               "first step s")
    width = max([len(columns[0]), *(len(r.label) for r in rows)])
    header = (f"{columns[0]:<{width}s}  {columns[1]:>12s}  {columns[2]:>13s}  "
              f"{columns[3]:>11s}  {columns[4]:>14s}  {columns[5]:>16s}  {columns[6]:>14s}  "
              f"{columns[7]:>9s}  {columns[8]:>8s}  {columns[9]:>8s}  {columns[10]:>12s}")
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = f"{row.ratio_vs_adamw:.2f}x" if row.ratio_vs_adamw is not None else "-"
        fused = f"{row.ratio_vs_fused:.2f}x" if row.ratio_vs_fused is not None else "-"
        peak = f"{row.bandwidth_fraction:.0%}" if row.bandwidth_fraction is not None else "-"
        lines.append(
            f"{row.label:<{width}s}  {row.params:>12,d}  {row.state_bytes_per_param:>13.3f}  "
            f"{row.scratch_bytes / 2**20:>11.1f}  {row.median_ms:>14.2f}  {ratio:>16s}  "
            f"{fused:>14s}  {row.moved_bytes / 1e6:>9.1f}  {row.achieved_gbps:>8.1f}  "
            f"{peak:>8s}  {row.first_step_ms / 1e3:>12.2f}"
        )
    lines += list(notes)
    return "\n".join(lines)


def loop_speedup(rows: Sequence[Row]) -> float | None:
    """How many times faster batched int8 Adakaon is than its per-parameter loop (if both ran)."""
    batched = next((r.median_ms for r in rows if r.label == BATCHED), None)
    loop = next((r.median_ms for r in rows if r.label == LOOP), None)
    return loop / batched if batched and loop else None


def check_configs(configs: Iterable[Config], device: torch.device, dtype: torch.dtype) -> None:
    """Create every non-optional configuration over a small probe parameter, so that a bad
    name or argument fails before anything is measured (``TypeError`` or ``ValueError``)."""
    for config in configs:
        if config.optional:
            continue
        probe = torch.nn.Parameter(torch.zeros(4, 4, device=device, dtype=dtype))
        try:
            config.make([probe])
        except (TypeError, ValueError) as error:
            raise type(error)(f"configuration {config.label!r}: {error}") from None


def machine_description(device: torch.device) -> str:
    """The CPU model (Linux: from /proc/cpuinfo) or the CUDA device name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(suites: Sequence[str], *, configs: Sequence[Config] | None = None, quick: bool = False,
        steps: int = 20, warmup: int = 5, device: str | None = None, dtype: str = "float32",
        prefix: str = "", lora_rank: int | None = None, seed: int = 0,
        kernels: bool = False, peak_gbps: float | None = None,
        out: Callable[[str], None] = print) -> list[Row]:
    """Run ``suites``, print a table per suite through ``out`` and return every row.

    ``configs=None`` runs :func:`default_configs`; given configurations run after the two AdamW
    baselines. ``kernels`` adds :func:`kernel_configs` (the default on CUDA). ``device=None`` is
    CUDA when available, else CPU. ``peak_gbps`` overrides the device's peak bandwidth.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    wall, cpu = time.perf_counter(), time.process_time()
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    # resolve every suite's shapes first, so a bad path fails before anything is measured
    plan = [(suite, suite_shapes(suite, quick, prefix=prefix, lora_rank=lora_rank))
            for suite in suites]
    if configs:
        check_configs(configs, target, _DTYPES[dtype])
    threads = f", {torch.get_num_threads()} CPU threads" if target.type == "cpu" else ""
    if peak_gbps is None:
        limit = copy_bandwidth(target)
        peak_gbps = limit / 1e9
        out(f"measured copy bandwidth: {peak_gbps:.1f} GB/s (a 256 MiB copy, median of 7; "
            "'of limit' below is each row's traffic as a fraction of it)")
    out(f"kaon bench: {target} ({machine_description(target)}), {dtype}, torch "
        f"{torch.__version__}{threads}; {warmup} warmup + {steps} timed steps, median; "
        f"lr {LR:g}")
    all_rows: list[Row] = []
    for suite, shapes in plan:
        chosen = (baseline_configs() + list(configs) if configs
                  else default_configs(suite, target))
        if kernels and not any(c.label == kernel_configs()[0].label for c in chosen):
            chosen += kernel_configs()
        notes: list[str] = []
        rows = run_suite(suite, shapes, chosen, steps=steps, warmup=warmup, device=target,
                         dtype=_DTYPES[dtype], seed=seed, notes=notes, peak_gbps=peak_gbps)
        count = sum(math.prod(s) for s in shapes)
        out(f"\n[{suite}] {len(shapes):,d} tensors, {count:,d} parameters")
        out(format_table(rows, notes))
        speedup = loop_speedup(rows)
        if speedup is not None:
            out(f"batched vs per-parameter loop: {speedup:.1f}x faster")
        all_rows += rows
    out("\nMB moved: the bytes a step must move (2 x parameters + gradients + 2 x state); GB/s "
        "and of limit: that traffic at the median step time, and as a fraction of the copy "
        "bandwidth (or --peak-gbps). first step s: the first step (state creation and, on "
        "kaon's fused path, compiling; later processes reuse inductor's on-disk caches).")
    if any(r.scratch_bytes for r in all_rows):
        out("\nscratch MiB: kaon's reusable CPU work buffers, kept between steps; not optimizer "
            "state (release_workspace() frees them).")
    out(f"\nkaon bench: {time.perf_counter() - wall:.1f} s wall, "
        f"{time.process_time() - cpu:.1f} s CPU (this process, all threads)")
    return all_rows


def write_json(rows: Sequence[Row], path: str | Path) -> None:
    """Write ``rows`` to ``path`` as a JSON list of objects (one per row)."""
    Path(path).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
