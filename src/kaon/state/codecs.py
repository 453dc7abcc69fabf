"""State codecs: how one optimizer state tensor is stored between steps.

A codec owns a storage format and nothing else. The engine hands it stored tensors with a leading
batch dimension ``[N, ...]`` and gets back fp32 working tensors ``[N, *shape]``; after the update
rule ran, the codec turns the new fp32 values back into stored tensors. The per-parameter path is
the batch-of-one case, so a batched decode/encode is the per-tensor one by construction: every
reduction a codec does (row absmax, block absmax, block log-range) is confined to one slice.

A slot named ``"m"`` is stored under the state keys ``"m"`` plus ``"m" + suffix`` for each extra
suffix of its codec (``"m_scale"`` for int8/4-bit, ``"m_scale"`` and ``"m_offset"`` for the
log-space codec). Fresh state always decodes to exactly zero.

Bytes per stored element (scale overhead excluded): float32 4, bfloat16 2, int8 1, 4bit 0.5,
log8 1, log4 0.5.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = [
    "Codec",
    "FloatCodec",
    "Int8Codec",
    "FourBitCodec",
    "LogSpace8BitCodec",
    "LogSpace4BitCodec",
    "IntegerCodec",
    "momentum_codec",
    "MOMENTUM_DTYPES",
]

MOMENTUM_DTYPES = ("float32", "bfloat16", "int8", "4bit")

_TINY_ABSMAX = 1e-12


class Codec(ABC):
    """A storage format for one state slot.

    ``suffixes`` lists the state keys a slot uses besides its own name (``""`` is the main
    tensor). ``key`` identifies the format for bucketing: two slots with equal keys and shapes
    can be stacked together.
    """

    suffixes: tuple[str, ...] = ("",)

    @property
    @abstractmethod
    def key(self) -> tuple: ...

    @abstractmethod
    def init(self, shape: tuple[int, ...], device: torch.device) -> dict[str, Tensor]:
        """Fresh, unbatched stored tensors (keyed by suffix) that decode to exact zeros."""

    #: whether ``decode`` can write into a caller-provided fp32 buffer
    decodes_into: bool = False

    @abstractmethod
    def decode(
        self, stored: dict[str, Tensor], shape: tuple[int, ...], out: Tensor | None = None
    ) -> Tensor:
        """Batched stored tensors ``[N, ...]`` -> fp32 ``[N, *shape]``.

        ``out`` (optional, honoured when ``decodes_into``) is an fp32 buffer to write into. The
        result may alias the stored tensor (float32).
        """

    @abstractmethod
    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """fp32 ``[N, *shape]`` -> batched stored tensors keyed by suffix.

        ``x`` may be used as scratch space (the engine passes values it no longer needs).
        """

    def describe(self) -> str:
        return self.key[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.key[1:]}"


class FloatCodec(Codec):
    """Stores the value directly in a float dtype (float32: 4 B/element, bfloat16: 2 B/element).

    Encoding rounds to nearest; the exact fp32 value computed in the step is what the update
    uses, so only later steps see the rounding.
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.decodes_into = dtype != torch.float32

    @property
    def key(self) -> tuple:
        return ("float", str(self.dtype).removeprefix("torch."))

    def init(self, shape, device):
        return {"": torch.zeros(shape, dtype=self.dtype, device=device)}

    def decode(self, stored, shape, out=None):
        if out is not None and stored[""].dtype != torch.float32:
            return out.copy_(stored[""])
        return stored[""].float()

    def encode(self, x):
        return {"": x.to(self.dtype)}


