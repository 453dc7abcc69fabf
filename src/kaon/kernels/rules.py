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
from kaon.optim.adamw import AdamW, _bias_correction
from kaon.optim.adapnm import _FACTORED_EPS_FLOOR, AdaPNM
from kaon.optim.lion import Lion
from kaon.optim.nekaon import _RECORD as _CLIMB
from kaon.optim.nekaon import Nekaon
from kaon.state.codecs import (
    FloatCodec,
    FourBitCodec,
    Int8Codec,
    LogSpace4BitCodec,
    LogSpace8BitCodec,
)

__all__ = ["ChunkKernel", "AdakaonKernel", "NekaonKernel", "LionKernel", "AdaPNMKernel",
           "AdamWKernel", "KERNELS"]

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
    #: the momentum slots the rule keeps (in codec order)
    momentum_slots: tuple[str, ...] = ("m",)

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
            if slot.name in self.momentum_slots and _momentum_kind(slot) == "unknown":
                return "momentum codec"
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
        rows = view[0] if len(view) >= 2 else 1
        numel = math.prod(view)
        cols = numel // rows
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
    def store_scales(stored: dict[str, Tensor], amax: Tensor, ok: Tensor, levels: float,
                     key: str = "m_scale") -> None:
        """The new int8 / 4-bit scales, kept unchanged for tensors that were not written."""
        old = stored[key]
        new = amax.clamp_min(1e-12).div_(levels)
        flat = old.view(old.shape[0], -1)
        flat.copy_(torch.where(ok.bool().view(-1, 1), new, flat))


class _Launch:
    """The buffers, flags and scalars of one fused step of a chunk (shared by the rules)."""

    def __init__(self, kernel: ChunkKernel, opt, group, chunk, stored, gtable, ptable) -> None:
        self.geo = geo = kernel.geometry(chunk)
        self.n, self.rows, self.cols = geo["N"], geo["R"], geo["C"]
        self.stored, self.gtable, self.ptable = stored, gtable, ptable
        p = chunk.params[0]
        self.device = p.device
        self.f32 = dict(dtype=torch.float32, device=p.device)
        self.factored = len(chunk.view) == 2
        slot = next((s for s in chunk.slots if s.name == kernel.momentum_slots[0]), None)
        self.slot = slot
        self.kind = "none" if slot is None else _momentum_kind(slot)
        self.mcodec = _MCODEC[self.kind]
        self.gc = (bool(group.get("gradient_centralization", False)) and self.factored
                   and self.cols > 1)
        self.sign = -1.0 if group.get("maximize", False) else 1.0
        method = group.get("bf16_method", "stochastic_rounding")
        self.stochastic = p.dtype in precision.LOW_PRECISION and method == "stochastic_rounding"
        self.g_dt = _tl_dtype(p.grad.dtype)
        self.p_dt = _tl_dtype(p.dtype)
        self.fin = torch.empty((self.n, geo["T"]), **self.f32)
        self.mu = torch.empty((self.n, self.rows), **self.f32) if self.gc else self.fin
        self.block = 1
        self.amax = self.amax2 = self.fin
        self.levels = 127.0 if self.kind == "int8" else 7.0
        if self.kind == "int8":
            self.amax = torch.zeros((self.n, self.rows), **self.f32)
        elif self.kind == "4bit":
            self.block, nblocks = slot.codec.layout(slot.shape)[1:]
            self.amax = torch.zeros((self.n, nblocks), **self.f32)
        self.quantized = self.kind in ("int8", "4bit")
        self.upart = torch.empty((self.n, geo["F"]), **self.f32)
        self.cpart = torch.empty((self.n, geo["F"]), **self.f32)
        self.rowsq = self.colpart = self.rbuf = self.cbuf = self.fin
        self.v = stored.get("v", self.fin)

    def rows_pass(self, kt, squares: bool) -> None:
        geo = self.geo
        if squares:
            self.rowsq = torch.empty((self.n, self.rows), **self.f32)
            self.colpart = torch.zeros((self.n, geo["T"], self.cols), **self.f32)
            self.rbuf = torch.empty((self.n, self.rows), **self.f32)
            self.cbuf = torch.empty((self.n, self.cols), **self.f32)
        kt.rows_kernel[(self.n, geo["T"])](
            self.gtable, self.mu, self.rowsq, self.colpart, self.fin, self.rows, self.cols,
            geo["T"], geo["RPP"], self.sign, GC=self.gc, SQUARES=squares, G_DT=self.g_dt,
            BR=geo["BR"], BC=geo["BC"])

    def factors_pass(self, kt, ok, beta2: float, eps1: float) -> None:
        geo = self.geo
        kt.factors_kernel[(self.n, math.ceil(self.cols / geo["BC"]))](
            self.rowsq, self.colpart, self.stored["row"], self.stored["col"], self.rbuf,
            self.cbuf, ok, self.rows, self.cols, geo["T"], 1.0 - beta2, eps1,
            BR=min(1024, _next_pow2(self.rows)), BC=geo["BC"])

    def common(self) -> tuple:
        geo = self.geo
        return (self.rows * self.cols, self.rows, self.cols, geo["F"], geo["EPP"])


