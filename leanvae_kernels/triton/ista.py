"""Triton kernels for the ISTA ops: the soft threshold and the gradient step (three input modes)."""
import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _sign(v):
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))


@triton.jit
def _soft_threshold_fwd_kernel(x_ptr, theta_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    th = tl.load(theta_ptr).to(tl.float32)
    r = tl.abs(v) - th
    r = tl.where(r > 0, r, tl.where(r != r, r, 0.0))  # torch's relu: NaN propagates
    tl.store(out_ptr + offs, (_sign(v) * r).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _soft_threshold_bwd_kernel(grad_ptr, x_ptr, theta_ptr, grad_x_ptr, partials_ptr, n, BLOCK: tl.constexpr):
    # One program per BLOCK elements; BLOCK equals the partial-sum block, so the partial for this
    # block is one deterministic reduction.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    th = tl.load(theta_ptr).to(tl.float32)
    s = _sign(v)
    gs = tl.where(tl.abs(v) - th <= 0, 0.0, g * s)  # NaN passes, as in torch's relu backward
    tl.store(grad_x_ptr + offs, (gs * s).to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(partials_ptr + tl.program_id(0), tl.sum(gs, axis=0))


def soft_threshold_fwd(x, theta):
    """x: contiguous, any shape; theta: one element. Returns sign(x) * relu(|x| - theta)."""
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _soft_threshold_fwd_kernel[(triton.cdiv(n, _BLOCK),)](x, theta, out, n, BLOCK=_BLOCK)
    return out


def soft_threshold_bwd(grad, x, theta, block):
    """Returns (grad_x, partials): partials[b] sums grad*sign(x) over |x| > theta in block b."""
    grad_x = torch.empty_like(x)
    n = x.numel()
    partials = torch.zeros(max(1, triton.cdiv(n, block)), device=x.device, dtype=torch.float32)
    if n:
        _soft_threshold_bwd_kernel[(triton.cdiv(n, block),)](grad, x, theta, grad_x, partials, n, BLOCK=block)
    return grad_x, partials


# ------------------------------------------------------------------------------------- ISTA step
# One program per BLOCK_N token rows (forward), or per `rows_per_partial` rows taken BLOCK_N at a time
# (backward). A row (D padded to BLOCK_D, a power of two: a compile-time trip count, which the
# interpreter also needs) is walked in chunks of BLOCK_C columns twice: the first pass accumulates the d dot
# products per row (e = x @ phi.T - y, and in the backward h = g @ phi.T), the second re-reads the chunk
# (an L1/L2 hit: the program's rows were just read) and applies the rank-d update. Chunking keeps each
# tl.dot's K small: a dot with K = D = 512 and M = N = 16 holds most of K in every warp's registers.
# FP32=True: operands in float32 with IEEE products, for every dtype. FP32=False (bf16 inputs on a GPU):
# the 16-bit operands go to tensor cores as they are (their products are exact, accumulated in float32)
# and a float32 operand is split into hi + lo halves in the input dtype (about 16 mantissa bits kept).
@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """a @ b for two operands in the storage dtype; float32 result."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_f32(a, b, FP32: tl.constexpr):
    """a @ b for a float32 `a` and a `b` in the storage dtype; float32 result."""
    if FP32:
        return tl.dot(a, b.to(tl.float32), input_precision="ieee")
    else:
        hi = a.to(b.dtype)
        # hi == a: lo is 0 (also for +/-inf, where a - hi would be NaN and the reference keeps the inf)
        lo = tl.where(hi.to(tl.float32) == a, 0.0, a - hi.to(tl.float32)).to(b.dtype)
        return tl.dot(hi, b) + tl.dot(lo, b)


@triton.jit
def _chunk(src_ptr, u_ptr, q_ptr, phi_ptr, y, rows, rmask, c0, D, d, src_rs, u_rs, MODE: tl.constexpr,
           FP32: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns [c0, c0 + BLOCK_C): phi (BLOCK_K, BLOCK_C) zero-padded, and the step's input x
    (BLOCK_N, BLOCK_C) in the storage dtype: r, round(r + u) or round(y @ Q.T) (Q: (D, d) contiguous)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    ks = tl.arange(0, BLOCK_K)
    cmask = cols < D
    kd = (ks[:, None] < d) & cmask[None, :]
    phi = tl.load(phi_ptr + ks[:, None] * D + cols[None, :], mask=kd, other=0.0)
    if MODE == 2:
        qt = tl.load(q_ptr + cols[None, :] * d + ks[:, None], mask=kd, other=0.0)
        # rows past the end: y = 0 there, but 0 * an inf in Q is NaN, and x meets h = 0 in the backward
        x = tl.where(rmask[:, None], _dot(y, qt, FP32), 0.0).to(y.dtype)
    else:
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(src_ptr + rows[:, None] * src_rs + cols[None, :], mask=mask, other=0.0)
        if MODE == 1:
            u = tl.load(u_ptr + rows[:, None] * u_rs + cols[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + u.to(tl.float32)).to(x.dtype)
    return phi, x, cols, cmask


@triton.jit
def _ista_step_fwd_kernel(src_ptr, u_ptr, y_ptr, phi_ptr, w_ptr, out_ptr, N, D, d, src_rs, u_rs, y_rs,
                          MODE: tl.constexpr, FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rmask = rows < N
    y = tl.load(y_ptr + rows[:, None] * y_rs + ks[None, :], mask=rmask[:, None] & (ks[None, :] < d), other=0.0)
    e = -y.to(tl.float32)  # rows past the end: x = y = 0, so e = 0
    for c0 in range(0, BLOCK_D, BLOCK_C):
        phi, x, cols, cmask = _chunk(src_ptr, u_ptr, src_ptr, phi_ptr, y, rows, rmask, c0, D, d, src_rs, u_rs,
                                     MODE, FP32, BLOCK_C, BLOCK_K)
        e += _dot(x, tl.trans(phi), FP32)
    # The padded measurements k >= d are x @ 0, NaN when x holds an inf: select them to 0 (never a
    # product with 0) so that they cannot reach the update, which the reference never computes.
    e = tl.where(ks[None, :] < d, e, 0.0)
    w = tl.load(w_ptr).to(tl.float32)
    for c0 in range(0, BLOCK_D, BLOCK_C):
        phi, x, cols, cmask = _chunk(src_ptr, u_ptr, src_ptr, phi_ptr, y, rows, rmask, c0, D, d, src_rs, u_rs,
                                     MODE, FP32, BLOCK_C, BLOCK_K)
        out = x.to(tl.float32) - w * _dot_f32(e, phi, FP32)
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _ista_bwd_rows(row0, acc_w, part, grad_ptr, src_ptr, u_ptr, y_ptr, phi_ptr, w, grad_x_ptr, grad_y_ptr, N, D, d,
                   grad_rs, src_rs, u_rs, y_rs, MODE: tl.constexpr, FP32: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows row0..row0 + BLOCK_N - 1 (row0 < N): grad_x, grad_y, the partial's update; returns acc_w."""
    ks = tl.arange(0, BLOCK_K)
    rows = row0 + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ymask = rmask[:, None] & (ks[None, :] < d)
    y = tl.load(y_ptr + rows[:, None] * y_rs + ks[None, :], mask=ymask, other=0.0)
    e = -y.to(tl.float32)
    h = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for c0 in range(0, BLOCK_D, BLOCK_C):
        phi, x, cols, cmask = _chunk(src_ptr, u_ptr, src_ptr, phi_ptr, y, rows, rmask, c0, D, d, src_rs, u_rs,
                                     MODE, FP32, BLOCK_C, BLOCK_K)
        g = tl.load(grad_ptr + rows[:, None] * grad_rs + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        e += _dot(x, tl.trans(phi), FP32)
        h += _dot(g, tl.trans(phi), FP32)
    # padded measurements (see the forward) and rows past the end (0 . phi, NaN for an inf in phi)
    real = rmask[:, None] & (ks[None, :] < d)
    e = tl.where(real, e, 0.0)
    h = tl.where(real, h, 0.0)
    tl.store(grad_y_ptr + rows[:, None] * d + ks[None, :], w * h, mask=ymask)
    # grad_w per row: e . h, or where that is not finite (an inf/NaN in the row's data) the
    # reference's order g . (e @ phi), summed in the chunk loop below (csrc/cpu/ista_step.cpp:
    # reference_order_row explains why the two differ there)
    rw = tl.sum(e * h, axis=1)
    bad = (rw != rw) | (tl.abs(rw) == float("inf"))
    if tl.max(bad.to(tl.int32), axis=0) > 0:  # rare: a pass of its own keeps the main loop's registers
        slow = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c0 in range(0, BLOCK_D, BLOCK_C):
            phi, x, cols, cmask = _chunk(src_ptr, u_ptr, src_ptr, phi_ptr, y, rows, rmask, c0, D, d, src_rs,
                                         u_rs, MODE, FP32, BLOCK_C, BLOCK_K)
            g = tl.load(grad_ptr + rows[:, None] * grad_rs + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0)
            slow += tl.sum(g.to(tl.float32) * _dot_f32(e, phi, FP32), axis=1)
        rw = tl.where(bad, slow, rw)
    acc_w += rw
    for c0 in range(0, BLOCK_D, BLOCK_C):
        phi, x, cols, cmask = _chunk(src_ptr, u_ptr, src_ptr, phi_ptr, y, rows, rmask, c0, D, d, src_rs, u_rs,
                                     MODE, FP32, BLOCK_C, BLOCK_K)
        mask = rmask[:, None] & cmask[None, :]
        g = tl.load(grad_ptr + rows[:, None] * grad_rs + cols[None, :], mask=mask, other=0.0)
        grad_x = g.to(tl.float32) - w * _dot_f32(h, phi, FP32)
        tl.store(grad_x_ptr + rows[:, None] * D + cols[None, :], grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        kd = (ks[:, None] < d) & cmask[None, :]
        p_ptrs = part + ks[:, None] * D + cols[None, :]
        p = tl.load(p_ptrs, mask=kd, other=0.0)
        p += _dot_f32(tl.trans(e), g, FP32) + _dot_f32(tl.trans(h), x, FP32)
        tl.store(p_ptrs, p, mask=kd)
    tl.debug_barrier()  # the next rows' read of the partial must see this store, whichever thread made it
    return acc_w


@triton.jit
def _ista_step_bwd_kernel(grad_ptr, src_ptr, u_ptr, y_ptr, phi_ptr, w_ptr, grad_x_ptr, grad_y_ptr, part_phi_ptr,
                          part_w_ptr, N, D, d, grad_rs, src_rs, u_rs, y_rs, ROWS, MODE: tl.constexpr,
                          FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    # One program per ROWS rows (a runtime multiple of BLOCK_N, sized from the SM count by the op: one
    # compile serves every row count). Its grad_phi partial (d, D) lives in its own slice of part_phi
    # (zeroed by the launcher) and is updated once per BLOCK_N rows, chunk by chunk, in row order:
    # deterministic.
    pid = tl.program_id(0)
    w = tl.load(w_ptr).to(tl.float32)
    part = part_phi_ptr + pid.to(tl.int64) * d * D
    acc_w = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid.to(tl.int64) * ROWS
    end = tl.minimum(first + ROWS, N)  # the last block may hold fewer rows
    if INTERPRET:
        # Triton 3.6's interpreter cannot take a runtime loop bound with numpy >= 2.4 (see
        # causal_conv.py); the same body runs under a while loop there.
        row0 = first
        while row0 < end:
            acc_w = _ista_bwd_rows(row0, acc_w, part, grad_ptr, src_ptr, u_ptr, y_ptr, phi_ptr, w, grad_x_ptr,
                                   grad_y_ptr, N, D, d, grad_rs, src_rs, u_rs, y_rs, MODE, FP32, BLOCK_N, BLOCK_D,
                                   BLOCK_C, BLOCK_K)
            row0 += BLOCK_N
    else:
        for row0 in range(first, end, BLOCK_N):
            acc_w = _ista_bwd_rows(row0, acc_w, part, grad_ptr, src_ptr, u_ptr, y_ptr, phi_ptr, w, grad_x_ptr,
                                   grad_y_ptr, N, D, d, grad_rs, src_rs, u_rs, y_rs, MODE, FP32, BLOCK_N, BLOCK_D,
                                   BLOCK_C, BLOCK_K)
    tl.store(part_w_ptr + pid, tl.sum(acc_w, axis=0))


# Launch shape, chosen from Triton's sm_90 code generation (no GPU run yet): 16 rows x 64 columns per
# chunk on 4 warps without software pipelining compile without spills (forward 80-128 registers per
# thread, backward 140-248; 32-row tiles or the default 3 stages spill in the backward).
_BLOCK_C = 64
_BLOCK_N = 16
_LAUNCH = dict(num_warps=4, num_stages=1)


def _step_meta(mode, y, phi, fp32):
    from .._triton import interpreting, next_power_of_2

    if fp32 is None:
        # Tensor cores for bf16 on a GPU; the interpreter's bf16 tl.dot multiplies raw bit patterns.
        fp32 = not (y.dtype == torch.bfloat16 and not interpreting())
    block_d = max(_BLOCK_C, next_power_of_2(phi.shape[1]))
    return dict(MODE=mode, FP32=fp32, BLOCK_D=block_d, BLOCK_C=_BLOCK_C, BLOCK_K=max(16, next_power_of_2(phi.shape[0])))


def ista_step_fwd(mode, src, u, y, phi, w, fp32=None):
    """mode 0: src = r; 1: src = r, u; 2: src = Q (D, d) contiguous. Rows unit-stride; returns (N, D).

    fp32: None picks (tensor cores for bf16 on a GPU); True/False forces a path (tests).
    """
    n, (d, big_d) = y.shape[0], phi.shape
    out = torch.empty(n, big_d, device=y.device, dtype=y.dtype)
    if n:
        u_ = u if u is not None else src
        _ista_step_fwd_kernel[(triton.cdiv(n, _BLOCK_N),)](
            src, u_, y, phi, w, out, n, big_d, d, src.stride(0), u_.stride(0), y.stride(0), BLOCK_N=_BLOCK_N,
            **_step_meta(mode, y, phi, fp32), **_LAUNCH,
        )
    return out


def ista_step_bwd(mode, grad, src, u, y, phi, w, rows_per_partial, fp32=None):
    """Returns (grad_x, grad_y, part_phi (blocks, d, D), part_w (blocks,)); all but grad_x in float32."""
    from .._triton import interpreting

    n, (d, big_d) = y.shape[0], phi.shape
    grad_x = torch.empty(n, big_d, device=y.device, dtype=y.dtype)
    grad_y = torch.empty(y.shape, device=y.device, dtype=torch.float32)
    blocks = max(1, triton.cdiv(n, rows_per_partial))
    part_phi = torch.zeros(blocks, d, big_d, device=y.device, dtype=torch.float32)
    part_w = torch.zeros(blocks, device=y.device, dtype=torch.float32)
    if rows_per_partial % _BLOCK_N:
        raise ValueError(f"rows_per_partial must be a multiple of {_BLOCK_N}, got {rows_per_partial}")
    if n:
        u_ = u if u is not None else src
        _ista_step_bwd_kernel[(blocks,)](
            grad, src, u_, y, phi, w, grad_x, grad_y, part_phi, part_w, n, big_d, d, grad.stride(0),
            src.stride(0), u_.stride(0), y.stride(0), rows_per_partial, BLOCK_N=_BLOCK_N, INTERPRET=interpreting(),
            **_step_meta(mode, y, phi, fp32), **_LAUNCH,
        )
    return grad_x, grad_y, part_phi, part_w
