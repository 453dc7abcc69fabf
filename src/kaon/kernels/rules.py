"""Host side of the chunk kernels: eligibility, pointer tables, launches.

Importing this module does not import Triton (the kernels module is loaded on first use).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kaon import engine, precision
from kaon.kernels import interpreter
from kaon.optim.adakaon import Adakaon
from kaon.optim.lion import Lion
from kaon.state.codecs import FloatCodec, FourBitCodec, Int8Codec

__all__ = ["ChunkKernel", "AdakaonKernel", "LionKernel", "KERNELS"]

_MCODEC = {"none": 0, "float32": 1, "bfloat16": 2, "int8": 3, "4bit": 4}
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_ROW_RANGES = 64
_MAX_FLAT_RANGES = 1024
_PARTIAL_BLOCK = 64


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16, torch.int8: tl.int8, torch.uint8: tl.uint8}[dtype]


def pointer_table(cache: dict[str, Any], name: str, tensors: list[Tensor]) -> Tensor:
    """An int64 device tensor of the tensors' addresses, rebuilt whenever ANY address changed.

    The full address tuple is compared every step (the upstream incident: a cache keyed on the
    first gradient's address read freed memory after the allocator moved the others).
    """
    addresses = tuple(t.data_ptr() for t in tensors)
    held = cache.get(name)
    if held is not None and held[0] == addresses:
        return held[1]
    table = torch.tensor(addresses, dtype=torch.int64).to(tensors[0].device, non_blocking=True)
    cache[name] = (addresses, table)
    return table


def _momentum_kind(slot) -> str:
    codec = slot.codec
    if isinstance(codec, Int8Codec):
        return "int8"
    if isinstance(codec, FourBitCodec):
        return "4bit"
    if isinstance(codec, FloatCodec) and codec.dtype == torch.float32:
        return "float32"
    if isinstance(codec, FloatCodec) and codec.dtype == torch.bfloat16:
        return "bfloat16"
    return "unknown"


class ChunkKernel:
    """A fused rule for one optimizer class: ``run(opt, group, chunk)`` returns False to decline.

    Declined (the reference rule runs): a device other than CUDA (CPU runs only under
    ``TRITON_INTERPRET=1``); parameters other than fp32 / bf16 (bf16 with stochastic rounding or
    round to nearest; Kahan keeps a ``shift`` slot and declines); views of more than two
    dimensions; non-contiguous parameters, gradients or state; an unknown state codec.
    """

    rule = -1

    def static_blocker(self, opt, group: dict[str, Any], chunk) -> str | None:
        """Why this chunk can never run fused under its plan (None: it can)."""
        p = chunk.params[0]
        if p.device.type != "cuda" and not (p.device.type == "cpu" and interpreter()):
            return f"device {p.device.type}"
        if p.dtype not in (torch.float32, torch.bfloat16):
            return f"parameter dtype {p.dtype}"
        if p.grad is None or p.grad.dtype not in _GRAD_DTYPES:
            return "gradient dtype"
        if len(chunk.view) > 2:
            return "view"
        for slot in chunk.slots:
            if slot.name == engine.SHIFT:
                return "kahan"
        return None

    def run(self, opt, group: dict[str, Any], chunk) -> bool:
        cache = chunk.kernel_cache
        if "blocker" not in cache:
            cache["blocker"] = self.static_blocker(opt, group, chunk)
        if cache["blocker"] is not None:
            return False
        params = chunk.params
        grads = [p.grad for p in params]
        if not all(p.is_contiguous() for p in params) or not all(
            g.is_contiguous() for g in grads
        ):
            return False
        stored = engine.chunk_state(opt, chunk)
        if not all(t.is_contiguous() for t in stored.values()):
            return False
        self.launch(opt, group, chunk, stored,
                    pointer_table(cache, "grad", grads), pointer_table(cache, "param", params))
        return True

    def launch(self, opt, group, chunk, stored, gtable, ptable) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------- shared launch pieces
    @staticmethod
    def geometry(chunk) -> dict[str, int]:
        view = chunk.view
        rows, cols = (view[0], view[1]) if len(view) == 2 else (1, view[0])
        numel = rows * cols
        br = min(16, _next_pow2(rows))
        bc = min(256, _next_pow2(cols))
        tiles = math.ceil(rows / br)
        ranges = min(tiles, _MAX_ROW_RANGES)
        rpp = math.ceil(tiles / ranges) * br
        row_ranges = math.ceil(rows / rpp)
        block = max(2, min(1024, _next_pow2(numel)))
        blocks = math.ceil(numel / block)
        epp = math.ceil(blocks / min(blocks, _MAX_FLAT_RANGES)) * block
        flat = math.ceil(numel / epp)
        return dict(N=len(chunk.params), R=rows, C=cols, numel=numel, BR=br, BC=bc,
                    T=row_ranges, RPP=rpp, BLOCK=block, EPP=epp, F=flat)

    @staticmethod
    def finite_flags(opt, fin: Tensor) -> Tensor:
        """int32 [N]: 1 where the tensor may be written (its gradient sum is finite)."""
        if opt.nonfinite_grad == "skip":
            return torch.isfinite(fin.sum(dim=1)).to(torch.int32)
        return torch.ones(fin.shape[0], dtype=torch.int32, device=fin.device)

    @staticmethod
    def seed(opt, device: torch.device, stochastic: bool) -> Tensor:
        if not stochastic:
            return torch.zeros(1, dtype=torch.int64, device=device)
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device,
                             generator=opt._generator(device))

    @staticmethod
    def store_scales(stored: dict[str, Tensor], amax: Tensor, ok: Tensor, levels: float) -> None:
        """The new int8 / 4-bit scales, kept unchanged for tensors that were not written."""
        old = stored["m_scale"]
        new = amax.clamp_min(1e-12).div_(levels)
        flat = old.view(old.shape[0], -1)
        flat.copy_(torch.where(ok.bool().view(-1, 1), new, flat))


class AdakaonKernel(ChunkKernel):
    """Adakaon (factored or full second moment; float32 / bfloat16 / int8 / 4-bit / no
    momentum; centralization, RMS clip, weight decay, cautious; fp32 or bf16 weights)."""

    rule = 0

    def static_blocker(self, opt, group, chunk):
        reason = super().static_blocker(opt, group, chunk)
        if reason is None:
            for slot in chunk.slots:
                if slot.name == "m" and _momentum_kind(slot) == "unknown":
                    return "momentum codec"
        return reason

    def launch(self, opt, group, chunk, stored, gtable, ptable) -> None:
        from kaon.kernels import _triton as kt

        geo = self.geometry(chunk)
        n, rows, cols, numel = geo["N"], geo["R"], geo["C"], geo["numel"]
        device = chunk.params[0].device
        beta1, beta2 = group["betas"]
        eps1 = float(group["eps"][0])
        slot_m = next((s for s in chunk.slots if s.name == "m"), None)
        kind = "none" if slot_m is None else _momentum_kind(slot_m)
        mcodec = _MCODEC[kind]
        factored = len(chunk.view) == 2
        gc = bool(group["gradient_centralization"]) and factored and cols > 1
        sign = -1.0 if group.get("maximize", False) else 1.0
        p_dtype = chunk.params[0].dtype
        method = group.get("bf16_method", "stochastic_rounding")
        stochastic = p_dtype in precision.LOW_PRECISION and method == "stochastic_rounding"
        wd = float(group["weight_decay"])
        f32 = dict(dtype=torch.float32, device=device)

        fin = torch.empty((n, geo["T"]), **f32)
        mu = torch.empty((n, rows), **f32) if gc else fin
        if factored:
            rowsq = torch.empty((n, rows), **f32)
            colpart = torch.zeros((n, geo["T"], cols), **f32)
            rbuf = torch.empty((n, rows), **f32)
            cbuf = torch.empty((n, cols), **f32)
            v = fin
        else:
            rowsq = colpart = rbuf = cbuf = fin
            v = stored["v"]
        g_dt = _tl_dtype(chunk.params[0].grad.dtype)
        p_dt = _tl_dtype(p_dtype)
        kt.rows_kernel[(n, geo["T"])](
            gtable, mu, rowsq, colpart, fin, rows, cols, geo["T"], geo["RPP"], sign,
            GC=gc, SQUARES=factored, G_DT=g_dt, BR=geo["BR"], BC=geo["BC"])
        ok = self.finite_flags(opt, fin)
        beta2w = 1.0 - beta2
        if factored:
            kt.factors_kernel[(n, math.ceil(cols / geo["BC"]))](
                rowsq, colpart, stored["row"], stored["col"], rbuf, cbuf, ok, rows, cols,
                geo["T"], beta2w, eps1, BR=min(1024, _next_pow2(rows)), BC=geo["BC"])
        upart = torch.empty((n, geo["F"]), **f32)
        cpart = torch.empty((n, geo["F"]), **f32)
        common = (numel, rows, cols, geo["F"], geo["EPP"])
        kt.sumsq_kernel[(n, geo["F"])](
            gtable, mu, rbuf, cbuf, v, upart, *common, sign, beta2w, eps1,
            GC=gc, FACTORED=factored, G_DT=g_dt, BLOCK=geo["BLOCK"])
        m = stored.get("m", fin)
        ms = stored.get("m_scale", fin)
        block = 1
        amax = fin
        if kind == "int8":
            amax = torch.zeros((n, rows), **f32)
        elif kind == "4bit":
            block, nblocks = slot_m.codec.layout(slot_m.shape)[1:]
            amax = torch.zeros((n, nblocks), **f32)
        cautious = bool(group["cautious"])
        flags = dict(RULE=0, GC=gc, FACTORED=factored, MCODEC=mcodec, G_DT=g_dt, P_DT=p_dt,
                     WD=wd != 0.0)
        scalars = (sign, float(beta1), float(beta2), beta2w, eps1,
                   float(group["clip_threshold"]), wd)
        kt.moment_kernel[(n, geo["F"])](
            gtable, ptable, mu, rbuf, cbuf, v, m, ms, upart, cpart, amax, *common, block,
            *scalars, **flags, CAUTIOUS=cautious, BLOCK=geo["BLOCK"], FB=_PARTIAL_BLOCK)
        seed = self.seed(opt, device, stochastic)
        m_dt = _tl_dtype(m.dtype)
        kt.apply_kernel[(n, geo["F"])](
            gtable, ptable, mu, rbuf, cbuf, v, m, ms, upart, cpart, amax, ok, seed, *common,
            block, *scalars, float(group["lr"]), **flags, M_DT=m_dt, CAUTIOUS=cautious,
            SR=stochastic, BLOCK=geo["BLOCK"], FB=_PARTIAL_BLOCK)
        if kind in ("int8", "4bit"):
            self.store_scales(stored, amax, ok, 127.0 if kind == "int8" else 7.0)


class LionKernel(ChunkKernel):
    """Lion (float32 / bfloat16 / int8 / 4-bit / no momentum; centralization, weight decay,
    cautious; fp32 or bf16 weights)."""

    rule = 1

    def static_blocker(self, opt, group, chunk):
        reason = super().static_blocker(opt, group, chunk)
        if reason is None:
            for slot in chunk.slots:
                if slot.name == "m" and _momentum_kind(slot) == "unknown":
                    return "momentum codec"
        return reason

    def launch(self, opt, group, chunk, stored, gtable, ptable) -> None:
        from kaon.kernels import _triton as kt

        geo = self.geometry(chunk)
        n, rows, cols, numel = geo["N"], geo["R"], geo["C"], geo["numel"]
        device = chunk.params[0].device
        beta1, beta2 = group["betas"]
        slot_m = next((s for s in chunk.slots if s.name == "m"), None)
        kind = "none" if slot_m is None else _momentum_kind(slot_m)
        mcodec = _MCODEC[kind]
        gc = (bool(group["gradient_centralization"]) and len(chunk.view) == 2 and cols > 1)
        sign = -1.0 if group.get("maximize", False) else 1.0
        p_dtype = chunk.params[0].dtype
        method = group.get("bf16_method", "stochastic_rounding")
        stochastic = p_dtype in precision.LOW_PRECISION and method == "stochastic_rounding"
        wd = float(group["weight_decay"])
        f32 = dict(dtype=torch.float32, device=device)

        fin = torch.empty((n, geo["T"]), **f32)
        mu = torch.empty((n, rows), **f32) if gc else fin
        g_dt = _tl_dtype(chunk.params[0].grad.dtype)
        p_dt = _tl_dtype(p_dtype)
        kt.rows_kernel[(n, geo["T"])](
            gtable, mu, fin, fin, fin, rows, cols, geo["T"], geo["RPP"], sign,
            GC=gc, SQUARES=False, G_DT=g_dt, BR=geo["BR"], BC=geo["BC"])
        ok = self.finite_flags(opt, fin)
        cpart = torch.empty((n, geo["F"]), **f32)
        common = (numel, rows, cols, geo["F"], geo["EPP"])
        m = stored.get("m", fin)
        ms = stored.get("m_scale", fin)
        block = 1
        amax = fin
        if kind == "int8":
            amax = torch.zeros((n, rows), **f32)
        elif kind == "4bit":
            block, nblocks = slot_m.codec.layout(slot_m.shape)[1:]
            amax = torch.zeros((n, nblocks), **f32)
        cautious = bool(group["cautious"])
        flags = dict(RULE=1, GC=gc, FACTORED=True, MCODEC=mcodec, G_DT=g_dt, P_DT=p_dt,
                     WD=wd != 0.0)
        scalars = (sign, float(beta1), float(beta2), 0.0, 0.0, 1.0, wd)
        quantized = kind in ("int8", "4bit")
        if cautious or quantized:
            kt.moment_kernel[(n, geo["F"])](
                gtable, ptable, mu, fin, fin, fin, m, ms, fin, cpart, amax, *common, block,
                *scalars, **flags, CAUTIOUS=cautious, BLOCK=geo["BLOCK"], FB=_PARTIAL_BLOCK)
        seed = self.seed(opt, device, stochastic)
        kt.apply_kernel[(n, geo["F"])](
            gtable, ptable, mu, fin, fin, fin, m, ms, fin, cpart, amax, ok, seed, *common,
            block, *scalars, float(group["lr"]), **flags, M_DT=_tl_dtype(m.dtype),
            CAUTIOUS=cautious, SR=stochastic, BLOCK=geo["BLOCK"], FB=_PARTIAL_BLOCK)
        if quantized:
            self.store_scales(stored, amax, ok, 127.0 if kind == "int8" else 7.0)


KERNELS: dict[type, ChunkKernel] = {Adakaon: AdakaonKernel(), Lion: LionKernel()}
