"""Triton kernels for the Haar transforms: one analysis and one synthesis kernel serve every op.

`haar_analysis(x, xi, xv, ...)`: x (B, C, T, H, W) -> xi (B, 4C, 1, Ho, Wo) from frame 0 and/or
xv (B, n*C, To, Ho, Wo) from frames f0.. (f0 = 1 when xi is produced), in one launch (the patch transform).
`haar_synthesis(xi, xv, y, ...)`: the inverse, or the adjoint of the analysis for odd sizes (reflected
samples fold back onto sample N-2), in one launch (the unpatch transform and every backward).

Each program owns a tile of 2x2x2 (2x2 for the 2-D frame) blocks of one (b, c, frame pair). Loads of a
row read 2*BW contiguous samples and split them into even/odd columns; stores of the synthesis
interleave them back, so global memory is accessed in contiguous runs. The butterflies are the ones of
csrc/common/haar_tree.h in the same order; the odd-size folds are gathered in the same order as the CPU
kernel, so float32 results agree with the CPU backend bit for bit. Offsets are int64.
"""
import triton
import triton.language as tl

from .._triton import next_power_of_2


# ------------------------------------------------------------------------------------------ helpers
@triton.jit
def _load_pairs(row_ptr, wo, W, Wo, sw, mr, BW: tl.constexpr):
    """Even and odd samples (x[2wo], x[2wo+1]) of a tile of rows; an odd W reflects (x[W] := x[W-2]).

    row_ptr: (BH, 1) pointers to w = 0 of each row; mr: (BH, 1) row mask; wo: (1, BW) block columns.
    """
    w = (tl.program_id(2) * (2 * BW) + tl.arange(0, 2 * BW))[None, :].to(tl.int64)
    v = tl.load(row_ptr + w * sw, mask=mr & (w < W), other=0.0).to(tl.float32)
    even, odd = tl.split(tl.reshape(v, (v.shape[0], BW, 2)))
    if W % 2 == 1:
        # The reflected sample of the last block is x[W-2], the odd sample of the block before it.
        last = tl.load(row_ptr + (W - 2) * sw, mask=mr, other=0.0).to(tl.float32)
        odd = tl.where(wo == Wo - 1, last, odd)
    return even, odd


@triton.jit
def _band(ptr, off, m, C, c, sc, SLOT: tl.constexpr, ON: tl.constexpr):
    """One band tile of a 3-D coefficient tensor (zero for a dropped or masked band)."""
    if ON and SLOT >= 0:
        return tl.load(ptr + off + (SLOT * C + c) * sc, mask=m, other=0.0).to(tl.float32)
    else:
        return tl.zeros(off.shape, tl.float32)


@triton.jit
def _store_band(ptr, off, m, C, c, sc, v, scale, SLOT: tl.constexpr, ON: tl.constexpr):
    if SLOT >= 0:
        if ON:
            tl.store(ptr + off + (SLOT * C + c) * sc, (v * scale).to(ptr.dtype.element_ty), mask=m)
        else:
            tl.store(ptr + off + (SLOT * C + c) * sc, tl.zeros(off.shape, ptr.dtype.element_ty), mask=m)


