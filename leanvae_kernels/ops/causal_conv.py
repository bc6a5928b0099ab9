"""Causal depthwise 3x3x3 convolution on channels-last tokens (the model's PEG3D), with cache state.

Contract:
    x: (B, T, H, W, C) any strides, weight: (C, 1, 3, 3, 3), bias: (C,) or None.
    Causal mode (group_size == 0):
        y[b,t,h,w,c] = bias[c] + sum_{i,j,k} weight[c,0,i,j,k] * xp[b, t+i, h+j-1, w+k-1, c]
        where xp is x with two frames in front (zeros, or `cache`: (B, 2, H, W, C), the previous chunk's
        last two *input* frames) and zeros outside H and W. new_cache = last two frames of
        cat(cache or zeros, x) along T, so a one-frame chunk works.
    Group-causal mode (group_size = g > 0, IV-VAE's GCConv): frames are split into groups of g from the
        start of the call; within a group taps are centred (t-1, t, t+1); the tap before a group's first
        frame reads the previous group's last frame (first group: `cache` (B, 1, H, W, C), or zeros); the
        tap after a group's last frame reads zeros. new_cache = the call's last frame (B, 1, H, W, C).
    residual=True returns y + x (the model's ResNAF adds it).
    Halo rows (a band of rows of a taller frame, as in patch-parallel inference): halo_top / halo_bottom:
        (B, P+T, W, C) or None, P = 2 in causal mode, 1 in group mode: the frame row just above row 0
        (just below row H-1) of x, for every frame of cat(cache or zeros, x) along T. None: zeros (the
        true frame edge). The result equals the matching rows of one call on the taller frame
        cat(halo_top, x, halo_bottom) along H with the matching taller cache; new_cache is the band's own.
Chunked calls that pass the returned cache equal one full call exactly (chunks of whole groups in
group mode): every backend accumulates an output in the same order (bias, then taps (i, j, k)) whether a
tap reads the cache or x. The weight/bias gradients are reductions over B*T*H*W done as fixed blocks of
partial sums added in a fixed order: deterministic, independent of the thread count.

Chain of names (CRAFT.md): kernels `_causal_dwconv3d_kernel` / `_causal_dwconv3d_wgrad_kernel` (Triton,
CUDA; CUDA block / thread bodies `ConvBlock` / `wgrad_thread` in csrc/cuda/causal_conv_body.cuh) and
`conv_frames` / `conv_weight_grad` (csrc/cpu/causal_conv.cpp) -> native kernels "causal_dwconv3d_fwd",
"causal_dwconv3d_bwd_input", "causal_dwconv3d_bwd_weight" / Triton launchers of the same names ->
`torch.ops.leanvae.causal_dwconv3d` (+ `causal_dwconv3d_backward`) -> `causal_dwconv3d()` below ->
`leanvae.fused.peg3d` (FusedPEG3D, fused_peg3d_forward, fused_naf_forward, fused_resnaf_forward).
"""
import torch
import torch.nn.functional as F

from .. import _native
from .._backend import OpBackends, resolve
from ._define import Backward, define_op
from ._common import ALL_DTYPES, GPU_DTYPES, acc_dtype, check_same_device, check_same_dtype, check_tensor, describe, vjp


def _cache_frames(group_size):
    return 1 if group_size > 0 else 2