class AdakaonKernel(ChunkKernel):
    """Adakaon (factored or full second moment; float32 / bfloat16 / int8 / 4-bit / no
    momentum; centralization, RMS clip, weight decay, cautious; fp32 or bf16 weights)."""

    rule = 0

    def launch(self, opt, group, chunk, stored, gtable, ptable) -> None:
        from kaon.kernels import _triton as kt

        run = _Launch(self, opt, group, chunk, stored, gtable, ptable)
        geo, n, fin = run.geo, run.n, run.fin
        beta1, beta2 = group["betas"]
        eps1 = float(group["eps"][0])
        wd = float(group["weight_decay"])
        run.rows_pass(kt, squares=run.factored)
        ok = self.finite_flags(opt, fin)
        if run.factored:
            run.factors_pass(kt, ok, beta2, eps1)
        beta2w = 1.0 - beta2
        kt.sumsq_kernel[(n, geo["F"])](
            gtable, run.mu, run.rbuf, run.cbuf, run.v, run.upart, *run.common(), run.sign,
            beta2w, eps1, GC=run.gc, FACTORED=run.factored, G_DT=run.g_dt,
            BLOCK=geo["BLOCK"])
        m = stored.get("m", fin)
        ms = stored.get("m_scale", fin)
        cautious = bool(group["cautious"])
        lr, clip = float(group["lr"]), float(group["clip_threshold"])
        # Nekaon (its momentum groups): the climb record in place of AdaPNM's coefficients
        record = stored.get(_CLIMB)
        nekaon = record is not None
        flags = dict(RULE=0, GC=run.gc, FACTORED=run.factored, MCODEC=run.mcodec,
                     G_DT=run.g_dt, P_DT=run.p_dt, WD=wd != 0.0, CLIP=True, NEKAON=nekaon)
        scalars = (run.sign, float(beta1), float(beta2), beta2w, eps1, clip, wd, 0.0, 1.0)
        buffers = (gtable, ptable, run.mu, run.rbuf, run.cbuf, run.v, m, ms, fin, fin,
                   record if nekaon else fin, run.upart)
        kt.moment_kernel[(n, geo["F"])](
            *buffers, run.cpart, run.amax, fin, *run.common(), run.block, *scalars, **flags,
            CAUTIOUS=cautious, BLOCK=geo["BLOCK"], FB=_PARTIAL_BLOCK)
        k = float(group.get("k", 0.0))
        kt.apply_kernel[(n, geo["F"])](
            *buffers, run.cpart, run.amax, fin, ok, self.seed(opt, run.device, run.stochastic),
            *run.common(), run.block, *scalars, lr, **flags,
            M_DT=_tl_dtype(m.dtype), CAUTIOUS=cautious, SR=run.stochastic, BLOCK=geo["BLOCK"],
            FB=_PARTIAL_BLOCK, CLIMB=nekaon and k != 0.0, kscale=k * lr, kbound=k * clip * lr)
        if run.quantized:
            self.store_scales(stored, run.amax, ok, run.levels)
        if nekaon:
            new = torch.empty_like(record)  # filled on the device: no host copy (graphs)
            new[:, 0].fill_(k * lr)
            new[:, 1].fill_(k * clip * lr)
            record.copy_(torch.where(ok.bool().view(-1, 1), new, record))