@triton.jit
def _syn3(xv_ptr, base, ho, wo, m, C, c, svc, svh, svw,
          S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
          S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr, MASK: tl.constexpr):
    """The 8 outputs y[(pt*2+ph)*2+pw] of the 3-D blocks (ho, wo) at `base` (frame block to)."""
    off = base + ho.to(tl.int64) * svh + wo.to(tl.int64) * svw
    b0 = _band(xv_ptr, off, m, C, c, svc, S0, (MASK >> 0) & 1 == 1)
    b1 = _band(xv_ptr, off, m, C, c, svc, S1, (MASK >> 1) & 1 == 1)
    b2 = _band(xv_ptr, off, m, C, c, svc, S2, (MASK >> 2) & 1 == 1)
    b3 = _band(xv_ptr, off, m, C, c, svc, S3, (MASK >> 3) & 1 == 1)
    b4 = _band(xv_ptr, off, m, C, c, svc, S4, (MASK >> 4) & 1 == 1)
    b5 = _band(xv_ptr, off, m, C, c, svc, S5, (MASK >> 5) & 1 == 1)
    b6 = _band(xv_ptr, off, m, C, c, svc, S6, (MASK >> 6) & 1 == 1)
    b7 = _band(xv_ptr, off, m, C, c, svc, S7, (MASK >> 7) & 1 == 1)
    # W stage: w[(bt, bh, pw)]
    w000 = b0 + b1
    w001 = b0 - b1
    w010 = b2 + b3
    w011 = b2 - b3
    w100 = b4 + b5
    w101 = b4 - b5
    w110 = b6 + b7
    w111 = b6 - b7
    # H stage: h[(bt, ph, pw)]
    h000 = w000 + w010
    h001 = w001 + w011
    h010 = w000 - w010
    h011 = w001 - w011
    h100 = w100 + w110
    h101 = w101 + w111
    h110 = w100 - w110
    h111 = w101 - w111
    # T stage: y[(pt, ph, pw)]
    return (h000 + h100, h001 + h101, h010 + h110, h011 + h111,
            h000 - h100, h001 - h101, h010 - h110, h011 - h111)


@triton.jit
def _syn2(xi_ptr, base, ho, wo, m, C, c, sic, sih, siw):
    """The 4 outputs y[ph*2+pw] of the 2-D blocks (ho, wo) of frame 0 (bands 2*bw + bh)."""
    off = base + ho.to(tl.int64) * sih + wo.to(tl.int64) * siw
    b0 = tl.load(xi_ptr + off + c * sic, mask=m, other=0.0).to(tl.float32)
    b1 = tl.load(xi_ptr + off + (C + c) * sic, mask=m, other=0.0).to(tl.float32)
    b2 = tl.load(xi_ptr + off + (2 * C + c) * sic, mask=m, other=0.0).to(tl.float32)
    b3 = tl.load(xi_ptr + off + (3 * C + c) * sic, mask=m, other=0.0).to(tl.float32)
    l0 = b0 + b1
    l1 = b0 - b1
    h0 = b2 + b3
    h1 = b2 - b3
    return l0 + h0, l0 - h0, l1 + h1, l1 - h1


@triton.jit
def _store_row_pair(y_row, even, odd, W, sw, mr, BW: tl.constexpr):
    """Stores the interleaved samples (even, odd) of a tile of rows (row mask mr: (BH, 1)); the
    reflected sample w = W of an odd W is not stored (it was gathered into w = W-2)."""
    w = (tl.program_id(2) * (2 * BW) + tl.arange(0, 2 * BW))[None, :].to(tl.int64)
    tl.store(y_row + w * sw, tl.interleave(even, odd).to(y_row.dtype.element_ty), mask=mr & (w < W))


