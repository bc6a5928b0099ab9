"""Multi-level latent wavelet compression (LC-VAE, arXiv 2604.16479), fused and differentiable.

    haar_latent_compress(z, levels, keep)    z (B, C, T, H, W) -> (B, K*C, T/2^L, H/2^L, W/2^L)
    haar_latent_decompress(zc, levels, keep) the exact inverse on the kept sub-space: zero-fills the
                                             dropped sub-bands and reconstructs (B, C, T, H, W)

Our reading of LC-VAE (its code is not public; the project page and the issue are the sources): the 3-D
Haar transform is applied L times, each level to the previous level's low band LLL (the usual dyadic
pyramid); the detail bands of the finer levels are discarded, and of the coarsest level's eight
sub-bands only those in `keep` are retained, by default LC-VAE's four low-frequency ones LLL, LLH,
LHL, HLL (at most one high-pass axis). Band names list the filter along T, H, W (`LLH`: high-pass
along W), the order of the model's channel layout (band = 4*bt + 2*bh + bw). `drop=True` returns the
kept bands only, concatenated in `keep` order, band-major (`k*C + c`); `drop=False` keeps all eight
band slots and zeros the others. decompress(compress(z)) is the orthogonal projection of z onto the
kept sub-space (with the default orthonormal scaling, `rescale=False`: each level multiplies by
1/(2*sqrt2), as an orthonormal Haar basis; `rescale=True` uses the model's Patcher convention).

T, H and W must be divisible by 2^levels: the exact inverse has no reflect padding to undo.

Fused: each level is one pass of the Haar analysis/synthesis kernels of ops/haar.py, reading its input
once and writing only what is kept (the LLL band between levels, the kept bands at the end), so the
whole transform moves about 1/7 more data than a single pass. The backward passes are the adjoints.
"""
import torch

from .._backend import OpBackends
from ._common import ALL_DTYPES, GPU_DTYPES, acc_dtype, check_tensor, describe, vjp
from ._define import Backward, define_op
from .haar import _INV3, _S3, analysis, haar_dwt3d_reference, haar_idwt3d_reference, synthesis

BAND_NAMES = ("LLL", "LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH")  # index 4*bt + 2*bh + bw
DEFAULT_KEEP = ("LLL", "LLH", "LHL", "HLL")
_LLL_ONLY = ((0,) + (-1,) * 7, 0x01)  # (slots, mask): keep the low band only, as channel block 0


def parse_keep(keep, op="haar_latent"):
    """Band names ('LLH') or indices (0..7), unique, non-empty -> tuple of indices in the given order."""
    if isinstance(keep, (str, int)):
        keep = (keep,)
    try:
        items = list(keep)
    except TypeError:
        raise TypeError(f"{op}: keep must be a sequence of band names {BAND_NAMES} or indices 0..7, got {keep!r}") from None
    out = []
    for k in items:
        if isinstance(k, str) and k.upper() in BAND_NAMES:
            out.append(BAND_NAMES.index(k.upper()))
        elif isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 8:
            out.append(int(k))
        else:
            raise ValueError(f"{op}: keep entries must be band names {BAND_NAMES} or indices 0..7, got {k!r}")
    if not out:
        raise ValueError(f"{op}: keep must name at least one sub-band, got {keep!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: keep names a sub-band twice: {keep!r}")
    return tuple(out)


def _band_map(keep, drop):
    """(slots, mask) of the kernels for the final level."""
    if drop:
        slots = [-1] * 8
        for i, k in enumerate(keep):
            slots[k] = i
        return tuple(slots), 0xFF
    return tuple(range(8)), sum(1 << k for k in keep)


def _check_levels(op, levels):
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise ValueError(f"{op}: levels must be an int >= 1, got {levels!r}")