def causal_dwconv3d_reference(x, weight, bias=None, cache=None, residual=False, group_size=0,
                              halo_top=None, halo_bottom=None):
    """The spec, in float32 (float64 for float64). Returns (y, new_cache); y: (B, T, H, W, C) in x's dtype.

    With halo rows: the band is the middle rows of a frame two rows taller (see the module docstring).
    """
    if halo_top is not None or halo_bottom is not None:
        xe, ce = _extend_rows(x, cache, group_size, halo_top, halo_bottom)
        y, _ = causal_dwconv3d_reference(xe, weight, bias, ce, residual, group_size)
        h = x.shape[2]
        new_cache = torch.cat([ce, xe], dim=1)[:, -_cache_frames(group_size):, 1 : h + 1]
        return y[:, :, 1 : h + 1].contiguous(), new_cache.contiguous()
    acc = acc_dtype(x.dtype)
    b, t, h, w, c = x.shape
    n_cache = _cache_frames(group_size)
    xf = x.to(acc)
    prev = cache.to(acc) if cache is not None else xf.new_zeros((b, n_cache, h, w, c))
    wf = weight.to(acc)
    bf = bias.to(acc) if bias is not None else None
    if group_size == 0:
        xp = torch.cat([prev, xf], dim=1).permute(0, 4, 1, 2, 3)            # (B, C, T+2, H, W)
        y = F.conv3d(F.pad(xp, (1, 1, 1, 1)), wf, bf, groups=c)
    else:
        outs, last = [], prev
        for start in range(0, t, group_size):
            g = xf[:, start : start + group_size]
            xp = torch.cat([last, g, torch.zeros_like(g[:, :1])], dim=1).permute(0, 4, 1, 2, 3)
            outs.append(F.conv3d(F.pad(xp, (1, 1, 1, 1)), wf, bf, groups=c))
            last = g[:, -1:]
        y = torch.cat(outs, dim=2)
    y = y.permute(0, 2, 3, 4, 1)
    if residual:
        y = y + xf
    new_cache = torch.cat([prev, xf], dim=1)[:, -n_cache:]
    return y.to(x.dtype).contiguous(), new_cache.to(x.dtype).clone(memory_format=torch.contiguous_format)


