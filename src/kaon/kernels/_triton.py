"""Triton kernels of the fused rules (imported only when Triton is installed).

Every kernel runs over one engine chunk: ``N`` tensors with the same view ``[R, C]`` (a 1-D
view is one row, ``R = 1``). Gradients and parameters are reached through pointer tables (one
int64 address per tensor), state through the engine's packed ``[N, ...]`` buffers. A program is
identified by ``(n, k)``: tensor ``n`` and the ``k``-th range of that tensor, so one launch
covers the whole chunk whatever the sizes of its tensors (many small ones: ``N`` programs of
one range; one large one: many ranges).

Reductions are deterministic: a program reduces its own range in registers and writes one
partial per range; the consumer adds the partials in a fixed order. Maxima (int8 row and
4-bit block scales) use ``atomic_max``, which is exact in any order. So a fused step gives the
same bits every time, and a resumed run continues bit for bit.

The passes of a step (see :mod:`kaon.kernels.rules` for which rule uses which):

``rows``      per row range: ``sum g`` (the non-finite flag), the row means (centralization)
              and, for the factored second moment, the row sums and per-range column sums of
              the centralized ``g**2``
``factors``   row / column EMAs (stored), ``1/sqrt(row_i / mean(row))`` and ``1/sqrt(col_j)``
``sumsq``     per flat range: ``sum u**2`` of the normalized update (the RMS clip)
``moment``    per flat range: the new momentum, the step before masking, the cautious count,
              the absmax of every int8 row / 4-bit block of the new momentum
``apply``     per flat range of element pairs: the masked, lr-scaled step written into the
              parameters (fp32, or bf16 with stochastic rounding or round to nearest) and the
              new momentum / second moment encoded into the state; nothing is written for a
              tensor whose gradient is not finite
"""

from __future__ import annotations

import triton
import triton.language as tl

# rule ids (constexpr)
ADAKAON = 0
LION = 1
ADAPNM = 2

# momentum codecs (constexpr)
M_NONE = 0
M_FLOAT32 = 1
M_BFLOAT16 = 2
M_INT8 = 3
M_4BIT = 4


@triton.jit
def _ptr(table, n, DT: tl.constexpr):
    return tl.load(table + n).to(tl.pointer_type(DT))


