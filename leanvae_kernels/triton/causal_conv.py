"""Triton kernels for the causal depthwise 3x3x3 conv on channels-last tokens (the model's PEG3D).

Contract: leanvae_kernels/ops/causal_conv.py. Temporal structure shared with the C++ kernels: output
frame t reads frame t - OFF + i through temporal tap i (OFF = 2 causal, 1 group-causal); negative frames
are the cache (or zeros); in group mode a tap past the end of t's group reads zeros.

`_causal_dwconv3d_kernel` (forward and grad input): one program per (b, h, BLOCK_W columns, BLOCK_C
channels) walks the source frames once; each frame's 3x3 neighbourhood (shifted loads that hit the cache)
feeds three rolling accumulators, one per output frame the frame touches, so each input element comes from
memory about once. Grad input is the same correlation with spatially flipped taps and the temporal map
reversed.

`_causal_dwconv3d_wgrad_kernel`: contiguous blocks of tiles (BLOCK_W columns of one (b, t, h) row), one
program per (block, channel block): each tile's grad_y is read once and multiplied into 28 register tiles
(27 taps + bias), reduced once per program -> partial sums per (block, tap, channel), summed by
`_sum_partials_kernel` in a fixed order (deterministic; the block count is sized from the SM count, so
results are fixed per GPU model and differ between models by float rounding only).

Index arithmetic is int64 throughout (tensors past 2^31 elements; it also keeps Triton's interpreter from
checking every int32 operation for overflow, which dominates its run time).
"""
import torch
import triton
import triton.language as tl

from .._triton import interpreting
from ..ops._common import sm_count