def _check(x, weight, bias, cache, residual, group_size):
    op = "causal_dwconv3d"
    check_tensor(op, "x", x, ndim=5, layout="(B, T, H, W, C)")
    check_tensor(op, "weight", weight, ndim=5, layout="(C, 1, 3, 3, 3)")
    check_tensor(op, "bias", bias, ndim=1, layout="(C,)", optional=True)
    check_tensor(op, "cache", cache, ndim=5, layout="(B, frames, H, W, C)", optional=True)
    named = [("x", x), ("weight", weight), ("bias", bias), ("cache", cache)]
    check_same_device(op, named)
    check_same_dtype(op, named)
    b, t, h, w, c = x.shape
    if min(b, t, h, w, c) == 0:
        raise ValueError(f"{op}: x must not be empty, got {describe(x)}")
    if tuple(weight.shape) != (c, 1, 3, 3, 3):
        raise ValueError(f"{op}: weight must be (C, 1, 3, 3, 3) = ({c}, 1, 3, 3, 3) for x with C={c}, got {describe(weight)}")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"{op}: bias must be (C,) = ({c},), got {describe(bias)}")
    if not isinstance(residual, bool):
        raise TypeError(f"{op}: residual must be a bool, got {residual!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0:
        raise ValueError(f"{op}: group_size must be an int >= 0 (0: causal mode), got {group_size!r}")
    n_cache = _cache_frames(group_size)
    if cache is not None and tuple(cache.shape) != (b, n_cache, h, w, c):
        raise ValueError(f"{op}: cache must be (B, {n_cache}, H, W, C) = {(b, n_cache, h, w, c)}, got {describe(cache)}")


def _check_halos(x, halo_top, halo_bottom, group_size):
    op = "causal_dwconv3d"
    b, t, h, w, c = x.shape
    want = (b, _cache_frames(group_size) + t, w, c)
    for name, halo in (("halo_top", halo_top), ("halo_bottom", halo_bottom)):
        if halo is None:
            continue
        check_tensor(op, name, halo, ndim=4, layout="(B, P+T, W, C)")
        if tuple(halo.shape) != want:
            raise ValueError(f"{op}: {name} must be (B, P+T, W, C) = {want} (P = {want[1] - t} cache frames, then "
                             f"the T frames of x), got {describe(halo)}")
        check_same_device(op, [("x", x), (name, halo)])
        check_same_dtype(op, [("x", x), (name, halo)])


def _extend_rows(x, cache, group_size, halo_top, halo_bottom, first=-1, last=None):
    """Rows first..last (inclusive) of the taller frame the band belongs to, as (x rows, cache rows): row -1
    is halo_top, row H is halo_bottom, rows 0..H-1 are the band's (default: all of them, -1..H). An absent
    halo or cache is zeros. Only the rows asked for are copied."""
    b, t, h, w, c = x.shape
    p = _cache_frames(group_size)
    last = h if last is None else last
    xs, cs = [], []
    if first < 0:
        top = halo_top if halo_top is not None else x.new_zeros((b, p + t, w, c))
        xs.append(top[:, p:, None])
        cs.append(top[:, :p, None])
    lo, hi = max(first, 0), min(last, h - 1) + 1
    if lo < hi:
        xs.append(x[:, :, lo:hi])
        cs.append(cache[:, :, lo:hi] if cache is not None else x.new_zeros((b, p, hi - lo, w, c)))
    if last >= h:
        bottom = halo_bottom if halo_bottom is not None else x.new_zeros((b, p + t, w, c))
        xs.append(bottom[:, p:, None])
        cs.append(bottom[:, :p, None])
    return torch.cat(xs, dim=2), torch.cat(cs, dim=2)


def _with_halos(y, x, weight, bias, cache, residual, group_size, halo_top, halo_bottom, backend):
    """Replace the band's edge rows of a zero-padded call's `y` with rows that read the halos.

    An edge row r (0 and/or H-1) depends only on rows r-1..r+1 of the taller frame, so the same kernel
    is run on those three rows (a few rows copied, never the band) and its middle row is taken. It is the
    same kernel with the same per-output accumulation order as a call on the whole frame, so the result
    is that call's rows bit for bit; autograd flows through the slab call to x, cache, weight, bias and
    the halos."""
    h = x.shape[2]
    rows = [0] if halo_top is not None else []
    if halo_bottom is not None and h - 1 not in rows:
        rows.append(h - 1)  # with H == 1 one slab (halo_top, x, halo_bottom) serves both halos
    slabs = [_extend_rows(x, cache, group_size, halo_top, halo_bottom, r - 1, r + 1) for r in rows]
    xs = torch.cat([xe for xe, _ in slabs], dim=0)
    cs = torch.cat([ce for _, ce in slabs], dim=0)
    ys, _ = torch.ops.leanvae.causal_dwconv3d(xs, weight, bias, cs, residual, group_size, backend)
    b = x.shape[0]
    for i, r in enumerate(rows):
        y[:, :, r] = ys[i * b : (i + 1) * b, :, 1]
    return y


fwd = OpBackends("causal_dwconv3d")
bwd = OpBackends("causal_dwconv3d_backward")
fwd.register("reference", ALL_DTYPES)(causal_dwconv3d_reference)


@bwd.register("reference", ALL_DTYPES)
def _(grad_y, grad_cache, x, weight, bias, cache, residual, group_size):
    def f(x_, w_, b_, c_):
        return causal_dwconv3d_reference(x_, w_, b_, c_, residual, group_size)

    gx, gw, gb, gc = vjp(f, (x, weight, bias, cache), (grad_y, grad_cache))
    return gx, gw, gb, gc


def _weights27(weight, flip=False):
    """(C, 1, 3, 3, 3) -> (27, C) in the accumulation dtype, tap (i, j, k) major, so a kernel reads a tap's
    channels contiguously. flip: spatial taps mirrored (j, k -> 2-j, 2-k), the adjoint's weights."""
    w = weight.reshape(weight.shape[0], 3, 3, 3)
    if flip:
        w = w.flip(2, 3)
    return w.reshape(weight.shape[0], 27).t().to(acc_dtype(weight.dtype)).contiguous()


def _group_end_frames(t, group_size):
    """Output frames whose next-frame tap (i = 2) falls past the end of their group: they read zeros."""
    return [min(t, start + group_size) - 1 for start in range(0, t, group_size)]


def _group_end_zeros(y, weight, group_size):
    """The reference multiplies the zeros after each group by the next-frame taps; the kernels skip those
    taps. The products are 0, or NaN where such a weight is Inf/NaN: add them (per channel, the same for
    every pixel) to the group-end frames so the NaN pattern is the reference's. Group mode only; y is a
    fresh output of the op, updated in place (adding 0 changes no value)."""
    if group_size == 0:
        return y
    zero_taps = (weight[:, 0, 2].to(acc_dtype(weight.dtype)) * 0).sum((1, 2)).to(y.dtype)
    for e in _group_end_frames(y.shape[1], group_size):
        y[:, e] += zero_taps
    return y


def _group_end_zeros_grad(gw, grad_y, group_size):
    """Weight-gradient side of `_group_end_zeros`: the next-frame taps of the group-end outputs met zeros,
    so they add sum(grad_y * 0) there (0, or NaN where grad_y is Inf/NaN), as in the reference."""
    if group_size == 0:
        return gw
    ends = _group_end_frames(grad_y.shape[1], group_size)
    zero_sum = (grad_y[:, ends].to(gw.dtype) * 0).sum((0, 1, 2, 3))
    gw[:, 0, 2] += zero_sum[:, None, None]
    return gw


# Rows x columns of pixels per partial sum of the native weight grads (checked by the kernels).
_WGRAD_TILE = {"cpu": (4, 8), "cuda": (8, 32)}


def _native_fns(backend, suffix="", tile=None, run=None):
    """(forward, backward) implementations calling the native kernels "causal_dwconv3d_*{suffix}" of `backend`
    through `run` (default `_native.run`, same signature).

    Kernels read x, cache and the gradients with their strides (no copy); outputs are contiguous.
    """
    rows, cols = _WGRAD_TILE[tile or backend]
    if run is None:  # looked up per call, as the other ops do, so a wrapper of _native.run sees these kernels too
        def run(*args, **kwargs):
            return _native.run(*args, **kwargs)

    def forward(x, weight, bias, cache, residual, group_size):
        b, t, h, w, c = x.shape
        w27 = _weights27(weight)
        bias27 = bias.to(w27.dtype).contiguous() if bias is not None else w27
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        new_cache = torch.empty((b, _cache_frames(group_size), h, w, c), dtype=x.dtype, device=x.device)
        run(backend, "causal_dwconv3d_fwd" + suffix, [x, cache if cache is not None else x, w27, bias27, y,
                                                              new_cache],
                    ints=[cache is not None, bias is not None, residual, group_size])
        return _group_end_zeros(y, weight, group_size), new_cache

    def backward(grad_y, grad_cache, x, weight, bias, cache, residual, group_size):
        b, t, h, w, c = x.shape
        grad_y, grad_cache = grad_y.to(x.dtype), grad_cache.to(x.dtype)
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        gc = torch.empty(cache.shape, dtype=x.dtype, device=x.device) if cache is not None else None
        run(backend, "causal_dwconv3d_bwd_input" + suffix,
                    [grad_y, grad_cache, _weights27(weight, flip=True), gx, gc if gc is not None else gx],
                    ints=[cache is not None, residual, group_size])
        acc = acc_dtype(x.dtype)
        gw27 = torch.empty((27, c), dtype=acc, device=x.device)
        gb = torch.empty((c,), dtype=acc, device=x.device)
        part = torch.empty((b * -(-h // rows) * -(-w // cols), 28, c), dtype=acc, device=x.device)
        run(backend, "causal_dwconv3d_bwd_weight" + suffix,
                    [x, cache if cache is not None else x, grad_y, gw27, gb, part],
                    ints=[cache is not None, group_size, rows, cols])
        gw = _group_end_zeros_grad(gw27.t().contiguous().reshape(weight.shape), grad_y, group_size).to(weight.dtype)
        return gx, gw, gb.to(bias.dtype) if bias is not None else None, gc

    return forward, backward


for _backend, _dtypes in (("cpu", ALL_DTYPES), ("cuda", GPU_DTYPES)):
    _f, _b = _native_fns(_backend)
    fwd.register(_backend, _dtypes)(_f)
    bwd.register(_backend, _dtypes)(_b)

def _bias32(bias):
    return bias.float().contiguous() if bias is not None else None


@fwd.register("triton", GPU_DTYPES)
def _(x, weight, bias, cache, residual, group_size):
    from ..triton.causal_conv import causal_dwconv3d_fwd

    y, new_cache = causal_dwconv3d_fwd(x, cache, _weights27(weight), _bias32(bias), residual, group_size)
    return _group_end_zeros(y, weight, group_size), new_cache


@bwd.register("triton", GPU_DTYPES)
def _(grad_y, grad_cache, x, weight, bias, cache, residual, group_size):
    from ..triton.causal_conv import causal_dwconv3d_bwd_input, causal_dwconv3d_bwd_weight

    grad_y, grad_cache = grad_y.to(x.dtype), grad_cache.to(x.dtype)
    gx, gc = causal_dwconv3d_bwd_input(grad_y, grad_cache, _weights27(weight, flip=True), cache is not None,
                                       residual, group_size)
    gw27, gb = causal_dwconv3d_bwd_weight(grad_y, x, cache, group_size)
    gw = _group_end_zeros_grad(gw27.t().contiguous().reshape(weight.shape), grad_y, group_size).to(weight.dtype)
    return gx, gw, gb.to(bias.dtype) if bias is not None else None, gc


def _conv_backward_impl(grad_y, grad_cache, x, weight, bias, cache, residual, group_size, backend):
    gx, gw, gb, gc = bwd(backend, x.device, x.dtype, grad_y, grad_cache, x, weight, bias, cache, residual, group_size)
    # Fixed output arity for the schema: absent inputs get an empty gradient, dropped by the gradient rule.
    empty = x.new_empty((0,))
    return gx, gw, gb if gb is not None else empty, gc if gc is not None else empty.clone()


def _conv_backward_fake(grad_y, grad_cache, x, weight, bias, cache, residual, group_size, backend):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,)),
        cache.new_empty(cache.shape) if cache is not None else x.new_empty((0,)),
    )


def _conv_rule(bwd_op, inputs, grad_y, grad_cache):
    x, weight, bias, cache, residual, group_size, backend = inputs
    b, t, h, w, c = x.shape
    if grad_y is None:
        grad_y = x.new_zeros(x.shape)
    if grad_cache is None:
        grad_cache = x.new_zeros((b, _cache_frames(group_size), h, w, c))
    gx, gw, gb, gc = bwd_op(grad_y, grad_cache, *inputs)
    return gx, gw, gb if bias is not None else None, gc if cache is not None else None, None, None


def _conv_fake(x, weight, bias, cache, residual, group_size, backend):
    b, t, h, w, c = x.shape
    return x.new_empty(x.shape), x.new_empty((b, _cache_frames(group_size), h, w, c))


_conv = define_op(
    "causal_dwconv3d",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? cache, bool residual, SymInt group_size, str backend) "
    "-> (Tensor, Tensor)",
    impl=lambda x, weight, bias, cache, residual, group_size, backend: fwd(
        backend, x.device, x.dtype, x, weight, bias, cache, residual, group_size),
    fake=_conv_fake,
    check=_check,
    backward=Backward(
        "(Tensor grad_y, Tensor grad_cache, Tensor x, Tensor weight, Tensor? bias, Tensor? cache, bool residual, "
        "SymInt group_size, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
        impl=_conv_backward_impl,
        fake=_conv_backward_fake,
        rule=_conv_rule,
    ),
)


def causal_dwconv3d(x, weight, bias=None, cache=None, *, residual=False, group_size=0, halo_top=None,
                    halo_bottom=None, backend=None):
    """Causal depthwise 3x3x3 conv on channels-last tokens. Returns (y, new_cache).

    x: (B, T, H, W, C); weight: (C, 1, 3, 3, 3); bias: (C,) or None; cache: (B, 2, H, W, C) or None
    (group mode: (B, 1, H, W, C)). y: (B, T, H, W, C) (plus x when `residual`).
    halo_top / halo_bottom: (B, P+T, W, C) or None (P = cache frames, 2 or 1): the rows just above / below
    x in a taller frame, for the frames of cat(cache or zeros, x); a band so computed equals those rows of
    a call on the whole frame (module docstring). Every backend; differentiable in the halos too.
    """
    _check(x, weight, bias, cache, residual, group_size)
    _check_halos(x, halo_top, halo_bottom, group_size)
    backend = resolve(backend)
    y, new_cache = _conv.call_validated(x, weight, bias, cache, residual, group_size, backend=backend)
    if halo_top is not None or halo_bottom is not None:
        y = _with_halos(y, x, weight, bias, cache, residual, group_size, halo_top, halo_bottom, backend)
    return y, new_cache