class Int8Codec(Codec):
    """Symmetric linear int8 with one absmax scale per output row.

    For a slot of shape ``[R, ...]`` the scale has shape ``[R, 1, ...]`` (for a matrixized conv
    kernel ``[out, in*kh*kw]`` that is one scale per output channel); a 1-D slot has one scale.
    ``scale = max(absmax, 1e-12) / 127``, ``code = round(x / scale)`` in ``[-127, 127]`` (half to
    even; -128 unused). 1 B/element + 4 B per row.
    """

    suffixes = ("", "_scale")

    @property
    def key(self) -> tuple:
        return ("int8",)

    @staticmethod
    def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) >= 2:
            return (shape[0],) + (1,) * (len(shape) - 1)
        return (1,)

    def init(self, shape, device):
        return {
            "": torch.zeros(shape, dtype=torch.int8, device=device),
            "_scale": torch.ones(self._scale_shape(shape), dtype=torch.float32, device=device),
        }

    decodes_into = True

    def decode(self, stored, shape, out=None):
        if out is None:
            return torch.mul(stored[""], stored["_scale"])  # int8 * fp32 promotes to fp32
        return out.copy_(stored[""]).mul_(stored["_scale"])

    def encode(self, x):
        rows = x.reshape(x.shape[0], x.shape[1], -1) if x.ndim >= 3 else x
        absmax = _absmax(rows).clamp_min_(_TINY_ABSMAX)
        scale = (absmax / 127.0).view(x.shape[0], *self._scale_shape(tuple(x.shape[1:])))
        # |x / scale| <= 127 by construction, so rounding needs no clamp
        codes = x.div_(scale).round_().to(torch.int8)
        return {"": codes, "_scale": scale}


def _absmax(x: Tensor) -> Tensor:
    """Max of ``|x|`` over the last dim (keepdim).

    Wide rows: two read-only passes (amax, amin), no temporary. Narrow rows (a LoRA factor
    ``[out, rank]``) are slow for torch's reductions, so there ``|x|`` goes through a max-pool
    with window = row length, which is exact and about twice as fast.
    """
    width = x.shape[-1]
    if width < 64 and x.device.type == "cpu" and not torch.compiler.is_compiling():
        flat = torch.abs(x).reshape(-1, 1, x.numel() // max(width, 1) * width)
        pooled = torch.nn.functional.max_pool1d(flat, width)
        return pooled.view(*x.shape[:-1], 1)
    return torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())


def _block_layout(numel: int, block: int) -> tuple[int, int]:
    """(effective block, number of blocks) for flat blocking; block <= 0 means one block.

    Written with comparisons and floor division only (no ``min`` / ``ceil``): traced with
    symbolic sizes on the fused path, each comparison is one guard and the block size stays a
    constant, where ``min(block, numel)`` would carry through every index expression.
    """
    eff = block if 0 < block < numel else (numel if numel >= 1 else 1)
    nblocks = (numel + eff - 1) // eff if numel >= 1 else 1
    return eff, nblocks


def _blocked(x: Tensor, numel: int, block: int, nblocks: int) -> Tensor:
    """Flatten ``[N, *shape]`` to ``[N, nblocks, block]``, zero-padding the last block."""
    flat = x.reshape(x.shape[0], numel)
    pad = nblocks * block - numel
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(x.shape[0], nblocks, block)


