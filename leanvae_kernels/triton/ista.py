"""Triton kernels for the ISTA ops (soft threshold; the gradient step lives beside it)."""
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
    gs = tl.where(tl.abs(v) - th > 0, g * s, 0.0)
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