@triton.jit
def _tap_valid(t, i, T, G, GROUP: tl.constexpr):
    """Whether output frame t's temporal tap i reads a frame (False: zeros past the end of t's group)."""
    if GROUP:
        # int32 division: a 64-bit one is a subroutine call on the GPU (registers spilled around it).
        start = ((t.to(tl.int32) // G) * G).to(tl.int64)
        return t - 1 + i < tl.minimum(T, start + G)
    else:
        return T >= 0  # always true, as a tensor (t and i may be compile-time constants here)


@triton.jit
def _conv_step(
    s, f_ptr, f_h, f_w, f_c, f_ok, acc0, acc1, acc2, init,
    wt, h, offs_w, offs_c, mask, out_ptr, pix_out, o_t, ocache_ptr, pix_q, q_t, res_ptr, pix_res, res_t,
    gnc_ptr, pix_gnc, gnc_t, T, H, W, C, G,
    BWD: tl.constexpr, GROUP: tl.constexpr, RESIDUAL: tl.constexpr, HAS_OCACHE: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Frame s (f_ptr: its first element for this batch; f_ok: it exists, else zeros) feeds three slots.
    # forward (BWD=False): slot k accumulates output s + OFF - 2 + k through tap i = 2 - k; afterwards slot 0
    #   is complete. The frame is copied to the new cache when s >= T - N.
    # grad input (BWD=True): the frame is grad_y[s]; slot k accumulates output e = s - OFF + k through tap
    #   i = k where the forward tap (s, k) is valid; afterwards slot 0 (e = s - OFF) is complete.
    OFF: tl.constexpr = 1 if GROUP else 2
    N: tl.constexpr = OFF
    if BWD:
        v0 = f_ok & _tap_valid(s, 0, T, G, GROUP)
        v1 = f_ok & _tap_valid(s, 1, T, G, GROUP)
        v2 = f_ok & _tap_valid(s, 2, T, G, GROUP)
    else:
        v0 = _tap_valid(s + OFF - 2, 2, T, G, GROUP)
        v1 = _tap_valid(s + OFF - 1, 1, T, G, GROUP)
        v2 = _tap_valid(s + OFF, 0, T, G, GROUP)
    c0 = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    c1 = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    c2 = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    cc = offs_c[None, :] * f_c
    for kk in tl.static_range(3):
        ww = offs_w + (kk - 1)
        col = ww[:, None] * f_w + cc
        col_ok = mask & ((ww >= 0) & (ww < W))[:, None] & f_ok
        for j in tl.static_range(3):
            hh = h + (j - 1)
            xs = tl.load(f_ptr + hh * f_h + col, mask=col_ok & (hh >= 0) & (hh < H), other=0.0)
            if not BWD:
                if j == 1:
                    if kk == 1:
                        # The new cache holds the last N frames of cat(cache or zeros, x): a bit-exact copy.
                        q = s - (T - N)
                        tl.store(ocache_ptr + q * q_t + pix_q, xs, mask=mask & (q >= 0) & (s < T))
            xf = xs.to(tl.float32)
            if BWD:
                # Taps reading grad_y past the frame are skipped, not multiplied by the zero padding: with
                # an Inf or NaN weight 0 * w is NaN, and the reference's conv backward never forms them.
                inb = ((ww >= 0) & (ww < W))[:, None] & (hh >= 0) & (hh < H)
                c0 += tl.where(inb, wt[0 * 9 + j * 3 + kk][None, :] * xf, 0.0)
                c1 += tl.where(inb, wt[1 * 9 + j * 3 + kk][None, :] * xf, 0.0)
                c2 += tl.where(inb, wt[2 * 9 + j * 3 + kk][None, :] * xf, 0.0)
            else:
                c0 += wt[2 * 9 + j * 3 + kk][None, :] * xf
                c1 += wt[1 * 9 + j * 3 + kk][None, :] * xf
                c2 += wt[0 * 9 + j * 3 + kk][None, :] * xf
    # An invalid tap's contribution is dropped (not multiplied by zero: NaN * 0 is NaN).
    acc0 = tl.where(v0, acc0 + c0, acc0)
    acc1 = tl.where(v1, acc1 + c1, acc1)
    acc2 = tl.where(v2, acc2 + c2, acc2)

    # Slot 0 is complete: output frame o.
    if BWD:
        o = s - OFF
    else:
        o = s + OFF - 2
    res = acc0
    if RESIDUAL:
        res += tl.load(res_ptr + o * res_t + pix_res, mask=mask & (o >= 0) & (o < T), other=0.0).to(tl.float32)
    if BWD:
        qn = o - (T - N)  # the grad of the new cache frame that holds frame o
        res += tl.load(gnc_ptr + qn * gnc_t + pix_gnc, mask=mask & (qn >= 0) & (o < T), other=0.0).to(tl.float32)
        if HAS_OCACHE:
            tl.store(ocache_ptr + (o + N) * q_t + pix_q, res.to(ocache_ptr.dtype.element_ty), mask=mask & (o < 0))
    tl.store(out_ptr + o * o_t + pix_out, res.to(out_ptr.dtype.element_ty), mask=mask & (o >= 0) & (o < T))
    return acc1, acc2, init


@triton.jit
def _load_taps(w_cols, C):
    """The 27 tap vectors (BLOCK_C,) of weights (27, C) as a tuple, tap-major."""
    return (
        tl.load(w_cols + 0 * C),
        tl.load(w_cols + 1 * C),
        tl.load(w_cols + 2 * C),
        tl.load(w_cols + 3 * C),
        tl.load(w_cols + 4 * C),
        tl.load(w_cols + 5 * C),
        tl.load(w_cols + 6 * C),
        tl.load(w_cols + 7 * C),
        tl.load(w_cols + 8 * C),
        tl.load(w_cols + 9 * C),
        tl.load(w_cols + 10 * C),
        tl.load(w_cols + 11 * C),
        tl.load(w_cols + 12 * C),
        tl.load(w_cols + 13 * C),
        tl.load(w_cols + 14 * C),
        tl.load(w_cols + 15 * C),
        tl.load(w_cols + 16 * C),
        tl.load(w_cols + 17 * C),
        tl.load(w_cols + 18 * C),
        tl.load(w_cols + 19 * C),
        tl.load(w_cols + 20 * C),
        tl.load(w_cols + 21 * C),
        tl.load(w_cols + 22 * C),
        tl.load(w_cols + 23 * C),
        tl.load(w_cols + 24 * C),
        tl.load(w_cols + 25 * C),
        tl.load(w_cols + 26 * C),
    )


@triton.jit
def _causal_dwconv3d_kernel(
    src_ptr, aux_ptr, w_ptr, bias_ptr, out_ptr, ocache_ptr,
    T, H, W, C, G,
    s_b, s_t, s_h, s_w, s_c,
    a_b, a_t, a_h, a_w, a_c,
    o_b, o_t, o_h, o_w,
    q_b, q_t, q_h, q_w,
    BWD: tl.constexpr, GROUP: tl.constexpr, HAS_AUX: tl.constexpr, HAS_BIAS: tl.constexpr,
    RESIDUAL: tl.constexpr, HAS_OCACHE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # forward (BWD=False): src = x, aux = cache (HAS_AUX), out = y, ocache = new cache (always written).
    # grad input (BWD=True): src = grad_y, aux = grad of the new cache, out = grad x, ocache = grad cache
    #   (HAS_OCACHE).
    OFF: tl.constexpr = 1 if GROUP else 2
    N: tl.constexpr = OFF
    T = T.to(tl.int64)
    H = H.to(tl.int64)
    W = W.to(tl.int64)
    C = C.to(tl.int64)
    pid = tl.program_id(0)  # int32 index arithmetic here: 64-bit division is a subroutine call on the GPU
    n_wb = tl.cdiv(W, BLOCK_W).to(tl.int32)
    wb = (pid % n_wb).to(tl.int64)
    h = ((pid // n_wb) % H.to(tl.int32)).to(tl.int64)
    b = (pid // n_wb // H.to(tl.int32)).to(tl.int64)
    offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    mask = (offs_w < W)[:, None] & mask_c[None, :]
    w_cols = w_ptr + tl.where(mask_c, offs_c, 0)  # weights (27, C); masked channels read channel 0
    # The 27 tap vectors, loaded once for the whole frame walk (inside it the loads are not hoisted: the
    # stores to y and the cache may alias the weights as far as the compiler knows).
    wt = _load_taps(w_cols, C)
    init = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    if HAS_BIAS:
        init += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0)[None, :]
    acc0 = init
    acc1 = init
    acc2 = init
    src_b = src_ptr + b * s_b
    aux_b = aux_ptr + b * a_b
    out_b = out_ptr + b * o_b
    pix_out = h * o_h + offs_w[:, None] * o_w + offs_c[None, :]
    pix_q = h * q_h + offs_w[:, None] * q_w + offs_c[None, :]
    ocache_b = ocache_ptr + b * q_b
    pix_src = h * s_h + offs_w[:, None] * s_w + offs_c[None, :] * s_c
    pix_aux = h * a_h + offs_w[:, None] * a_w + offs_c[None, :] * a_c

    # Forward: the cache frames -N..-1 (zeros without a cache), then x's frames (in group mode one step past
    # the end, to complete the last output). Grad input: grad_y's frames, then OFF steps to complete outputs.
    if BWD:
        s_lo = T * 0
        s_hi = T + OFF
    else:
        s_lo = T * 0 - N
        s_hi = T + 2 - OFF
    if HAS_AUX:
        aux_ok = T >= 0
    else:
        aux_ok = T < 0
    # One call site for the step (a large function called from several places is not inlined).
    if INTERPRET:
        # Triton 3.6's interpreter cannot take a runtime loop bound with numpy >= 2.4 (int() of a 1-element
        # array); the same step runs under a while loop there.
        s = s_lo
        while s < s_hi:
            acc0, acc1, acc2 = _frame_step(
                s, acc0, acc1, acc2, init, src_b, aux_b, aux_ok, s_t, s_h, s_w, s_c, a_t, a_h, a_w, a_c,
                wt, h, offs_w, offs_c, mask, out_b, pix_out, o_t, ocache_b, pix_q, q_t, pix_src, pix_aux,
                T, H, W, C, G, BWD, GROUP, RESIDUAL, HAS_OCACHE, BLOCK_W, BLOCK_C)
            s += 1
    else:
        for s in range(s_lo, s_hi):
            acc0, acc1, acc2 = _frame_step(
                s, acc0, acc1, acc2, init, src_b, aux_b, aux_ok, s_t, s_h, s_w, s_c, a_t, a_h, a_w, a_c,
                wt, h, offs_w, offs_c, mask, out_b, pix_out, o_t, ocache_b, pix_q, q_t, pix_src, pix_aux,
                T, H, W, C, G, BWD, GROUP, RESIDUAL, HAS_OCACHE, BLOCK_W, BLOCK_C)


@triton.jit
def _frame_step(
    s, acc0, acc1, acc2, init, src_b, aux_b, aux_ok, s_t, s_h, s_w, s_c, a_t, a_h, a_w, a_c,
    wt, h, offs_w, offs_c, mask, out_b, pix_out, o_t, ocache_b, pix_q, q_t, pix_src, pix_aux,
    T, H, W, C, G, BWD: tl.constexpr, GROUP: tl.constexpr, RESIDUAL: tl.constexpr, HAS_OCACHE: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Step s of the frame walk: frame s is a cache frame (s < 0, forward) or a frame of src."""
    N: tl.constexpr = 1 if GROUP else 2
    if BWD:
        return _conv_step(
            s, src_b + s * s_t, s_h, s_w, s_c, s < T, acc0, acc1, acc2, init,
            wt, h, offs_w, offs_c, mask, out_b, pix_out, o_t, ocache_b, pix_q, q_t, src_b, pix_src, s_t,
            aux_b, pix_aux, a_t, T, H, W, C, G, BWD, GROUP, RESIDUAL, HAS_OCACHE, BLOCK_W, BLOCK_C)
    else:
        in_cache = s < 0
        return _conv_step(
            s, tl.where(in_cache, aux_b + (s + N) * a_t, src_b + s * s_t), tl.where(in_cache, a_h, s_h),
            tl.where(in_cache, a_w, s_w), tl.where(in_cache, a_c, s_c), tl.where(in_cache, aux_ok, s < T),
            acc0, acc1, acc2, init,
            wt, h, offs_w, offs_c, mask, out_b, pix_out, o_t, ocache_b, pix_q, q_t, src_b, pix_src, s_t,
            aux_b, pix_aux, a_t, T, H, W, C, G, BWD, GROUP, RESIDUAL, HAS_OCACHE, BLOCK_W, BLOCK_C)


@triton.jit
def _wgrad_row(acc, g, f_ptr, f_w, f_c, row_ok, offs_w, offs_c, mask_c, col_ok, W, TAP0: tl.constexpr):
    """acc (a tuple of 27 tiles) with taps TAP0..TAP0+2 (one frame row, the three column shifts) updated by
    g * the row's shifted tiles. f_ptr: the row's first element (row_ok: the row exists, else zeros)."""
    out = ()
    for n in tl.static_range(27):
        if n >= TAP0 and n < TAP0 + 3:
            ww = offs_w + (n - TAP0 - 1)
            # Columns of the tile past the frame (col_ok False) read nothing: their g is a masked 0, and
            # 0 * an Inf in x would put a NaN the reference never forms into the sum.
            m = (col_ok & (ww >= 0) & (ww < W))[:, None] & mask_c[None, :] & row_ok
            xs = tl.load(f_ptr + ww[:, None] * f_w + offs_c[None, :] * f_c, mask=m, other=0.0).to(tl.float32)
            out = out + (acc[n] + g * xs,)
        else:
            out = out + (acc[n],)
    return out


@triton.jit
def _wgrad_tile(
    q, NQ, acc, acc_b, x_ptr, cache_ptr, gy_ptr, T, H, W, G, n_wb,
    x_b, x_t, x_h, x_w, x_c, c_b, c_t, c_h, c_w, c_c, g_b, g_t, g_h, g_w, g_c,
    offs_c, mask_c, GROUP: tl.constexpr, HAS_CACHE: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Tile q (BLOCK_W columns of one (b, t, h) row; q >= NQ: past the end, adds zeros) added to the 27
    tap accumulators and the bias accumulator."""
    OFF: tl.constexpr = 1 if GROUP else 2
    N: tl.constexpr = OFF
    # Scalar index arithmetic in int32 (the launcher checks tiles < 2^31): 64-bit division is a subroutine
    # call on the GPU.
    wb = q % n_wb
    row = q // n_wb
    h32 = row % H.to(tl.int32)
    bt = row // H.to(tl.int32)
    t32 = bt % T.to(tl.int32)
    b = (bt // T.to(tl.int32)).to(tl.int64)
    h = h32.to(tl.int64)
    t = t32.to(tl.int64)
    offs_w = wb.to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)
    col_ok = (offs_w < W) & (q < NQ)
    g = tl.load(gy_ptr + b * g_b + t * g_t + h * g_h + offs_w[:, None] * g_w + offs_c[None, :] * g_c,
                mask=col_ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    acc_b += g
    if GROUP:
        # int32 division, as above
        end = tl.minimum(T, ((t32 // G) * G + G).to(tl.int64))
    for i in tl.static_range(3):
        s = t - OFF + i
        if GROUP:
            f_ok = s < end  # the tap past a group's end reads zeros
        else:
            f_ok = s < T  # always true, as a scalar tensor
        if HAS_CACHE:
            in_cache = s < 0
            f_ptr = tl.where(in_cache, cache_ptr + b * c_b + (s + N) * c_t, x_ptr + b * x_b + s * x_t)
            f_h = tl.where(in_cache, c_h, x_h)
            f_w = tl.where(in_cache, c_w, x_w)
            f_c = tl.where(in_cache, c_c, x_c)
        else:
            f_ok = f_ok & (s >= 0)  # no cache: the frames before x are zeros
            f_ptr = x_ptr + b * x_b + s * x_t
            f_h = x_h
            f_w = x_w
            f_c = x_c
        for j in tl.static_range(3):
            hh = h + (j - 1)
            acc = _wgrad_row(acc, g, f_ptr + hh * f_h, f_w, f_c, f_ok & (hh >= 0) & (hh < H), offs_w, offs_c,
                             mask_c, col_ok, W, i * 9 + j * 3)
    return acc, acc_b


@triton.jit
def _causal_dwconv3d_wgrad_kernel(
    x_ptr, cache_ptr, gy_ptr, part_ptr,
    T, H, W, C, G, NQ, TILES,
    x_b, x_t, x_h, x_w, x_c,
    c_b, c_t, c_h, c_w, c_c,
    g_b, g_t, g_h, g_w, g_c,
    GROUP: tl.constexpr, HAS_CACHE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Program (block, channel block): part[block, 9i + 3j + k, c] = sum over the block's TILES tiles (in
    # order; a tile is BLOCK_W columns of one (b, t, h) row) of gy * (the frame read through tap (i, j, k)),
    # and part[block, 27, c] = sum of gy (grad bias). Each tile's gy is read once for all 27 taps and
    # multiplied into 28 register tiles; each tile is reduced over its columns once, at the end.
    T = T.to(tl.int64)
    H = H.to(tl.int64)
    W = W.to(tl.int64)
    C = C.to(tl.int64)
    n_wb = tl.cdiv(W, BLOCK_W).to(tl.int32)
    blk = tl.program_id(0)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    z = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    acc = (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
    acc_b = z
    q0 = blk * TILES
    if INTERPRET:  # see _causal_dwconv3d_kernel
        it = 0
        while it < TILES:
            acc, acc_b = _wgrad_tile(
                q0 + it, NQ, acc, acc_b, x_ptr, cache_ptr, gy_ptr, T, H, W, G, n_wb,
                x_b, x_t, x_h, x_w, x_c, c_b, c_t, c_h, c_w, c_c, g_b, g_t, g_h, g_w, g_c,
                offs_c, mask_c, GROUP, HAS_CACHE, BLOCK_W)
            it += 1
    else:
        for it in range(TILES):
            acc, acc_b = _wgrad_tile(
                q0 + it, NQ, acc, acc_b, x_ptr, cache_ptr, gy_ptr, T, H, W, G, n_wb,
                x_b, x_t, x_h, x_w, x_c, c_b, c_t, c_h, c_w, c_c, g_b, g_t, g_h, g_w, g_c,
                offs_c, mask_c, GROUP, HAS_CACHE, BLOCK_W)
    out = part_ptr + blk.to(tl.int64) * 28 * C + offs_c
    for n in tl.static_range(27):
        tl.store(out + n * C, tl.sum(acc[n], axis=0), mask=mask_c)
    tl.store(out + 27 * C, tl.sum(acc_b, axis=0), mask=mask_c)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, NBLK, M, TRIPS, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
                         INTERPRET: tl.constexpr):
    # out[m] = sum over the NBLK partials of part[k, m]: a (BLOCK_K, BLOCK) tile accumulated elementwise over
    # TRIPS = cdiv(NBLK, BLOCK_K) steps (row k into row k % BLOCK_K), then reduced over its rows once. A
    # fixed order for given (NBLK, BLOCK_K, BLOCK): deterministic.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    mask = offs < M
    acc = tl.zeros((BLOCK_K, BLOCK), tl.float32)
    if INTERPRET:  # see _causal_dwconv3d_kernel
        it = 0
        while it < TRIPS:
            k = it * BLOCK_K + ks
            acc += tl.load(part_ptr + k[:, None] * M + offs[None, :], mask=(k < NBLK)[:, None] & mask[None, :],
                           other=0.0)
            it += 1
    else:
        for it in range(TRIPS):
            k = it * BLOCK_K + ks
            acc += tl.load(part_ptr + k[:, None] * M + offs[None, :], mask=(k < NBLK)[:, None] & mask[None, :],
                           other=0.0)
    tl.store(out_ptr + offs, tl.sum(acc, axis=0), mask=mask)


# Launch options of the conv kernels: 4 warps, registers capped at 128 so that four 128-thread programs fit
# an SM's 64K registers whatever Triton version compiles them (uncapped, Triton 3.6 gave the grad input 134
# and Triton 3.9 the group-mode weight grad 136; capped, neither spills: the sm_90 compile test checks).
_LAUNCH = dict(num_warps=4, maxnreg=128)


def _blocks(w, c):
    """(BLOCK_W, BLOCK_C). The interpreter's cost is per operation, not per element: whole rows there.
    On GPUs 8 x 32 with 4 warps. Compiled for sm_90 as launched at (1, 5, 135, 240, 512) bf16
    (tests/ops/causal_conv/test_causal_conv.py, test_triton_kernels_compile_for_sm90_without_spills) the forward needs
    95-99 registers and the grad input 114-123 under the 128 cap (Triton 3.9 / 3.6), without spilling
    (219-231 before the taps were hoisted out of the frame walk). An earlier, generically specialised
    compile found 16 x 64 at 244 registers, spilling."""
    if interpreting():
        return triton.next_power_of_2(w), triton.next_power_of_2(c)
    return 8, min(32, triton.next_power_of_2(c))


def causal_dwconv3d_fwd(x, cache, w27, bias, residual, group_size):
    """x: (B, T, H, W, C) any strides; cache: (B, N, H, W, C) or None; w27: (27, C) float32; bias: (C,) float32
    or None. Returns (y, new_cache), contiguous."""
    b, t, h, w, c = x.shape
    n = 1 if group_size > 0 else 2
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_cache = torch.empty((b, n, h, w, c), dtype=x.dtype, device=x.device)
    aux = cache if cache is not None else x
    bw, bc = _blocks(w, c)
    grid = (b * h * triton.cdiv(w, bw), triton.cdiv(c, bc))
    _causal_dwconv3d_kernel[grid](
        x, aux, w27, bias if bias is not None else w27, y, new_cache,
        t, h, w, c, max(group_size, 1),
        *x.stride(), *aux.stride(), *y.stride()[:4], *new_cache.stride()[:4],
        BWD=False, GROUP=group_size > 0, HAS_AUX=cache is not None, HAS_BIAS=bias is not None, RESIDUAL=residual,
        HAS_OCACHE=True, BLOCK_W=bw, BLOCK_C=bc, INTERPRET=interpreting(), **_LAUNCH,
    )
    return y, new_cache


def causal_dwconv3d_bwd_input(grad_y, grad_cache, wflip27, has_cache, residual, group_size):
    """Grad of x (B, T, H, W, C) and, when has_cache, of the cache (B, N, H, W, C). wflip27: spatially
    flipped taps (27, C) float32; grad_cache: grad of the new cache (B, N, H, W, C)."""
    b, t, h, w, c = grad_y.shape
    n = 1 if group_size > 0 else 2
    gx = torch.empty(grad_y.shape, dtype=grad_y.dtype, device=grad_y.device)
    gc = torch.empty((b, n, h, w, c), dtype=grad_y.dtype, device=grad_y.device) if has_cache else gx
    bw, bc = _blocks(w, c)
    grid = (b * h * triton.cdiv(w, bw), triton.cdiv(c, bc))
    _causal_dwconv3d_kernel[grid](
        grad_y, grad_cache, wflip27, wflip27, gx, gc,
        t, h, w, c, max(group_size, 1),
        *grad_y.stride(), *grad_cache.stride(), *gx.stride()[:4], *gc.stride()[:4],
        BWD=True, GROUP=group_size > 0, HAS_AUX=True, HAS_BIAS=False, RESIDUAL=residual,
        HAS_OCACHE=has_cache, BLOCK_W=bw, BLOCK_C=bc, INTERPRET=interpreting(), **_LAUNCH,
    )
    return gx, (gc if has_cache else None)


# Weight grad launch plan. Tiles of WGRAD_BLOCK_W columns x WGRAD_BLOCK_C channels, 4 warps: 28 float32
# register tiles (27 taps + bias) of 2 values per thread. The tiles are cut into contiguous blocks, one
# program per (block, channel block), about WGRAD_PROGRAMS_PER_SM programs per SM in all (the block size
# is therefore fixed per GPU model: results are deterministic on a given device and differ between
# devices only by float rounding). Registers measured by the sm_90 compile test; timings are predictions
# until a GPU run (benchmarks/NOTES.md).
WGRAD_BLOCK_W = 8
WGRAD_BLOCK_C = 32
WGRAD_PROGRAMS_PER_SM = 8


def wgrad_plan(b, t, h, w, c, sms, block_w=WGRAD_BLOCK_W, block_c=WGRAD_BLOCK_C):
    """(tiles, tiles per program, programs along the tiles, channel blocks) of the weight grad: a pure
    function of the shape and the SM count. Tiles are (b, t, h) rows cut into block_w columns."""
    tiles = b * t * h * triton.cdiv(w, block_w)
    cblocks = triton.cdiv(c, block_c)
    want = max(1, (sms * WGRAD_PROGRAMS_PER_SM) // cblocks)
    per = triton.cdiv(tiles, min(want, tiles)) if tiles else 1
    return tiles, per, (triton.cdiv(tiles, per) if tiles else 1), cblocks


def sum_plan(nblk, m, sms):
    """(BLOCK_K, BLOCK, programs, trips) of `_sum_partials_kernel` for nblk partials of m values: BLOCK
    columns per program (a power of two, 32..1024) small enough for at least `sms` programs where m allows,
    BLOCK_K partial rows per step, trips = steps per program."""
    block = 1024
    while block > 32 and triton.cdiv(m, block) < sms:
        block //= 2
    block_k = min(triton.next_power_of_2(max(nblk, 1)), max(1, 2048 // block))
    return block_k, block, triton.cdiv(m, block), triton.cdiv(nblk, block_k)


def causal_dwconv3d_bwd_weight(grad_y, x, cache, group_size, sms=None):
    """(grad weight (27, C), grad bias (C,)) in float32, from fixed partial blocks summed in block order.
    sms: the SM count the partials are sized for (default: the device's)."""
    b, t, h, w, c = x.shape
    if interpreting():
        block_w, block_c = triton.next_power_of_2(w), triton.next_power_of_2(c)
    else:
        block_w, block_c = WGRAD_BLOCK_W, min(WGRAD_BLOCK_C, triton.next_power_of_2(c))
    sms = sms or sm_count(x.device)
    tiles, per, nblk, cblocks = wgrad_plan(b, t, h, w, c, sms, block_w, block_c)
    if nblk * per >= 2**31:  # tile indices are int32 in the kernel, up to the last block's end
        raise ValueError(f"causal_dwconv3d (triton): grad weight supports B*T*H*ceil(W/{block_w}) < 2^31 tiles, "
                         f"got {tiles}")
    part = torch.empty((nblk, 28, c), dtype=torch.float32, device=x.device)
    aux = cache if cache is not None else x
    _causal_dwconv3d_wgrad_kernel[(nblk, cblocks)](
        x, aux, grad_y, part,
        t, h, w, c, max(group_size, 1), tiles, per,
        *x.stride(), *aux.stride(), *grad_y.stride(),
        GROUP=group_size > 0, HAS_CACHE=cache is not None, BLOCK_W=block_w, BLOCK_C=block_c,
        INTERPRET=interpreting(), **_LAUNCH,
    )
    out = torch.empty((28, c), dtype=torch.float32, device=x.device)
    m = 28 * c
    block_k, block, programs, trips = sum_plan(nblk, m, sms)
    _sum_partials_kernel[(programs,)](part, out, nblk, m, trips, BLOCK_K=block_k, BLOCK=block,
                                      INTERPRET=interpreting(), num_warps=4)
    # Two buffers, not two views of one: with C == 1 the weight gradient's (27, 1) -> (1, 27) reshape is a
    # view, and an op must not return outputs that alias each other.
    return out[:27], out[27].clone()