class NekaonKernel(AdakaonKernel):
    """Nekaon: Adakaon's kernel with the climb (``w <- w - (delta + e_old - e_new)``, one
    rounding); groups without momentum run as plain Adakaon."""


class LionKernel(ChunkKernel):
    """Lion (float32 / bfloat16 / int8 / 4-bit / no momentum; centralization, weight decay,
    cautious; fp32 or bf16 weights)."""

    rule = 1

    def launch(self, opt, group, chunk, stored, gtable, ptable) -> None:
        from kaon.kernels import _triton as kt

        run = _Launch(self, opt, group, chunk, stored, gtable, ptable)
        geo, n, fin = run.geo, run.n, run.fin
        beta1, beta2 = group["betas"]
        wd = float(group["weight_decay"])
        run.rows_pass(kt, squares=False)
        ok = self.finite_flags(opt, fin)
        m = stored.get("m", fin)
        ms = stored.get("m_scale", fin)
        cautious = bool(group["cautious"])
        flags = dict(RULE=1, GC=run.gc, FACTORED=True, MCODEC=run.mcodec, G_DT=run.g_dt,
                     P_DT=run.p_dt, WD=wd != 0.0, CLIP=False)
        scalars = (run.sign, float(beta1), float(beta2), 0.0, 0.0, 1.0, wd, 0.0, 1.0)
        buffers = (gtable, ptable, run.mu, fin, fin, fin, m, ms, fin, fin, fin, fin)
        if cautious or run.quantized:
            kt.moment_kernel[(n, geo["F"])](
                *buffers, run.cpart, run.amax, fin, *run.common(), run.block, *scalars,
                **flags, CAUTIOUS=cautious, BLOCK=geo["BLOCK"], FB=_PARTIAL_BLOCK)
        kt.apply_kernel[(n, geo["F"])](
            *buffers, run.cpart, run.amax, fin, ok, self.seed(opt, run.device, run.stochastic),
            *run.common(), run.block, *scalars, float(group["lr"]), **flags,
            M_DT=_tl_dtype(m.dtype), CAUTIOUS=cautious, SR=run.stochastic, BLOCK=geo["BLOCK"],
            FB=_PARTIAL_BLOCK)
        if run.quantized:
            self.store_scales(stored, run.amax, ok, run.levels)


