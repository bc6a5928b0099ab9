"""Triton kernels for GEGLU: out = value * gelu(gate) over u = [value | gate], and its backward.

One program per (row, BLOCK columns): u's rows are read once (value and gate halves), the result written once.
Float32 math for every dtype; gelu(g) = g * Phi(g) with Phi(g) = (1 + erf(g / sqrt2)) / 2 (libdevice's erf
on a GPU, within 2 float32 ulps), as torch's float path computes it.
"""
import torch
import triton
import triton.language as tl

_BLOCK = 1024
_RSQRT2 = tl.constexpr(0.7071067811865476)  # jit functions read only constexpr globals
_RSQRT2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _cdf(g):
    return 0.5 + 0.5 * tl.math.erf(g * _RSQRT2)


@triton.jit
def _geglu_fwd_kernel(u_ptr, out_ptr, p, u_rs, out_rs, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < p
    v = tl.load(u_ptr + row * u_rs + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(u_ptr + row * u_rs + p + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_rs + cols, (v * (g * _cdf(g))).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(grad_ptr, u_ptr, grad_u_ptr, p, grad_rs, u_rs, grad_u_rs, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < p
    v = tl.load(u_ptr + row * u_rs + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(u_ptr + row * u_rs + p + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(grad_ptr + row * grad_rs + cols, mask=mask, other=0.0).to(tl.float32)
    cdf = _cdf(g)
    # gelu'(g) = Phi(g) + g * phi(g): at g = +-inf that is inf * 0 = NaN, as in torch's GELU backward
    d = cdf + g * (tl.exp(-0.5 * g * g) * _RSQRT2PI)
    ty = grad_u_ptr.dtype.element_ty
    tl.store(grad_u_ptr + row * grad_u_rs + cols, (dy * (g * cdf)).to(ty), mask=mask)
    tl.store(grad_u_ptr + row * grad_u_rs + p + cols, ((dy * v) * d).to(ty), mask=mask)


def _block(p):
    from .._triton import next_power_of_2

    return min(_BLOCK, max(16, next_power_of_2(p)))


def geglu_fwd(u):
    """u: (N, 2p), unit column stride. Returns a contiguous (N, p) tensor of u's dtype."""
    n, p = u.shape[0], u.shape[1] // 2
    out = torch.empty(n, p, device=u.device, dtype=u.dtype)
    if out.numel():
        block = _block(p)
        _geglu_fwd_kernel[(n, triton.cdiv(p, block))](u, out, p, u.stride(0), out.stride(0), BLOCK=block)
    return out


def geglu_bwd(grad, u):
    """grad: (N, p), u: (N, 2p), unit column strides. Returns grad_u, a contiguous (N, 2p) tensor."""
    n, p = u.shape[0], u.shape[1] // 2
    grad_u = torch.empty(n, 2 * p, device=u.device, dtype=u.dtype)
    if grad_u.numel():
        block = _block(p)
        _geglu_bwd_kernel[(n, triton.cdiv(p, block))](
            grad, u, grad_u, p, grad.stride(0), u.stride(0), grad_u.stride(0), BLOCK=block
        )
    return grad_u