class _BlockCodec(Codec):
    """A codec that quantizes the row-major flattened slot in blocks of ``block`` elements."""

    name = ""

    def __init__(self, block: int) -> None:
        self.block = int(block)

    @property
    def key(self) -> tuple:
        return (self.name, self.block)

    def layout(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(numel, effective block, number of blocks) of a slot."""
        numel = math.prod(shape)
        block, nblocks = _block_layout(numel, self.block)
        return numel, block, nblocks


class FourBitCodec(_BlockCodec):
    """Symmetric linear 4-bit with one absmax scale per block of the row-major flattened slot.

    ``scale = max(absmax, 1e-12) / 7``, level ``q = round(x / scale)`` in ``[-7, 7]``, stored as
    nibble ``q + 8`` (nibble 0 is never used). Element ``2i`` sits in the low nibble of byte
    ``i`` and element ``2i+1`` in the high nibble; an odd length is padded with one nibble.
    ``block <= 0`` puts the whole slot in one block. 0.5 B/element + 4 B per block (0.53125
    B/element at block 128).
    """

    suffixes = ("", "_scale")
    name = "4bit"

    def __init__(self, block: int = 128) -> None:
        super().__init__(block)

    def init(self, shape, device):
        numel, _, nblocks = self.layout(shape)
        return {
            "": torch.full(((numel + 1) // 2,), 0x88, dtype=torch.uint8, device=device),
            "_scale": torch.ones(nblocks, dtype=torch.float32, device=device),
        }

    def decode(self, stored, shape, out=None):
        packed = stored[""]
        n = packed.shape[0]
        numel, block, nblocks = self.layout(shape)
        if numel % block == 0 and block % 2 == 0:
            # whole blocks of whole bytes: views only, no padding or slicing (the same values
            # as below; traced, the index arithmetic stays linear)
            pairs = packed.view(n, nblocks, block // 2)
            levels = torch.stack((pairs & 0x0F, pairs >> 4), dim=-1).view(n, nblocks, block)
            values = levels.float().sub_(8.0).mul_(stored["_scale"].unsqueeze(-1))
            return values.view(n, *shape)
        nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(n, -1)
        levels = nibbles[:, :numel].float().sub_(8.0)
        values = _blocked(levels, numel, block, nblocks) * stored["_scale"].unsqueeze(-1)
        return values.view(n, -1)[:, :numel].reshape(n, *shape)

    def encode(self, x):
        n = x.shape[0]
        numel, block, nblocks = self.layout(tuple(x.shape[1:]))
        blocks = _blocked(x, numel, block, nblocks)
        scale = _absmax(blocks).squeeze(-1).clamp_min_(_TINY_ABSMAX) / 7.0
        # levels in [-7, 7] shifted to the nibbles [1, 15] before the integer conversion
        levels = blocks.div_(scale.unsqueeze(-1)).round_().add_(8.0)
        if numel % block == 0 and block % 2 == 0:
            pairs = levels.to(torch.uint8).view(n, nblocks, block // 2, 2)
            packed = pairs[..., 0] | (pairs[..., 1] << 4)
            return {"": packed.view(n, numel // 2), "_scale": scale}
        nibbles = levels.view(n, -1)[:, :numel].to(torch.uint8)
        if numel % 2:
            nibbles = torch.nn.functional.pad(nibbles, (0, 1))
        pairs = nibbles.view(n, -1, 2)
        packed = pairs[..., 0] | (pairs[..., 1] << 4)
        return {"": packed, "_scale": scale}


class LogSpace8BitCodec(_BlockCodec):
    """Log-space 8-bit storage for non-negative statistics (second moments).

    Per block of ``block`` flattened elements: over the non-zero values, ``lo = min log2 x`` and
    ``hi = max log2 x`` (``lo = hi - 1`` when they coincide). Code 0 is exact zero; codes 1..255
    spread 254 steps of ``(hi - lo) / 254`` in log2 between them, so the relative error depends
    only on the dynamic range inside a block (<= 2.2 % for a 2^16 range), never on a fixed floor.
    The stored tensors are the codes (uint8), ``_scale`` = ``hi - lo`` and ``_offset`` = ``lo``
    (fp32 per block). Negative inputs are stored as zero. 1 B/element + 8 B per block.

    ``log2`` and ``exp2`` run in float64 and are rounded once to fp32: torch's vectorized and
    scalar CPU kernels for them can differ in the last fp32 bit, which would make a value depend
    on its position in a batch.
    """

    suffixes = ("", "_scale", "_offset")
    name = "log8"
    #: log2 steps between the smallest and the largest non-zero value of a block
    steps = 254

    def __init__(self, block: int = 256) -> None:
        super().__init__(block)

    def init(self, shape, device):
        numel, _, nblocks = self.layout(shape)
        return {
            "": torch.zeros(numel, dtype=torch.uint8, device=device),
            "_scale": torch.ones(nblocks, dtype=torch.float32, device=device),
            "_offset": torch.zeros(nblocks, dtype=torch.float32, device=device),
        }

    def decode(self, stored, shape, out=None):
        codes = self._codes(stored[""], shape)
        n = codes.shape[0]
        numel, block, nblocks = self.layout(shape)
        q = _blocked(codes.double(), numel, block, nblocks)
        step = (stored["_scale"].double() / self.steps).unsqueeze(-1)
        log2 = (q - 1.0) * step + stored["_offset"].double().unsqueeze(-1)
        values = torch.where(q > 0, torch.exp2(log2), 0.0).float()
        return values.view(n, -1)[:, :numel].reshape(n, *shape)

    def encode(self, x):
        n = x.shape[0]
        numel, block, nblocks = self.layout(tuple(x.shape[1:]))
        blocks = _blocked(x, numel, block, nblocks)
        nonzero = blocks > 0
        log2 = torch.log2(torch.where(nonzero, blocks, 1.0).double()).float()
        inf = torch.tensor(math.inf, device=x.device)
        hi = torch.where(nonzero, log2, -inf).amax(dim=-1)
        lo = torch.where(nonzero, log2, inf).amin(dim=-1)
        empty = ~nonzero.any(dim=-1)
        hi = torch.where(empty, torch.zeros_like(hi), hi)
        lo = torch.where(empty | (lo >= hi), hi - 1.0, lo)
        span = (hi - lo).clamp_min(1e-12)
        q = torch.round((log2 - lo.unsqueeze(-1)) * (self.steps / span).unsqueeze(-1)).add_(1.0)
        q = torch.where(nonzero, q.clamp_(1, self.steps + 1), torch.zeros((), device=x.device))
        codes = q.view(n, -1)[:, :numel].to(torch.uint8)
        return {"": self._pack(codes), "_scale": span, "_offset": lo}

    def _pack(self, codes: Tensor) -> Tensor:
        return codes

    def _codes(self, stored: Tensor, shape: tuple[int, ...]) -> Tensor:
        return stored


class LogSpace4BitCodec(LogSpace8BitCodec):
    """The log-space codec with 4-bit codes, two per byte, for non-negative statistics.

    As :class:`LogSpace8BitCodec` (per block: exact zero, the smallest and the largest non-zero
    value are kept; no non-zero value is ever stored as zero), with codes 1..15 spreading 14
    steps of ``(hi - lo) / 14`` in log2. Element ``2i`` is the low nibble of byte ``i``. For a
    block whose values span ``2^r``, the relative error of a value is at most
    ``2^(r / 28) - 1``. 0.5 B/element + 8 B per block (0.53125 B/element at block 256).
    """

    name = "log4"
    steps = 14

    def init(self, shape, device):
        numel, _, nblocks = self.layout(shape)
        return {
            "": torch.zeros((numel + 1) // 2, dtype=torch.uint8, device=device),
            "_scale": torch.ones(nblocks, dtype=torch.float32, device=device),
            "_offset": torch.zeros(nblocks, dtype=torch.float32, device=device),
        }

    def _pack(self, codes: Tensor) -> Tensor:
        if codes.shape[1] % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        pairs = codes.view(codes.shape[0], -1, 2)
        return pairs[..., 0] | (pairs[..., 1] << 4)

    def _codes(self, stored: Tensor, shape: tuple[int, ...]) -> Tensor:
        numel = math.prod(shape)
        nibbles = torch.stack((stored & 0x0F, stored >> 4), dim=-1).view(stored.shape[0], -1)
        return nibbles[:, :numel]


class IntegerCodec(Codec):
    """Stores an integer value (a random seed, a counter) exactly, as int64 (8 B/element).

    ``decode`` returns the int64 tensor itself (not fp32): the rule does integer arithmetic on
    it. ``encode`` accepts int64 (kept as is) or a float tensor holding integers (rounded).
    """

    @property
    def key(self) -> tuple:
        return ("int64",)

    def init(self, shape, device):
        return {"": torch.zeros(shape, dtype=torch.int64, device=device)}

    def decode(self, stored, shape, out=None):
        return stored[""]

    def encode(self, x):
        if x.dtype == torch.int64:
            return {"": x}
        return {"": x.round().to(torch.int64)}


_FLOAT_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def momentum_codec(momentum_dtype: str, block: int = 128) -> Codec:
    """The codec for a ``momentum_dtype`` argument: float32, bfloat16, int8 or 4bit."""
    if momentum_dtype in _FLOAT_NAMES:
        return FloatCodec(_FLOAT_NAMES[momentum_dtype])
    if momentum_dtype == "int8":
        return Int8Codec()
    if momentum_dtype == "4bit":
        return FourBitCodec(block)
    raise ValueError(
        f"momentum_dtype must be one of {', '.join(MOMENTUM_DTYPES)}; got {momentum_dtype!r}"
    )