@triton.jit
def _flag(OK, n, SIZE: tl.constexpr):
    """Tensor n's write flag as a [SIZE] block (a scalar mask does not broadcast everywhere)."""
    return tl.load(OK + n + tl.zeros([SIZE], dtype=tl.int32)) != 0


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _rne_bf16(x):
    """fp32 -> bf16 rounded to nearest even, as torch rounds (done on the bits, so the
    interpreter, whose plain cast truncates, and the GPU agree)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    rounded = bits.to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded).to(tl.bfloat16)


@triton.jit
def _store_as(ptr, x, mask, DT: tl.constexpr):
    if DT == tl.bfloat16:  # noqa: SIM300 (a Triton constexpr test)
        tl.store(ptr, _rne_bf16(x), mask=mask)
    else:
        tl.store(ptr, x.to(DT), mask=mask)


@triton.jit
def _lerp(start, end, w):
    # torch.lerp's formula (both branches), so the EMAs round as the reference's do
    diff = end - start
    return tl.where(w < 0.5, start + w * diff, end - diff * (1.0 - w))


@triton.jit
def rows_kernel(G, MU, ROWSQ, COLPART, FIN, R, C, T, RPP, sign,
                GC: tl.constexpr, SQUARES: tl.constexpr, G_DT: tl.constexpr,
                BR: tl.constexpr, BC: tl.constexpr):
    n = tl.program_id(0)
    t = tl.program_id(1)
    g = _ptr(G, n, G_DT)
    row_lo = t * RPP
    row_hi = tl.minimum(row_lo + RPP, R)
    total = tl.zeros([BR], dtype=tl.float32)
    for rs in range(row_lo, row_hi, BR):
        rows = rs + tl.arange(0, BR)
        rmask = rows < row_hi
        s = tl.zeros([BR], dtype=tl.float32)
        for cs in range(0, C, BC):
            cols = cs + tl.arange(0, BC)
            m = rmask[:, None] & (cols < C)[None, :]
            x = tl.load(g + rows[:, None].to(tl.int64) * C + cols[None, :], mask=m, other=0.0)
            s += tl.sum(x.to(tl.float32) * sign, axis=1)
        total += s
        mu = tl.zeros([BR], dtype=tl.float32)
        if GC:
            mu = s / C
            tl.store(MU + n.to(tl.int64) * R + rows, mu, mask=rmask)
        if SQUARES:
            sq = tl.zeros([BR], dtype=tl.float32)
            for cs in range(0, C, BC):
                cols = cs + tl.arange(0, BC)
                cmask = cols < C
                m = rmask[:, None] & cmask[None, :]
                x = tl.load(g + rows[:, None].to(tl.int64) * C + cols[None, :], mask=m, other=0.0)
                y = tl.where(m, x.to(tl.float32) * sign - mu[:, None], 0.0)
                y2 = y * y
                sq += tl.sum(y2, axis=1)
                cp = COLPART + (n.to(tl.int64) * T + t) * C + cols
                tl.store(cp, tl.load(cp, mask=cmask, other=0.0) + tl.sum(y2, axis=0), mask=cmask)
            tl.store(ROWSQ + n.to(tl.int64) * R + rows, sq, mask=rmask)
    tl.store(FIN + n * T + t, tl.sum(total, axis=0))


@triton.jit
def factors_kernel(ROWSQ, COLPART, ROW, COL, RBUF, CBUF, OK, R, C, T, beta2w, eps1,
                   BR: tl.constexpr, BC: tl.constexpr):
    """Program (n, k): column tile k of tensor n; program (n, 0) also does the rows."""
    n = tl.program_id(0)
    k = tl.program_id(1)
    cols = k * BC + tl.arange(0, BC)
    cmask = cols < C
    csum = tl.zeros([BC], dtype=tl.float32)
    for t in range(0, T):
        csum += tl.load(COLPART + (n.to(tl.int64) * T + t) * C + cols, mask=cmask, other=0.0)
    col_old = tl.load(COL + n.to(tl.int64) * C + cols, mask=cmask, other=1.0)
    col_new = _lerp(col_old, csum / R + eps1, beta2w)
    tl.store(CBUF + n.to(tl.int64) * C + cols, 1.0 / tl.sqrt(col_new), mask=cmask)
    tl.store(COL + n.to(tl.int64) * C + cols, col_new, mask=cmask & _flag(OK, n, BC))
    if k == 0:
        acc = tl.zeros([BR], dtype=tl.float32)
        for rs in range(0, R, BR):
            rows = rs + tl.arange(0, BR)
            rmask = rows < R
            sq = tl.load(ROWSQ + n.to(tl.int64) * R + rows, mask=rmask, other=0.0)
            row_old = tl.load(ROW + n.to(tl.int64) * R + rows, mask=rmask, other=0.0)
            row_new = _lerp(row_old, sq / C + eps1, beta2w)
            row_new = tl.where(rmask, row_new, 0.0)
            acc += row_new
            tl.store(RBUF + n.to(tl.int64) * R + rows, row_new, mask=rmask)
        mean = tl.sum(acc, axis=0) / R
        for rs in range(0, R, BR):
            rows = rs + tl.arange(0, BR)
            rmask = rows < R
            row_new = tl.load(RBUF + n.to(tl.int64) * R + rows, mask=rmask, other=1.0)
            tl.store(ROW + n.to(tl.int64) * R + rows, row_new, mask=rmask & _flag(OK, n, BR))
            tl.store(RBUF + n.to(tl.int64) * R + rows, 1.0 / tl.sqrt(row_new / mean), mask=rmask)


@triton.jit
def _decode_m(M, MS, n, idx, emask, numel, R, C, MB, MCODEC: tl.constexpr):
    base = n.to(tl.int64) * numel
    if MCODEC == 1:  # float32
        m = tl.load(M + base + idx, mask=emask, other=0.0)
    elif MCODEC == 2:  # bfloat16
        m = tl.load(M + base + idx, mask=emask, other=0.0).to(tl.float32)
    elif MCODEC == 3:  # int8, one scale per row
        code = tl.load(M + base + idx, mask=emask, other=0).to(tl.float32)
        scale = tl.load(MS + n.to(tl.int64) * R + idx // C, mask=emask, other=1.0)
        m = code * scale
    else:  # 4bit: packed pairs, one scale per flat block of MB
        nbytes = (numel + 1) // 2
        byte = tl.load(M + n.to(tl.int64) * nbytes + idx // 2, mask=emask, other=0x88)
        byte = byte.to(tl.int32)
        nib = tl.where((idx % 2) == 0, byte & 0x0F, (byte >> 4) & 0x0F)
        nblocks = (numel + MB - 1) // MB
        scale = tl.load(MS + n.to(tl.int64) * nblocks + idx // MB, mask=emask, other=1.0)
        m = (nib.to(tl.float32) - 8.0) * scale
    return m


@triton.jit
def _normalized(G, MU, RBUF, CBUF, V, n, idx, emask, numel, R, C, sign, beta2w, eps1,
                GC: tl.constexpr, FACTORED: tl.constexpr, G_DT: tl.constexpr):
    """(g after centralization, Adakaon's normalized update u, the new v (non-factored))."""
    g_ptr = _ptr(G, n, G_DT)
    g = tl.load(g_ptr + idx, mask=emask, other=0.0).to(tl.float32) * sign
    row = idx // C
    col = idx % C
    if GC:
        g = g - tl.load(MU + n.to(tl.int64) * R + row, mask=emask, other=0.0)
    if FACTORED:
        r = tl.load(RBUF + n.to(tl.int64) * R + row, mask=emask, other=0.0)
        c = tl.load(CBUF + n.to(tl.int64) * C + col, mask=emask, other=0.0)
        u = g * r * c
        v_new = u  # unused
    else:
        v_old = tl.load(V + n.to(tl.int64) * numel + idx, mask=emask, other=1.0)
        v_new = _lerp(v_old, g * g + eps1, beta2w)
        u = (1.0 / tl.sqrt(v_new)) * g
    return g, u, v_new


@triton.jit
def sumsq_kernel(G, MU, RBUF, CBUF, V, UPART, numel, R, C, F, EPP, sign, beta2w, eps1,
                 GC: tl.constexpr, FACTORED: tl.constexpr, G_DT: tl.constexpr,
                 BLOCK: tl.constexpr):
    n = tl.program_id(0)
    f = tl.program_id(1)
    lo = f * EPP
    hi = tl.minimum(lo + EPP, numel)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(lo, hi, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        emask = idx < hi
        _, u, _ = _normalized(G, MU, RBUF, CBUF, V, n, idx, emask, numel, R, C, sign, beta2w,
                              eps1, GC, FACTORED, G_DT)
        acc += tl.where(emask, u * u, 0.0)
    tl.store(UPART + n * F + f, tl.sum(acc, axis=0))


@triton.jit
def _partial_sum(PART, n, F, FB: tl.constexpr):
    acc = tl.zeros([FB], dtype=tl.float32)
    for s in range(0, F, FB):
        offs = s + tl.arange(0, FB)
        acc += tl.load(PART + n * F + offs, mask=offs < F, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _displacement(m, scale, bound):
    """Nekaon's ``clamp(-scale * m, -bound, bound)`` with NaN -> 0 (and +-inf -> +-bound)."""
    e = m * (-scale)
    e = tl.where(e != e, 0.0, e)
    return tl.minimum(tl.maximum(e, -bound), bound)


@triton.jit
def _step_values(G, P, MU, RBUF, CBUF, V, M, MS, M2, MS2, COEF, UPART, n, idx, emask, numel,
                 R, C, F, MB, sign, beta1, beta2, beta2w, eps1, clip, wd, beta0, inv_noise,
                 RULE: tl.constexpr, GC: tl.constexpr, FACTORED: tl.constexpr,
                 MCODEC: tl.constexpr, G_DT: tl.constexpr, P_DT: tl.constexpr,
                 WD: tl.constexpr, CLIP: tl.constexpr, FB: tl.constexpr,
                 NEKAON: tl.constexpr = False):
    """(g, new momentum, aux, the step before cautious masking and lr (AdaPNM: before its step
    size), v_new, p) of elements; aux is AdaPNM's new second momentum and Nekaon's old
    displacement (Nekaon: COEF is the old climb record [N, 2]). ``CLIP`` applies the RMS clip
    from the ``UPART`` partial sums (off for the pass that computes them)."""
    p = tl.load(_ptr(P, n, P_DT) + idx, mask=emask, other=0.0).to(tl.float32)
    m2_new = p  # aux
    if RULE == 0:  # Adakaon
        g, u, v_new = _normalized(G, MU, RBUF, CBUF, V, n, idx, emask, numel, R, C, sign,
                                  beta2w, eps1, GC, FACTORED, G_DT)
        if CLIP:
            ss = _partial_sum(UPART, n, F, FB)
            u = u * (1.0 / tl.maximum(tl.sqrt(ss / numel) / clip, 1.0))
        if MCODEC != 0:
            m_old = _decode_m(M, MS, n, idx, emask, numel, R, C, MB, MCODEC)
            m_new = _lerp(m_old, u, 1.0 - beta1)
        else:
            m_old = u
            m_new = u
        d = m_new
        if NEKAON:  # Adakaon's rule at the true weights p - e_old
            zero = tl.zeros_like(g).to(tl.int32)
            e_old = _displacement(m_old, tl.load(COEF + n * 2 + zero),
                                  tl.load(COEF + n * 2 + 1 + zero))
            m2_new = e_old
            if WD:
                d = d + wd * (p - e_old)
        elif WD:
            d = d + wd * p
    elif RULE == 1:  # Lion
        g = tl.load(_ptr(G, n, G_DT) + idx, mask=emask, other=0.0).to(tl.float32) * sign
        if GC:
            g = g - tl.load(MU + n.to(tl.int64) * R + idx // C, mask=emask, other=0.0)
        v_new = g  # unused
        if MCODEC != 0:
            m_old = _decode_m(M, MS, n, idx, emask, numel, R, C, MB, MCODEC)
            x = m_old * beta1 + (1.0 - beta1) * g
            m_new = m_old * beta2 + (1.0 - beta2) * g
        else:
            x = g
            m_new = g  # unused
        d = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
        if WD:
            d = d + wd * p
    else:  # AdaPNM: beta1 holds 1 - beta1**2, COEF [N, 3] = (step size, sqrt(1 - beta2^t), odd)
        g = tl.load(_ptr(G, n, G_DT) + idx, mask=emask, other=0.0).to(tl.float32) * sign
        if GC:
            g = g - tl.load(MU + n.to(tl.int64) * R + idx // C, mask=emask, other=0.0)
        zero = tl.zeros_like(g)
        b2s = tl.load(COEF + n * 3 + 1 + zero.to(tl.int32))
        odd = tl.load(COEF + n * 3 + 2 + zero.to(tl.int32)) != 0.0
        w_pos = tl.where(odd, beta1, 0.0)
        w_neg = tl.where(odd, 0.0, beta1)
        pos_new = _lerp(_decode_m(M, MS, n, idx, emask, numel, R, C, MB, MCODEC), g, w_pos)
        neg_new = _lerp(_decode_m(M2, MS2, n, idx, emask, numel, R, C, MB, MCODEC), g, w_neg)
        positive = tl.where(odd, pos_new, neg_new)
        negative = tl.where(odd, neg_new, pos_new)
        pn = (positive * (1.0 + beta0) + (-beta0) * negative) * inv_noise
        if FACTORED:
            r = tl.load(RBUF + n.to(tl.int64) * R + idx // C, mask=emask, other=0.0)
            c = tl.load(CBUF + n.to(tl.int64) * C + idx % C, mask=emask, other=0.0)
            u = pn * r * c * b2s
            v_new = u  # unused
        else:
            v_old = tl.load(V + n.to(tl.int64) * numel + idx, mask=emask, other=1.0)
            v_new = v_old * beta2 + beta2w * (g * g)
            denom = (tl.sqrt(v_new + 1e-15) + eps1) / b2s
            u = pn / denom
        if CLIP:
            ss = _partial_sum(UPART, n, F, FB)
            u = u * (1.0 / tl.maximum(tl.sqrt(ss / numel) / clip, 1.0))
        m_new = pos_new
        m2_new = neg_new
        d = u
    return g, m_new, m2_new, d, v_new, p


@triton.jit
def pnm_sumsq_kernel(G, P, MU, RBUF, CBUF, V, M, MS, M2, MS2, COEF, UPART, numel, R, C, F, EPP,
                     MB, sign, beta1, beta2, beta2w, eps1, clip, wd, beta0, inv_noise,
                     GC: tl.constexpr, FACTORED: tl.constexpr, MCODEC: tl.constexpr,
                     G_DT: tl.constexpr, P_DT: tl.constexpr, BLOCK: tl.constexpr,
                     FB: tl.constexpr):
    """AdaPNM's ``sum U**2`` per flat range (U needs the momenta, unlike Adakaon's u)."""
    n = tl.program_id(0)
    f = tl.program_id(1)
    lo = f * EPP
    hi = tl.minimum(lo + EPP, numel)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(lo, hi, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        emask = idx < hi
        _, _, _, u, _, _ = _step_values(
            G, P, MU, RBUF, CBUF, V, M, MS, M2, MS2, COEF, UPART, n, idx, emask, numel, R, C,
            F, MB, sign, beta1, beta2, beta2w, eps1, clip, wd, beta0, inv_noise,
            2, GC, FACTORED, MCODEC, G_DT, P_DT, False, False, FB)
        acc += tl.where(emask, u * u, 0.0)
    tl.store(UPART + n * F + f, tl.sum(acc, axis=0))


@triton.jit
def _absmax_into(AMAX, n, idx, emask, x, numel, R, C, MB, MCODEC: tl.constexpr):
    if MCODEC == 3:
        tl.atomic_max(AMAX + n.to(tl.int64) * R + idx // C, tl.abs(x), mask=emask)
    if MCODEC == 4:
        nblocks = (numel + MB - 1) // MB
        tl.atomic_max(AMAX + n.to(tl.int64) * nblocks + idx // MB, tl.abs(x), mask=emask)


@triton.jit
def moment_kernel(G, P, MU, RBUF, CBUF, V, M, MS, M2, MS2, COEF, UPART, CPART, AMAX, AMAX2,
                  numel, R, C, F, EPP, MB, sign, beta1, beta2, beta2w, eps1, clip, wd, beta0,
                  inv_noise, RULE: tl.constexpr, GC: tl.constexpr, FACTORED: tl.constexpr,
                  MCODEC: tl.constexpr, G_DT: tl.constexpr, P_DT: tl.constexpr,
                  WD: tl.constexpr, CLIP: tl.constexpr, CAUTIOUS: tl.constexpr,
                  BLOCK: tl.constexpr, FB: tl.constexpr, NEKAON: tl.constexpr = False):
    n = tl.program_id(0)
    f = tl.program_id(1)
    lo = f * EPP
    hi = tl.minimum(lo + EPP, numel)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for s in range(lo, hi, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        emask = idx < hi
        g, m_new, m2_new, d, _, _ = _step_values(
            G, P, MU, RBUF, CBUF, V, M, MS, M2, MS2, COEF, UPART, n, idx, emask, numel, R, C,
            F, MB, sign, beta1, beta2, beta2w, eps1, clip, wd, beta0, inv_noise,
            RULE, GC, FACTORED, MCODEC, G_DT, P_DT, WD, CLIP, FB, NEKAON)
        if CAUTIOUS:
            count += (emask & (d * g > 0)).to(tl.int32)
        _absmax_into(AMAX, n, idx, emask, m_new, numel, R, C, MB, MCODEC)
        if RULE == 2:
            _absmax_into(AMAX2, n, idx, emask, m2_new, numel, R, C, MB, MCODEC)
    tl.store(CPART + n * F + f, tl.sum(count, axis=0).to(tl.float32))


@triton.jit
def _encode_m(AMAX, n, idx, emask, m_new, numel, R, C, MB, MCODEC: tl.constexpr):
    """The stored value of the new momentum (int8 / 4-bit level; float values as is)."""
    if MCODEC == 3:
        a = tl.load(AMAX + n.to(tl.int64) * R + idx // C, mask=emask, other=1.0)
        scale = tl.maximum(a, 1e-12) / 127.0
        q = _round_half_even(m_new / scale)
    elif MCODEC == 4:
        nblocks = (numel + MB - 1) // MB
        a = tl.load(AMAX + n.to(tl.int64) * nblocks + idx // MB, mask=emask, other=1.0)
        scale = tl.maximum(a, 1e-12) / 7.0
        q = _round_half_even(m_new / scale)
    else:
        q = m_new
    return q


@triton.jit
def _as_stored(AMAX, n, idx, emask, m_new, numel, R, C, MB, MCODEC: tl.constexpr):
    """The new momentum as the next step will decode it."""
    if MCODEC == 3:
        a = tl.load(AMAX + n.to(tl.int64) * R + idx // C, mask=emask, other=1.0)
        scale = tl.maximum(a, 1e-12) / 127.0
        x = _round_half_even(m_new / scale) * scale
    elif MCODEC == 4:
        nblocks = (numel + MB - 1) // MB
        a = tl.load(AMAX + n.to(tl.int64) * nblocks + idx // MB, mask=emask, other=1.0)
        scale = tl.maximum(a, 1e-12) / 7.0
        x = _round_half_even(m_new / scale) * scale
    elif MCODEC == 2:
        x = _rne_bf16(m_new).to(tl.float32)
    else:
        x = m_new
    return x


@triton.jit
def _write_param(P, n, idx, emask, z, seed, numel, P_DT: tl.constexpr, SR: tl.constexpr):
    p_ptr = _ptr(P, n, P_DT)
    if SR:
        noise = (tl.randint(seed, n.to(tl.int64) * numel + idx) & 0xFFFF).to(tl.int32)
        bits = (z.to(tl.int32, bitcast=True) + noise) & -65536
        tl.store(p_ptr + idx, bits.to(tl.float32, bitcast=True).to(P_DT), mask=emask)
    else:
        _store_as(p_ptr + idx, z, emask, P_DT)


@triton.jit
def apply_kernel(G, P, MU, RBUF, CBUF, V, M, MS, M2, MS2, COEF, UPART, CPART, AMAX, AMAX2, OK,
                 SEED, numel, R, C, F, EPP, MB, sign, beta1, beta2, beta2w, eps1, clip, wd,
                 beta0, inv_noise, lr,
                 RULE: tl.constexpr, GC: tl.constexpr, FACTORED: tl.constexpr,
                 MCODEC: tl.constexpr, G_DT: tl.constexpr, P_DT: tl.constexpr,
                 M_DT: tl.constexpr, WD: tl.constexpr, CLIP: tl.constexpr,
                 CAUTIOUS: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr,
                 FB: tl.constexpr, NEKAON: tl.constexpr = False, CLIMB: tl.constexpr = False,
                 kscale=0.0, kbound=0.0):
    """Program (n, f) writes element pairs [lo, hi) of tensor n; EPP is even. Nekaon: the
    weights move by ``delta + e_old - e_new``, ``e_new`` from the momentum as stored and the new
    climb record ``(kscale, kbound)``."""
    n = tl.program_id(0)
    f = tl.program_id(1)
    half: tl.constexpr = BLOCK // 2
    ok = _flag(OK, n, half)
    lo = f * EPP
    hi = tl.minimum(lo + EPP, numel)
    numel_f = numel * 1.0
    if RULE == 2:
        size = tl.load(COEF + n * 3 + tl.zeros([half], dtype=tl.int32))
    else:
        size = tl.zeros([half], dtype=tl.float32) + lr
    if CAUTIOUS:
        cnt = _partial_sum(CPART, n, F, FB)
        scale = (numel_f / tl.maximum(cnt, 1e-8 * numel_f)) * size
    else:
        scale = size
    seed = tl.load(SEED)
    for s in range(lo, hi, BLOCK):
        pair = s // 2 + tl.arange(0, half)
        for j in tl.static_range(2):
            idx = 2 * pair + j
            emask = idx < hi
            g, m_new, m2_new, d, v_new, p = _step_values(
                G, P, MU, RBUF, CBUF, V, M, MS, M2, MS2, COEF, UPART, n, idx, emask, numel, R,
                C, F, MB, sign, beta1, beta2, beta2w, eps1, clip, wd, beta0, inv_noise,
                RULE, GC, FACTORED, MCODEC, G_DT, P_DT, WD, CLIP, FB, NEKAON)
            if CAUTIOUS:  # noqa: SIM108 (a Triton constexpr branch)
                delta = tl.where(d * g > 0, d, 0.0) * scale
            else:
                delta = d * scale
            if RULE == 2 and WD:  # AdaPNM's decay is not masked
                delta = delta + wd * p
            if NEKAON:
                delta = delta + m2_new
                if CLIMB:
                    delta = delta - _displacement(
                        _as_stored(AMAX, n, idx, emask, m_new, numel, R, C, MB, MCODEC),
                        kscale, kbound)
            _write_param(P, n, idx, emask & ok, p - delta, seed, numel, P_DT, SR)
            if not FACTORED:
                tl.store(V + n.to(tl.int64) * numel + idx, v_new, mask=emask & ok)
            if MCODEC != 0:
                q = _encode_m(AMAX, n, idx, emask, m_new, numel, R, C, MB, MCODEC)
                if RULE == 2:
                    q2 = _encode_m(AMAX2, n, idx, emask, m2_new, numel, R, C, MB, MCODEC)
                if MCODEC == 4:
                    nib = (q + 8.0).to(tl.int32)
                    if RULE == 2:
                        nib2 = (q2 + 8.0).to(tl.int32)
                    if j == 0:
                        low = nib
                        if RULE == 2:
                            low2 = nib2
                    else:
                        high = tl.where(emask, nib, 0)
                        if RULE == 2:
                            high2 = tl.where(emask, nib2, 0)
                else:
                    _store_as(M + n.to(tl.int64) * numel + idx, q, emask & ok, M_DT)
                    if RULE == 2:
                        _store_as(M2 + n.to(tl.int64) * numel + idx, q2, emask & ok, M_DT)
        if MCODEC == 4:
            nbytes = (numel + 1) // 2
            bmask = (2 * pair < hi) & ok
            tl.store(M + n.to(tl.int64) * nbytes + pair, (low | (high << 4)).to(tl.uint8),
                     mask=bmask)
            if RULE == 2:
                tl.store(M2 + n.to(tl.int64) * nbytes + pair,
                         (low2 | (high2 << 4)).to(tl.uint8), mask=bmask)


# ------------------------------------------------------------------------------------ AdamW
# second-moment codecs (constexpr): 1 float32, 2 bfloat16, 5 log8, 6 log4


@triton.jit
def _decode_v(V, VS, VO, n, idx, emask, numel, VB, VCODEC: tl.constexpr, STEPS: tl.constexpr):
    if VCODEC == 1:
        v = tl.load(V + n.to(tl.int64) * numel + idx, mask=emask, other=0.0)
    elif VCODEC == 2:
        v = tl.load(V + n.to(tl.int64) * numel + idx, mask=emask, other=0.0).to(tl.float32)
    else:
        if VCODEC == 5:
            q = tl.load(V + n.to(tl.int64) * numel + idx, mask=emask, other=0).to(tl.int32)
        else:
            nbytes = (numel + 1) // 2
            byte = tl.load(V + n.to(tl.int64) * nbytes + idx // 2, mask=emask, other=0)
            byte = byte.to(tl.int32)
            q = tl.where((idx % 2) == 0, byte & 0x0F, (byte >> 4) & 0x0F)
        nblocks = (numel + VB - 1) // VB
        span = tl.load(VS + n.to(tl.int64) * nblocks + idx // VB, mask=emask, other=1.0)
        lo = tl.load(VO + n.to(tl.int64) * nblocks + idx // VB, mask=emask, other=0.0)
        # float64, as the reference decodes (the value must not depend on the device's exp2)
        log2 = (q.to(tl.float64) - 1.0) * (span.to(tl.float64) / STEPS) + lo.to(tl.float64)
        v = tl.where(q > 0, tl.exp2(log2), 0.0).to(tl.float32)
    return v


@triton.jit
def _adam_values(G, P, M, MS, V, VS, VO, COEF, n, idx, emask, numel, R, C, MB, VB, sign,
                 beta1, beta2, eps, MCODEC: tl.constexpr, VCODEC: tl.constexpr,
                 STEPS: tl.constexpr, G_DT: tl.constexpr, P_DT: tl.constexpr):
    """(new m, new v, the direction, p); COEF [N, 2] = (1 - beta1^t, sqrt(1 - beta2^t))."""
    g = tl.load(_ptr(G, n, G_DT) + idx, mask=emask, other=0.0).to(tl.float32) * sign
    p = tl.load(_ptr(P, n, P_DT) + idx, mask=emask, other=0.0).to(tl.float32)
    m_old = _decode_m(M, MS, n, idx, emask, numel, R, C, MB, MCODEC)
    v_old = _decode_v(V, VS, VO, n, idx, emask, numel, VB, VCODEC, STEPS)
    m_new = _lerp(m_old, g, 1.0 - beta1)
    v_new = v_old * beta2 + (1.0 - beta2) * g * g  # torch's addcmul order
    zero = tl.zeros_like(g).to(tl.int32)
    bc1 = tl.load(COEF + n * 2 + zero)
    bc2s = tl.load(COEF + n * 2 + 1 + zero)
    denom = tl.sqrt(v_new) / bc2s + eps
    return m_new, v_new, (m_new / denom) / bc1, p


@triton.jit
def adam_moment_kernel(G, P, M, MS, V, VS, VO, COEF, AMAX, VHI, VLO, numel, R, C, EPP, MB, VB,
                       sign, beta1, beta2, eps, MCODEC: tl.constexpr, VCODEC: tl.constexpr,
                       STEPS: tl.constexpr, G_DT: tl.constexpr, P_DT: tl.constexpr,
                       BLOCK: tl.constexpr):
    """The absmax of the new first moment per int8 row / 4-bit block, and the log2 range of the
    new second moment's non-zero values per log-space block (``atomic_max`` of ``log2`` and of
    ``-log2``: exact in any order)."""
    n = tl.program_id(0)
    f = tl.program_id(1)
    lo = f * EPP
    hi = tl.minimum(lo + EPP, numel)
    for s in range(lo, hi, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        emask = idx < hi
        m_new, v_new, _, _ = _adam_values(G, P, M, MS, V, VS, VO, COEF, n, idx, emask, numel, R,
                                          C, MB, VB, sign, beta1, beta2, eps, MCODEC, VCODEC,
                                          STEPS, G_DT, P_DT)
        _absmax_into(AMAX, n, idx, emask, m_new, numel, R, C, MB, MCODEC)
        if VCODEC >= 5:
            nz = emask & (v_new > 0)
            log2 = tl.log2(tl.where(nz, v_new, 1.0).to(tl.float64)).to(tl.float32)
            nblocks = (numel + VB - 1) // VB
            key = n.to(tl.int64) * nblocks + idx // VB
            tl.atomic_max(VHI + key, log2, mask=nz)
            tl.atomic_max(VLO + key, -log2, mask=nz)


@triton.jit
def _encode_v(VS, VO, n, idx, emask, v_new, numel, VB, STEPS: tl.constexpr):
    nblocks = (numel + VB - 1) // VB
    span = tl.load(VS + n.to(tl.int64) * nblocks + idx // VB, mask=emask, other=1.0)
    lo = tl.load(VO + n.to(tl.int64) * nblocks + idx // VB, mask=emask, other=0.0)
    nz = v_new > 0
    log2 = tl.log2(tl.where(nz, v_new, 1.0).to(tl.float64)).to(tl.float32)
    q = _round_half_even((log2 - lo) * (STEPS / span)) + 1.0
    q = tl.minimum(tl.maximum(q, 1.0), STEPS + 1.0)
    return tl.where(nz, q, 0.0).to(tl.int32)


@triton.jit
def adam_apply_kernel(G, P, M, MS, V, VS, VO, COEF, AMAX, NVS, NVO, OK, SEED, numel, R, C, EPP,
                      MB, VB, sign, beta1, beta2, eps, lr, kept,
                      MCODEC: tl.constexpr, VCODEC: tl.constexpr, STEPS: tl.constexpr,
                      G_DT: tl.constexpr, P_DT: tl.constexpr, M_DT: tl.constexpr,
                      WD: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr):
    """``p <- p - (lr * direction + (p - p * kept))`` (torch's decoupled decay), the moments
    encoded (NVS / NVO: the new log-space span and offset per block)."""
    n = tl.program_id(0)
    f = tl.program_id(1)
    half: tl.constexpr = BLOCK // 2
    ok = _flag(OK, n, half)
    lo = f * EPP
    hi = tl.minimum(lo + EPP, numel)
    seed = tl.load(SEED)
    for s in range(lo, hi, BLOCK):
        pair = s // 2 + tl.arange(0, half)
        for j in tl.static_range(2):
            idx = 2 * pair + j
            emask = idx < hi
            m_new, v_new, direction, p = _adam_values(
                G, P, M, MS, V, VS, VO, COEF, n, idx, emask, numel, R, C, MB, VB, sign, beta1,
                beta2, eps, MCODEC, VCODEC, STEPS, G_DT, P_DT)
            delta = direction * lr
            if WD:
                delta = delta + (p - p * kept)
            _write_param(P, n, idx, emask & ok, p - delta, seed, numel, P_DT, SR)
            q = _encode_m(AMAX, n, idx, emask, m_new, numel, R, C, MB, MCODEC)
            if MCODEC == 4:
                nib = (q + 8.0).to(tl.int32)
                if j == 0:
                    low = nib
                else:
                    high = tl.where(emask, nib, 0)
            else:
                _store_as(M + n.to(tl.int64) * numel + idx, q, emask & ok, M_DT)
            if VCODEC <= 2:
                _store_as(V + n.to(tl.int64) * numel + idx, v_new, emask & ok,
                          tl.float32 if VCODEC == 1 else tl.bfloat16)
            else:
                code = _encode_v(NVS, NVO, n, idx, emask, v_new, numel, VB, STEPS)
                if VCODEC == 5:
                    tl.store(V + n.to(tl.int64) * numel + idx, code.to(tl.uint8),
                             mask=emask & ok)
                elif j == 0:
                    vlow = code
                else:
                    vhigh = tl.where(emask, code, 0)
        nbytes = (numel + 1) // 2
        bmask = (2 * pair < hi) & ok
        if MCODEC == 4:
            tl.store(M + n.to(tl.int64) * nbytes + pair, (low | (high << 4)).to(tl.uint8),
                     mask=bmask)
        if VCODEC == 6:
            tl.store(V + n.to(tl.int64) * nbytes + pair, (vlow | (vhigh << 4)).to(tl.uint8),
                     mask=bmask)
