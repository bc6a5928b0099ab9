"""Triton kernels for the causal depthwise 3x3x3 conv on channels-last tokens (the model's PEG3D).

Contract: leanvae_kernels/ops/causal_conv.py. Temporal structure shared with the C++ kernels: output
frame t reads frame t - OFF + i through temporal tap i (OFF = 2 causal, 1 group-causal); negative frames
are the cache (or zeros); in group mode a tap past the end of t's group reads zeros.

`_causal_dwconv3d_kernel` (forward and grad input): one program per (b, h, BLOCK_W columns, BLOCK_C
channels) walks the source frames once; each frame's 3x3 neighbourhood (shifted loads that hit the cache)
feeds three rolling accumulators, one per output frame the frame touches, so each input element comes from
memory about once. Grad input is the same correlation with spatially flipped taps and the temporal map
reversed.

`_causal_dwconv3d_wgrad_kernel`: fixed blocks of positions -> partial sums per (block, tap, channel),
summed in block order by `_sum_partials_kernel` (deterministic).

Index arithmetic is int64 throughout (tensors past 2^31 elements; it also keeps Triton's interpreter from
checking every int32 operation for overflow, which dominates its run time).
"""
import torch
import triton
import triton.language as tl

from .._triton import interpreting


@triton.jit
def _tap_valid(t, i, T, G, GROUP: tl.constexpr):
    """Whether output frame t's temporal tap i reads a frame (False: zeros past the end of t's group)."""
    if GROUP:
        return t - 1 + i < tl.minimum(T, (t // G) * G + G)
    else:
        return t == t


@triton.jit
def _conv_step(
    s, f_ptr, f_h, f_w, f_c, f_ok, acc0, acc1, acc2, init,
    w_cols, h, offs_w, offs_c, mask, out_ptr, pix_out, o_t, ocache_ptr, pix_q, q_t, res_ptr, pix_res, res_t,
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
            tap = j * 3 + kk
            if BWD:
                c0 += tl.load(w_cols + (0 * 9 + tap) * C)[None, :] * xf
                c1 += tl.load(w_cols + (1 * 9 + tap) * C)[None, :] * xf
                c2 += tl.load(w_cols + (2 * 9 + tap) * C)[None, :] * xf
            else:
                c0 += tl.load(w_cols + (2 * 9 + tap) * C)[None, :] * xf
                c1 += tl.load(w_cols + (1 * 9 + tap) * C)[None, :] * xf
                c2 += tl.load(w_cols + (0 * 9 + tap) * C)[None, :] * xf
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
    pid = tl.program_id(0).to(tl.int64)
    n_wb = tl.cdiv(W, BLOCK_W)
    wb = pid % n_wb
    h = (pid // n_wb) % H
    b = pid // n_wb // H
    offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    mask = (offs_w < W)[:, None] & mask_c[None, :]
    w_cols = w_ptr + tl.where(mask_c, offs_c, 0)  # weights (27, C); masked channels read channel 0
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

    if not BWD:
        # The cache frames -N..-1 (zeros without a cache), then x's frames (and, in group mode, one step
        # past the end to complete the last output).
        for s in tl.static_range(-N, 0):
            acc0, acc1, acc2 = _conv_step(
                s, aux_b + (s + N) * a_t, a_h, a_w, a_c, HAS_AUX, acc0, acc1, acc2, init,
                w_cols, h, offs_w, offs_c, mask, out_b, pix_out, o_t, ocache_b, pix_q, q_t, src_b, pix_src, s_t,
                aux_b, pix_aux, a_t, T, H, W, C, G, BWD, GROUP, RESIDUAL, HAS_OCACHE, BLOCK_W, BLOCK_C)
        s_lo = 0
        s_hi = T + 2 - OFF
    else:
        s_lo = 0
        s_hi = T + OFF
    if INTERPRET:
        # Triton 3.6's interpreter cannot take a runtime loop bound with numpy >= 2.4 (int() of a 1-element
        # array); the same step runs under a while loop there.
        s = s_lo + T * 0  # an int64 tensor
        while s < s_hi:
            acc0, acc1, acc2 = _conv_step(
                s, src_b + s * s_t, s_h, s_w, s_c, s < T, acc0, acc1, acc2, init,
                w_cols, h, offs_w, offs_c, mask, out_b, pix_out, o_t, ocache_b, pix_q, q_t, src_b, pix_src, s_t,
                aux_b, pix_aux, a_t, T, H, W, C, G, BWD, GROUP, RESIDUAL, HAS_OCACHE, BLOCK_W, BLOCK_C)
            s += 1
    else:
        for s32 in range(s_lo, s_hi):
            s = s32.to(tl.int64)
            acc0, acc1, acc2 = _conv_step(
                s, src_b + s * s_t, s_h, s_w, s_c, s < T, acc0, acc1, acc2, init,
                w_cols, h, offs_w, offs_c, mask, out_b, pix_out, o_t, ocache_b, pix_q, q_t, src_b, pix_src, s_t,
                aux_b, pix_aux, a_t, T, H, W, C, G, BWD, GROUP, RESIDUAL, HAS_OCACHE, BLOCK_W, BLOCK_C)


@triton.jit
def _causal_dwconv3d_wgrad_kernel(
    x_ptr, cache_ptr, gy_ptr, part_ptr,
    T, H, W, C, G, P,
    x_b, x_t, x_h, x_w, x_c,
    c_b, c_t, c_h, c_w, c_c,
    g_b, g_t, g_h, g_w, g_c,
    GROUP: tl.constexpr, HAS_CACHE: tl.constexpr, BLOCK_P: tl.constexpr, SUB: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # part[block, tap, c] = sum over the block's SUB * BLOCK_P positions (b, t, h, w), in order, of gy * (the
    # frame read through tap (i, j, k)); tap 27: the sum of gy (grad bias).
    OFF: tl.constexpr = 1 if GROUP else 2
    N: tl.constexpr = OFF
    T = T.to(tl.int64)
    H = H.to(tl.int64)
    W = W.to(tl.int64)
    C = C.to(tl.int64)
    blk = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    taps = tl.arange(0, 32)
    acc = tl.zeros((32, BLOCK_C), tl.float32)
    for sub in range(SUB):  # a constant trip count (not unrolled: 27 taps per iteration already)
        p = (blk * SUB + sub) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        mask_p = p < P
        w = p % W
        h = (p // W) % H
        t = (p // (W * H)) % T
        b = p // (W * H * T)
        g = tl.load(gy_ptr + (b * g_b + t * g_t + h * g_h + w * g_w)[:, None] + offs_c[None, :] * g_c,
                    mask=mask_p[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        acc = tl.where(taps[:, None] == 27, acc + tl.sum(g, axis=0)[None, :], acc)
        for i in tl.static_range(3):
            s = t - OFF + i
            if GROUP:
                ok = mask_p & (s < tl.minimum(T, (t // G) * G + G))
            else:
                ok = mask_p
            in_x = ok & (s >= 0)
            in_c = ok & (s < 0)
            for j in tl.static_range(3):
                hh = h + (j - 1)
                row_ok = (hh >= 0) & (hh < H)
                for kk in tl.static_range(3):
                    ww = w + (kk - 1)
                    sp_ok = row_ok & (ww >= 0) & (ww < W)
                    xs = tl.load(x_ptr + (b * x_b + s * x_t + hh * x_h + ww * x_w)[:, None] + offs_c[None, :] * x_c,
                                 mask=(in_x & sp_ok)[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
                    if HAS_CACHE:
                        xs += tl.load(cache_ptr + (b * c_b + (s + N) * c_t + hh * c_h + ww * c_w)[:, None]
                                      + offs_c[None, :] * c_c, mask=(in_c & sp_ok)[:, None] & mask_c[None, :],
                                      other=0.0).to(tl.float32)
                    part = tl.sum(g * xs, axis=0)
                    acc = tl.where(taps[:, None] == (i * 9 + j * 3 + kk), acc + part[None, :], acc)
    tl.store(part_ptr + blk * 28 * C + taps[:, None] * C + offs_c[None, :], acc,
             mask=(taps < 28)[:, None] & mask_c[None, :])


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, NBLK, M, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    # out[m] = sum over blocks, in block order, of part[block, m].
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < M
    acc = tl.zeros((BLOCK,), tl.float32)
    if INTERPRET:  # see _causal_dwconv3d_kernel
        k = 0
        while k < NBLK:
            acc += tl.load(part_ptr + k * M + offs, mask=mask, other=0.0)
            k += 1
    else:
        for k in range(NBLK):
            acc += tl.load(part_ptr + k.to(tl.int64) * M + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


def _blocks(w, c):
    """(BLOCK_W, BLOCK_C). The interpreter's cost is per operation, not per element: whole rows there."""
    if interpreting():
        return triton.next_power_of_2(w), triton.next_power_of_2(c)
    return 16, min(64, triton.next_power_of_2(c))


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
        HAS_OCACHE=True, BLOCK_W=bw, BLOCK_C=bc, INTERPRET=interpreting(),
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
        HAS_OCACHE=has_cache, BLOCK_W=bw, BLOCK_C=bc, INTERPRET=interpreting(),
    )
    return gx, (gc if has_cache else None)


WGRAD_BLOCK_P = 64  # positions per sub-block
WGRAD_SUB = 16      # sub-blocks per partial (fewer when the call has fewer positions)


def causal_dwconv3d_bwd_weight(grad_y, x, cache, group_size):
    """(grad weight (27, C), grad bias (C,)) in float32, from fixed partial blocks summed in block order."""
    b, t, h, w, c = x.shape
    positions = b * t * h * w
    sub = min(WGRAD_SUB, triton.cdiv(positions, WGRAD_BLOCK_P))
    nblk = triton.cdiv(positions, WGRAD_BLOCK_P * sub)
    bc = triton.next_power_of_2(c) if interpreting() else min(32, triton.next_power_of_2(c))
    part = torch.empty((nblk, 28, c), dtype=torch.float32, device=x.device)
    aux = cache if cache is not None else x
    _causal_dwconv3d_wgrad_kernel[(nblk, triton.cdiv(c, bc))](
        x, aux, grad_y, part,
        t, h, w, c, max(group_size, 1), positions,
        *x.stride(), *aux.stride(), *grad_y.stride(),
        GROUP=group_size > 0, HAS_CACHE=cache is not None, BLOCK_P=WGRAD_BLOCK_P, SUB=sub, BLOCK_C=bc,
    )
    out = torch.empty((28, c), dtype=torch.float32, device=x.device)
    m = 28 * c
    _sum_partials_kernel[(triton.cdiv(m, 1024),)](part, out, nblk, m, BLOCK=1024, INTERPRET=interpreting())
    return out[:27], out[27]