class AdaPNMKernel(ChunkKernel):
    """AdaPNM (factored or 1-D second moment, both momenta in float32 / bfloat16 / int8 /
    4-bit, centralization, RMS clip or none, cautious, decoupled decay; fp32 or bf16 weights).
    Declined: ``ams_bound`` on 1-D tensors (its ``v_max`` slot)."""

    rule = 2
    momentum_slots = ("m_pos", "m_neg")

    def static_blocker(self, opt, group, chunk):
        reason = super().static_blocker(opt, group, chunk)
        if reason is None and any(s.name == "v_max" for s in chunk.slots):
            return "ams_bound"
        return reason

    def launch(self, opt, group, chunk, stored, gtable, ptable) -> None:
        from kaon.kernels import _triton as kt

        run = _Launch(self, opt, group, chunk, stored, gtable, ptable)
        geo, n, fin = run.geo, run.n, run.fin
        beta1, beta2 = group["betas"]
        beta0, eps, lr = float(group["beta0"]), float(group["eps"]), float(group["lr"])
        wd = float(group["weight_decay"])
        # the per-tensor step count and its coefficients, as the reference computes them
        old_step = stored["step"]
        t = old_step + 1.0
        t64 = t.double().view(-1)
        coef = torch.stack([
            (lr / (1.0 - torch.pow(beta1, t64))).float(),
            (1.0 - torch.pow(beta2, t64)).sqrt_().float(),
            torch.remainder(t.view(-1), 2.0).eq(1.0).float(),
        ], dim=1).contiguous()
        run.rows_pass(kt, squares=run.factored)
        ok = self.finite_flags(opt, fin)
        eps1 = max(eps, _FACTORED_EPS_FLOOR) if run.factored else eps
        if run.factored:
            run.factors_pass(kt, ok, beta2, eps1)
        clip = float(group["clip_threshold"])
        cautious = bool(group["cautious"])
        weight = 1.0 - beta1 * beta1
        noise = math.sqrt((1.0 + beta0) ** 2 + beta0**2)
        scalars = (run.sign, weight, float(beta2), 1.0 - beta2, eps1, clip if clip > 0 else 1.0,
                   lr * wd, beta0, 1.0 / noise)
        m, m2 = stored["m_pos"], stored["m_neg"]
        ms, ms2 = stored.get("m_pos_scale", fin), stored.get("m_neg_scale", fin)
        buffers = (gtable, ptable, run.mu, run.rbuf, run.cbuf, run.v, m, ms, m2, ms2, coef,
                   run.upart)
        common = run.common()
        if clip > 0:
            kt.pnm_sumsq_kernel[(n, geo["F"])](
                *buffers, *common, run.block, *scalars, GC=run.gc, FACTORED=run.factored,
                MCODEC=run.mcodec, G_DT=run.g_dt, P_DT=run.p_dt, BLOCK=geo["BLOCK"],
                FB=_PARTIAL_BLOCK)
        amax2 = torch.zeros_like(run.amax) if run.quantized else fin
        flags = dict(RULE=2, GC=run.gc, FACTORED=run.factored, MCODEC=run.mcodec,
                     G_DT=run.g_dt, P_DT=run.p_dt, WD=wd != 0.0, CLIP=clip > 0)
        if cautious or run.quantized:
            kt.moment_kernel[(n, geo["F"])](
                *buffers, run.cpart, run.amax, amax2, *common, run.block, *scalars, **flags,
                CAUTIOUS=cautious, BLOCK=geo["BLOCK"], FB=_PARTIAL_BLOCK)
        kt.apply_kernel[(n, geo["F"])](
            *buffers, run.cpart, run.amax, amax2, ok,
            self.seed(opt, run.device, run.stochastic), *common, run.block, *scalars, lr,
            **flags, M_DT=_tl_dtype(m.dtype), CAUTIOUS=cautious, SR=run.stochastic,
            BLOCK=geo["BLOCK"], FB=_PARTIAL_BLOCK)
        if run.quantized:
            for key, amax in (("m_pos_scale", run.amax), ("m_neg_scale", amax2)):
                self.store_scales(stored, amax, ok, run.levels, key)
        old_step.copy_(torch.where(ok.bool().view(-1, 1), t, old_step))


def _second_moment_kind(slot) -> int:
    codec = slot.codec
    if isinstance(codec, LogSpace4BitCodec):
        return 6
    if isinstance(codec, LogSpace8BitCodec):
        return 5
    return {"float32": 1, "bfloat16": 2}.get(_momentum_kind(slot), 0)