def _check_latent(z, levels):
    op = "haar_latent_compress"
    check_tensor(op, "z", z, ndim=5, layout="(B, C, T, H, W)")
    _check_levels(op, levels)
    if min(z.shape) == 0:
        raise ValueError(f"{op}: z must not be empty, got {describe(z)}")
    f = 1 << levels
    if any(n % f for n in z.shape[2:]):
        raise ValueError(
            f"{op}: z needs T, H and W divisible by 2^levels = {f} (levels={levels}), got {describe(z)}; "
            "pad the latent first"
        )


def _check_compressed(zc, levels, keep, drop):
    op = "haar_latent_decompress"
    check_tensor(op, "zc", zc, ndim=5, layout="(B, K*C, T, H, W)")
    _check_levels(op, levels)
    n = len(keep) if drop else 8
    if min(zc.shape) == 0 or zc.shape[1] % n:
        what = f"K*C channels with K = {n} kept bands" if drop else "8*C channels (drop=False)"
        raise ValueError(f"{op}: zc must have {what}, got {describe(zc)}")


def _compressed_shape(shape, levels, keep, drop):
    b, c, t, h, w = shape
    f = 1 << levels
    return (b, (len(keep) if drop else 8) * c, t // f, h // f, w // f)


def _latent_shape(shape, levels, keep, drop):
    b, kc, t, h, w = shape
    f = 1 << levels
    return (b, kc // (len(keep) if drop else 8), t * f, h * f, w * f)


# -------------------------------------------------------------------------------------- references
def haar_latent_compress_reference(z, levels=1, keep=DEFAULT_KEEP, drop=True, rescale=False):
    """The spec: `levels` 3-D Haar transforms (each of the previous LLL) in float32, kept bands selected."""
    keep = parse_keep(keep)
    c = z.shape[1]
    low = z.to(acc_dtype(z.dtype))
    for _ in range(levels - 1):
        low = haar_dwt3d_reference(low, rescale)[:, :c]
    bands = haar_dwt3d_reference(low, rescale).chunk(8, dim=1)
    if drop:
        out = [bands[k] for k in keep]
    else:
        out = [bands[k] if k in keep else torch.zeros_like(bands[k]) for k in range(8)]
    return torch.cat(out, dim=1).to(z.dtype)


def haar_latent_decompress_reference(zc, levels=1, keep=DEFAULT_KEEP, drop=True, rescale=False):
    """The spec: zero-fill the dropped bands and the finer levels' details, invert `levels` times."""
    keep = parse_keep(keep)
    x = zc.to(acc_dtype(zc.dtype))
    parts = x.chunk(len(keep) if drop else 8, dim=1)
    zero = torch.zeros_like(parts[0])
    if drop:
        bands = [zero] * 8
        for i, k in enumerate(keep):
            bands[k] = parts[i]
    else:
        bands = [parts[k] if k in keep else zero for k in range(8)]
    y = haar_idwt3d_reference(torch.cat(bands, dim=1), rescale)
    for _ in range(levels - 1):
        y = haar_idwt3d_reference(torch.cat([y] + [torch.zeros_like(y)] * 7, dim=1), rescale)
    return y.to(zc.dtype)


# ---------------------------------------------------------------------------- fused implementations
# Between levels the band stays in the accumulation dtype (float32 for 16-bit inputs), as in the
# reference: each level reads the previous one's float32 output and only the last level rounds to the
# input dtype (a 16-bit band between levels overflowed, e.g. 6e4 in float16, and doubled the error).
def _compress_fused(backend, z, levels, keep, drop, rescale):
    s = _S3[rescale]
    dtype, acc = z.dtype, acc_dtype(z.dtype)
    for _ in range(levels - 1):
        z = analysis(backend, z, three_d=True, s3=s, slots=_LLL_ONLY[0], mask=_LLL_ONLY[1], out_dtype=acc)[1]
    slots, mask = _band_map(keep, drop)
    return analysis(backend, z, three_d=True, s3=s, slots=slots, mask=mask, out_dtype=dtype)[1]


def _compress_adjoint(backend, grad, shape, levels, keep, drop, rescale):
    """The adjoint of _compress_fused: synthesis with the forward scales, finest level last."""
    s = _S3[rescale]
    b, c, t, h, w = shape
    slots, mask = _band_map(keep, drop)
    dtype, acc = grad.dtype, acc_dtype(grad.dtype)
    f = 1 << (levels - 1)
    g = synthesis(backend, None, grad, (b, c, t // f, h // f, w // f), s3=s, slots=slots, mask=mask,
                  out_dtype=acc if levels > 1 else dtype)
    for level in range(levels - 1):
        f //= 2
        g = synthesis(backend, None, g, (b, c, t // f, h // f, w // f), s3=s, slots=_LLL_ONLY[0], mask=_LLL_ONLY[1],
                      out_dtype=dtype if level == levels - 2 else acc)
    return g


def _decompress_fused(backend, zc, levels, keep, drop, rescale):
    s = _INV3[rescale]
    slots, mask = _band_map(keep, drop)
    b, kc, t, h, w = zc.shape
    c = kc // (len(keep) if drop else 8)
    dtype, acc = zc.dtype, acc_dtype(zc.dtype)
    y = synthesis(backend, None, zc, (b, c, 2 * t, 2 * h, 2 * w), s3=s, slots=slots, mask=mask,
                  out_dtype=acc if levels > 1 else dtype)
    for level in range(levels - 1):
        y = synthesis(backend, None, y, (b, c, 2 * y.shape[2], 2 * y.shape[3], 2 * y.shape[4]), s3=s,
                      slots=_LLL_ONLY[0], mask=_LLL_ONLY[1], out_dtype=dtype if level == levels - 2 else acc)
    return y


def _decompress_adjoint(backend, grad, levels, keep, drop, rescale):
    s = _INV3[rescale]
    dtype, acc = grad.dtype, acc_dtype(grad.dtype)
    for _ in range(levels - 1):
        grad = analysis(backend, grad, three_d=True, s3=s, slots=_LLL_ONLY[0], mask=_LLL_ONLY[1], out_dtype=acc)[1]
    slots, mask = _band_map(keep, drop)
    return analysis(backend, grad, three_d=True, s3=s, slots=slots, mask=mask, out_dtype=dtype)[1]


compress_fwd, compress_bwd = OpBackends("haar_latent_compress"), OpBackends("haar_latent_compress_backward")
decompress_fwd, decompress_bwd = OpBackends("haar_latent_decompress"), OpBackends("haar_latent_decompress_backward")


@compress_fwd.register("reference", ALL_DTYPES)
def _(z, levels, keep, drop, rescale):
    return haar_latent_compress_reference(z, levels, keep, drop, rescale)


@compress_bwd.register("reference", ALL_DTYPES)
def _(grad, shape, levels, keep, drop, rescale):
    z = grad.new_zeros(shape)  # linear op: the vjp does not depend on z
    return vjp(lambda t: haar_latent_compress_reference(t, levels, keep, drop, rescale), (z,), grad)[0]


@decompress_fwd.register("reference", ALL_DTYPES)
def _(zc, levels, keep, drop, rescale):
    return haar_latent_decompress_reference(zc, levels, keep, drop, rescale)


@decompress_bwd.register("reference", ALL_DTYPES)
def _(grad, shape, levels, keep, drop, rescale):
    zc = grad.new_zeros(shape)
    return vjp(lambda t: haar_latent_decompress_reference(t, levels, keep, drop, rescale), (zc,), grad)[0]


def _register_fused(backend, dtypes):
    compress_fwd.register(backend, dtypes)(
        lambda z, levels, keep, drop, rescale: _compress_fused(backend, z, levels, keep, drop, rescale))
    compress_bwd.register(backend, dtypes)(
        lambda grad, shape, levels, keep, drop, rescale: _compress_adjoint(backend, grad, shape, levels, keep, drop, rescale))
    decompress_fwd.register(backend, dtypes)(
        lambda zc, levels, keep, drop, rescale: _decompress_fused(backend, zc, levels, keep, drop, rescale))
    decompress_bwd.register(backend, dtypes)(
        lambda grad, shape, levels, keep, drop, rescale: _decompress_adjoint(backend, grad, levels, keep, drop, rescale))


_register_fused("cpu", ALL_DTYPES)
_register_fused("cuda", GPU_DTYPES)
_register_fused("triton", GPU_DTYPES)


# ------------------------------------------------------------------------------------ custom ops
def _linear_backward(bwd):
    """Both ops are linear: the backward needs only the input's shape (the input itself is not kept)."""
    return Backward(
        "(Tensor grad, SymInt[] shape, SymInt levels, SymInt[] keep, bool drop, bool rescale, str backend) -> Tensor",
        impl=lambda grad, shape, levels, keep, drop, rescale, backend: bwd(
            backend, grad.device, grad.dtype, grad, tuple(shape), levels, tuple(keep), drop, rescale),
        fake=lambda grad, shape, levels, keep, drop, rescale, backend: grad.new_empty(shape),
        rule=lambda bwd_op, inputs, grad: (bwd_op(grad, *inputs), None, None, None, None),
        keep=lambda inputs: (list(inputs[0].shape),) + tuple(inputs[1:]),
    )


_compress = define_op(
    "haar_latent_compress",
    "(Tensor z, SymInt levels, SymInt[] keep, bool drop, bool rescale, str backend) -> Tensor",
    impl=lambda z, levels, keep, drop, rescale, backend: compress_fwd(
        backend, z.device, z.dtype, z, levels, tuple(keep), drop, rescale),
    fake=lambda z, levels, keep, drop, rescale, backend: z.new_empty(_compressed_shape(z.shape, levels, keep, drop)),
    check=lambda z, levels, keep, drop, rescale: _check_latent(z, levels),
    backward=_linear_backward(compress_bwd),
)

_decompress = define_op(
    "haar_latent_decompress",
    "(Tensor zc, SymInt levels, SymInt[] keep, bool drop, bool rescale, str backend) -> Tensor",
    impl=lambda zc, levels, keep, drop, rescale, backend: decompress_fwd(
        backend, zc.device, zc.dtype, zc, levels, tuple(keep), drop, rescale),
    fake=lambda zc, levels, keep, drop, rescale, backend: zc.new_empty(_latent_shape(zc.shape, levels, keep, drop)),
    check=lambda zc, levels, keep, drop, rescale: _check_compressed(zc, levels, keep, drop),
    backward=_linear_backward(decompress_bwd),
)


# ------------------------------------------------------------------------------------ public API
def haar_latent_compress(z, levels=1, keep=DEFAULT_KEEP, *, drop=True, rescale=False, backend=None):
    """z: (B, C, T, H, W), T/H/W divisible by 2^levels -> the kept coarsest-level sub-bands:
    (B, K*C, T/2^L, H/2^L, W/2^L) (drop=True, `keep` order) or (B, 8C, ...) with the others zeroed."""
    keep = parse_keep(keep, "haar_latent_compress")
    return _compress(z, levels, list(keep), bool(drop), bool(rescale), backend=backend)


def haar_latent_decompress(zc, levels=1, keep=DEFAULT_KEEP, *, drop=True, rescale=False, backend=None):
    """The inverse of `haar_latent_compress` with the same arguments: zero-fills what was dropped and
    reconstructs (B, C, T*2^L, H*2^L, W*2^L). With drop=False, bands outside `keep` are read as zero."""
    keep = parse_keep(keep, "haar_latent_decompress")
    return _decompress(zc, levels, list(keep), bool(drop), bool(rescale), backend=backend)