# ------------------------------------------------------------------------------------------- kernels
@triton.jit
def _haar_analysis_kernel(
    x_ptr, xi_ptr, xv_ptr,
    C, H, W, Ho, Wo, Tv, PARTS,
    sxb, sxc, sxt, sxh, sxw,
    sib, sic, sih, siw,
    svb, svc, svt, svh, svw,
    scale2, scale3,
    F0: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
    S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr, MASK: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr,
):
    pid = tl.program_id(0)
    part = pid % PARTS
    bc = (pid // PARTS).to(tl.int64)
    b = bc // C
    c = bc % C
    ho = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
    wo = tl.program_id(2) * BW + tl.arange(0, BW)[None, :]
    mr = ho < Ho
    m = mr & (wo < Wo)
    h0 = (2 * ho).to(tl.int64)
    h1 = tl.where(2 * ho + 1 < H, 2 * ho + 1, H - 2).to(tl.int64)
    xb = x_ptr + b * sxb + c * sxc
    if part < F0:
        # 2-D transform of frame 0: W stage, then H; band 2*bw + bh.
        e0, o0 = _load_pairs(xb + h0 * sxh, wo, W, Wo, sxw, mr, BW)
        e1, o1 = _load_pairs(xb + h1 * sxh, wo, W, Wo, sxw, mr, BW)
        l0 = e0 + o0
        g0 = e0 - o0
        l1 = e1 + o1
        g1 = e1 - o1
        off = b * sib + ho.to(tl.int64) * sih + wo.to(tl.int64) * siw
        dt = xi_ptr.dtype.element_ty
        tl.store(xi_ptr + off + c * sic, ((l0 + l1) * scale2).to(dt), mask=m)
        tl.store(xi_ptr + off + (C + c) * sic, ((l0 - l1) * scale2).to(dt), mask=m)
        tl.store(xi_ptr + off + (2 * C + c) * sic, ((g0 + g1) * scale2).to(dt), mask=m)
        tl.store(xi_ptr + off + (3 * C + c) * sic, ((g0 - g1) * scale2).to(dt), mask=m)
    else:
        to = part - F0
        t0 = F0 + 2 * to
        t1 = F0 + tl.where(2 * to + 1 < Tv, 2 * to + 1, Tv - 2)
        f0b = xb + t0.to(tl.int64) * sxt
        f1b = xb + t1.to(tl.int64) * sxt
        a000, a001 = _load_pairs(f0b + h0 * sxh, wo, W, Wo, sxw, mr, BW)
        a010, a011 = _load_pairs(f0b + h1 * sxh, wo, W, Wo, sxw, mr, BW)
        a100, a101 = _load_pairs(f1b + h0 * sxh, wo, W, Wo, sxw, mr, BW)
        a110, a111 = _load_pairs(f1b + h1 * sxh, wo, W, Wo, sxw, mr, BW)
        # T stage: t[(bt, ph, pw)]
        t000 = a000 + a100
        t001 = a001 + a101
        t010 = a010 + a110
        t011 = a011 + a111
        t100 = a000 - a100
        t101 = a001 - a101
        t110 = a010 - a110
        t111 = a011 - a111
        # H stage: h[(bt, bh, pw)]
        h000 = t000 + t010
        h001 = t001 + t011
        h010 = t000 - t010
        h011 = t001 - t011
        h100 = t100 + t110
        h101 = t101 + t111
        h110 = t100 - t110
        h111 = t101 - t111
        off = b * svb + to.to(tl.int64) * svt + ho.to(tl.int64) * svh + wo.to(tl.int64) * svw
        _store_band(xv_ptr, off, m, C, c, svc, h000 + h001, scale3, S0, (MASK >> 0) & 1 == 1)
        _store_band(xv_ptr, off, m, C, c, svc, h000 - h001, scale3, S1, (MASK >> 1) & 1 == 1)
        _store_band(xv_ptr, off, m, C, c, svc, h010 + h011, scale3, S2, (MASK >> 2) & 1 == 1)
        _store_band(xv_ptr, off, m, C, c, svc, h010 - h011, scale3, S3, (MASK >> 3) & 1 == 1)
        _store_band(xv_ptr, off, m, C, c, svc, h100 + h101, scale3, S4, (MASK >> 4) & 1 == 1)
        _store_band(xv_ptr, off, m, C, c, svc, h100 - h101, scale3, S5, (MASK >> 5) & 1 == 1)
        _store_band(xv_ptr, off, m, C, c, svc, h110 + h111, scale3, S6, (MASK >> 6) & 1 == 1)
        _store_band(xv_ptr, off, m, C, c, svc, h110 - h111, scale3, S7, (MASK >> 7) & 1 == 1)


@triton.jit
def _haar_synthesis_kernel(
    xi_ptr, xv_ptr, y_ptr,
    C, H, W, Ho, Wo, Tv, To, PARTS,
    sib, sic, sih, siw,
    svb, svc, svt, svh, svw,
    syb, syc, syt, syh, syw,
    scale2, scale3,
    F0: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
    S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr, MASK: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr,
):
    pid = tl.program_id(0)
    part = pid % PARTS
    bc = (pid // PARTS).to(tl.int64)
    b = bc // C
    c = bc % C
    ho = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
    wo = tl.program_id(2) * BW + tl.arange(0, BW)[None, :]
    m = (ho < Ho) & (wo < Wo)
    # Odd H/W: the blocks Ho-2 / Wo-2 also gather the reflected samples of the last block (parity 1).
    fold_h = (H % 2 == 1) & (ho == Ho - 2)
    fold_w = (W % 2 == 1) & (wo == Wo - 2)
    tile_h = (H % 2 == 1) & (tl.program_id(1) * BH <= Ho - 2) & (Ho - 2 < tl.program_id(1) * BH + BH)
    tile_w = (W % 2 == 1) & (tl.program_id(2) * BW <= Wo - 2) & (Wo - 2 < tl.program_id(2) * BW + BW)
    yb = y_ptr + b * syb + c * syc
    r0 = (2 * ho).to(tl.int64) * syh
    r1 = (2 * ho + 1).to(tl.int64) * syh
    m0 = ho < Ho
    m1 = m0 & (2 * ho + 1 < H)
    if part < F0:
        base = b * sib
        y00, y01, y10, y11 = _syn2(xi_ptr, base, ho, wo, m, C, c, sic, sih, siw)
        if tile_h:
            _, _, u10, u11 = _syn2(xi_ptr, base, ho + 1, wo, m & fold_h, C, c, sic, sih, siw)
            y10 += u10
            y11 += u11
        if tile_w:
            _, v01, _, v11 = _syn2(xi_ptr, base, ho, wo + 1, m & fold_w, C, c, sic, sih, siw)
            if tile_h:
                _, _, _, q11 = _syn2(xi_ptr, base, ho + 1, wo + 1, m & fold_h & fold_w, C, c, sic, sih, siw)
                v11 += q11
            y01 += v01
            y11 += v11
        _store_row_pair(yb + r0, y00 * scale2, y01 * scale2, W, syw, m0, BW)
        _store_row_pair(yb + r1, y10 * scale2, y11 * scale2, W, syw, m1, BW)
    else:
        to = part - F0
        fold_t = (Tv % 2 == 1) & (to == To - 2)
        base = b * svb + to.to(tl.int64) * svt
        nxt = base + svt
        y000, y001, y010, y011, y100, y101, y110, y111 = _syn3(
            xv_ptr, base, ho, wo, m, C, c, svc, svh, svw, S0, S1, S2, S3, S4, S5, S6, S7, MASK)
        # The order of the gathered terms is the CPU kernel's: (t, h) sources in order, then the W fold.
        if tile_h:
            _, _, u010, u011, _, _, u110, u111 = _syn3(
                xv_ptr, base, ho + 1, wo, m & fold_h, C, c, svc, svh, svw, S0, S1, S2, S3, S4, S5, S6, S7, MASK)
            y010 += u010
            y011 += u011
            y110 += u110
            y111 += u111
        if fold_t:
            _, _, _, _, u100, u101, u110, u111 = _syn3(
                xv_ptr, nxt, ho, wo, m, C, c, svc, svh, svw, S0, S1, S2, S3, S4, S5, S6, S7, MASK)
            y100 += u100
            y101 += u101
            y110 += u110
            y111 += u111
            if tile_h:
                _, _, _, _, _, _, u110, u111 = _syn3(
                    xv_ptr, nxt, ho + 1, wo, m & fold_h, C, c, svc, svh, svw, S0, S1, S2, S3, S4, S5, S6, S7, MASK)
                y110 += u110
                y111 += u111
        if tile_w:
            mw = m & fold_w
            _, v001, _, v011, _, v101, _, v111 = _syn3(
                xv_ptr, base, ho, wo + 1, mw, C, c, svc, svh, svw, S0, S1, S2, S3, S4, S5, S6, S7, MASK)
            if tile_h:
                _, _, _, q011, _, _, _, q111 = _syn3(
                    xv_ptr, base, ho + 1, wo + 1, mw & fold_h, C, c, svc, svh, svw, S0, S1, S2, S3, S4, S5, S6, S7, MASK)
                v011 += q011
                v111 += q111
            if fold_t:
                _, _, _, _, _, q101, _, q111 = _syn3(
                    xv_ptr, nxt, ho, wo + 1, mw, C, c, svc, svh, svw, S0, S1, S2, S3, S4, S5, S6, S7, MASK)
                v101 += q101
                v111 += q111
                if tile_h:
                    _, _, _, _, _, _, _, q111 = _syn3(
                        xv_ptr, nxt, ho + 1, wo + 1, mw & fold_h, C, c, svc, svh, svw, S0, S1, S2, S3, S4, S5, S6, S7, MASK)
                    v111 += q111
            y001 += v001
            y011 += v011
            y101 += v101
            y111 += v111
        t0 = F0 + 2 * to
        f0 = yb + t0.to(tl.int64) * syt
        _store_row_pair(f0 + r0, y000 * scale3, y001 * scale3, W, syw, m0, BW)
        _store_row_pair(f0 + r1, y010 * scale3, y011 * scale3, W, syw, m1, BW)
        if 2 * to + 1 < Tv:  # frame 2*to+1 is real; for an odd Tv the last block's second frame folds
            f1 = f0 + syt
            _store_row_pair(f1 + r0, y100 * scale3, y101 * scale3, W, syw, m0, BW)
            _store_row_pair(f1 + r1, y110 * scale3, y111 * scale3, W, syw, m1, BW)


# ----------------------------------------------------------------------------------------- launchers
def _tiles(ho, wo):
    # 4 x 64 blocks per program: compiled for sm_90 the synthesis needs 64 registers per thread at this
    # size (221 at 16 x 64), the analysis 40, so enough warps stay resident to keep memory busy.
    return min(4, next_power_of_2(ho)), min(64, next_power_of_2(wo))


def _slot_args(slots, mask):
    return {f"S{k}": int(s) for k, s in enumerate(slots)} | {"MASK": int(mask)}


def _strides(t, ndim=5):
    return tuple(t.stride()) if t is not None else (0,) * ndim


def haar_analysis(x, xi, xv, slots, mask, s2, s3):
    """Fills xi (frame 0, 2-D) and/or xv (frames f0.., 3-D) from x; see the module docstring."""
    b, c, t, h, w = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    f0 = 1 if xi is not None else 0
    tv = t - f0
    parts = f0 + ((tv + 1) // 2 if xv is not None else 0)
    bh, bw = _tiles(ho, wo)
    si = _strides(xi)
    sv = _strides(xv)
    grid = (b * c * parts, triton.cdiv(ho, bh), triton.cdiv(wo, bw))
    _haar_analysis_kernel[grid](
        x, x if xi is None else xi, x if xv is None else xv,
        c, h, w, ho, wo, tv, parts,
        *x.stride(), si[0], si[1], si[3], si[4], *sv,
        float(s2), float(s3),
        F0=f0, **_slot_args(slots, mask), BH=bh, BW=bw, num_warps=4,
    )


def haar_synthesis(xi, xv, y, slots, mask, s2, s3):
    """Fills y (B, C, T, H, W) from xi (frame 0) and/or xv (frames f0..); see the module docstring."""
    b, c, t, h, w = y.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    f0 = 1 if xi is not None else 0
    tv = t - f0 if xv is not None else 0
    to = (tv + 1) // 2
    parts = f0 + to
    bh, bw = _tiles(ho, wo)
    si = _strides(xi)
    sv = _strides(xv)
    ref = xv if xv is not None else xi
    grid = (b * c * parts, triton.cdiv(ho, bh), triton.cdiv(wo, bw))
    _haar_synthesis_kernel[grid](
        ref if xi is None else xi, ref if xv is None else xv, y,
        c, h, w, ho, wo, tv, to, parts,
        si[0], si[1], si[3], si[4], *sv, *y.stride(),
        float(s2), float(s3),
        F0=f0, **_slot_args(slots, mask), BH=bh, BW=bw, num_warps=4,
    )