class AdamWKernel(ChunkKernel):
    """kaon.AdamW with kaon-specific state (int8 / 4-bit first moment, log-space 8 / 4-bit or
    bf16 second moment) or bf16 weights: the cases torch's fused AdamW cannot run exactly
    (float32 state on fp32 weights keeps running torch's kernel through ``fused_step``).
    Declined: amsgrad, a tensor learning rate, and what every kernel declines."""

    rule = 3
    momentum_slots = ("exp_avg",)

    def static_blocker(self, opt, group, chunk):
        view = chunk.view
        chunk.view = view[:2] if len(view) > 2 else view  # any rank: rows are dim 0
        try:
            reason = super().static_blocker(opt, group, chunk)
        finally:
            chunk.view = view
        if reason is None:
            if any(s.name == "max_exp_avg_sq" for s in chunk.slots):
                return "amsgrad"
            if isinstance(group["lr"], Tensor):
                return "a tensor lr"
            second = next(s for s in chunk.slots if s.name == "exp_avg_sq")
            if _second_moment_kind(second) == 0:
                return "second-moment codec"
        return reason

    def launch(self, opt, group, chunk, stored, gtable, ptable) -> None:
        from kaon.kernels import _triton as kt

        run = _Launch(self, opt, group, chunk, stored, gtable, ptable)
        geo, n, fin = run.geo, run.n, run.fin
        run.gc = False
        run.rows_pass(kt, squares=False)
        ok = self.finite_flags(opt, fin)
        beta1, beta2 = float(group["betas"][0]), float(group["betas"][1])
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        step = stored["step"]
        t = step + 1.0
        coef = torch.stack([_bias_correction(beta1, t), _bias_correction(beta2, t).sqrt_()],
                           dim=1).contiguous()
        vslot = next(s for s in chunk.slots if s.name == "exp_avg_sq")
        vcodec = _second_moment_kind(vslot)
        steps, vblock, vhi, vlo = 1, 1, fin, fin
        vs, vo = stored.get("exp_avg_sq_scale", fin), stored.get("exp_avg_sq_offset", fin)
        if vcodec >= 5:
            steps = vslot.codec.steps
            vblock, nblocks = vslot.codec.layout(vslot.shape)[1:]
            vhi = torch.full((n, nblocks), -math.inf, **run.f32)
            vlo = torch.full((n, nblocks), -math.inf, **run.f32)  # max of -log2
        m, ms, v = stored["exp_avg"], stored.get("exp_avg_scale", fin), stored["exp_avg_sq"]
        common = (run.rows * run.cols, run.rows, run.cols, geo["EPP"], run.block, vblock,
                  run.sign, beta1, beta2, float(group["eps"]))
        flags = dict(MCODEC=run.mcodec, VCODEC=vcodec, STEPS=steps, G_DT=run.g_dt,
                     P_DT=run.p_dt)
        if run.quantized or vcodec >= 5:
            kt.adam_moment_kernel[(n, geo["F"])](
                gtable, ptable, m, ms, v, vs, vo, coef, run.amax, vhi, vlo, *common, **flags,
                BLOCK=geo["BLOCK"])
        new_span, new_lo = fin, fin
        if vcodec >= 5:  # the block ranges as the log-space codec derives them
            hi, lo = vhi, vlo.neg()
            empty = torch.isinf(hi)
            hi = torch.where(empty, torch.zeros_like(hi), hi)
            new_lo = torch.where(empty | (lo >= hi), hi - 1.0, lo)
            new_span = (hi - new_lo).clamp_min(1e-12)
        kt.adam_apply_kernel[(n, geo["F"])](
            gtable, ptable, m, ms, v, vs, vo, coef, run.amax, new_span, new_lo, ok,
            self.seed(opt, run.device, run.stochastic), *common, lr, 1.0 - lr * wd, **flags,
            M_DT=_tl_dtype(m.dtype), WD=wd != 0.0, SR=run.stochastic, BLOCK=geo["BLOCK"])
        keep = ok.bool()
        if run.quantized:
            self.store_scales(stored, run.amax, ok, run.levels, "exp_avg_scale")
        if vcodec >= 5:
            for old, new in ((vs, new_span), (vo, new_lo)):
                old.copy_(torch.where(keep.view(-1, 1), new, old))
        step.copy_(torch.where(keep, t, step))


KERNELS: dict[type, ChunkKernel] = {Adakaon: AdakaonKernel(), Nekaon: NekaonKernel(),
                                    Lion: LionKernel(), AdaPNM: AdaPNMKernel(),
                                    AdamW: AdamWKernel()}
