"""Haar wavelet ops: 3-D and 2-D DWT, their inverses, and the model's patch transform.

Contract (`rescale=True`, the published default):
    haar_dwt3d:   x (B, C, T, H, W) -> (B, 8C, ceil(T/2), ceil(H/2), ceil(W/2)); channel band*C + c,
                  band = 4*bt + 2*bh + bw (bit set = high-pass along T, H, W). Along each axis a pair (a, b)
                  gives low (a+b)/sqrt2, high (a-b)/sqrt2; an odd length reflects (the missing sample of the
                  last pair is x[N-2]); rescale multiplies by 2*sqrt2, so each band is a +-1 block sum.
    haar_dwt2d:   x (B, C, 1, H, W) -> (B, 4C, 1, ceil(H/2), ceil(W/2)), band = 2*bw + bh; rescale: x2.
    haar_idwt3d:  (B, 8C, T, H, W) -> (B, C, 2T, 2H, 2W), the exact inverse for even sizes.
    haar_idwt2d:  (B, 4C, 1, H, W) -> (B, C, 1, 2H, 2W).
    haar_patch:   x (B, C, T, H, W), T odd > 1 -> (dwt2d(frame 0), dwt3d(frames 1..T-1)) in one call.
    haar_unpatch: (xi, xv) -> cat(idwt2d(xi), idwt3d(xv)) along T: (B, C, 1 + 2T', 2H, 2W).

Chain of names (CRAFT.md): the kernels `_haar_analysis_kernel` / `_haar_synthesis_kernel` (Triton,
CUDA; csrc/cpu/haar.cpp on the CPU) -> native kernels "haar_analysis" / "haar_synthesis" and the Triton
launchers `haar_analysis` / `haar_synthesis` -> the primitives `analysis` / `synthesis` below -> the
ops `torch.ops.leanvae.haar_*` -> `FusedPatcher` / `FusedUnPatcher` (leanvae/fused/haar.py).
Every op, forward and backward, is one launch of one of the two kernels: the backward of a DWT is a
synthesis (with the reflected samples of odd sizes folded back onto sample N-2), the backward of an
inverse DWT is an analysis. Any input strides are read in place; offsets are 64-bit.
"""
import math

import torch

from .. import _native
from .._backend import OpBackends
from ._common import ALL_DTYPES, GPU_DTYPES, acc_dtype, check_tensor, describe, vjp
from ._define import Backward, define_op

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


# ------------------------------------------------------------------------------------------ scales
# Every transform is a tree of +-1 butterflies (the published 1/sqrt2 taps folded out) times one scale:
# with `rescale` the published 2*sqrt2 (3-D) and 2 (2-D) factors cancel the taps exactly.
_S3 = {True: 1.0, False: _INV_SQRT2 / 2.0}      # dwt3d:  (1/sqrt2)^3 * (2*sqrt2 if rescale)
_S2 = {True: 1.0, False: 0.5}                   # dwt2d:  (1/sqrt2)^2 * (2 if rescale)
_INV3 = {True: 0.125, False: _INV_SQRT2 / 2.0}  # idwt3d: (1/sqrt2)^3 / (2*sqrt2 if rescale)
_INV2 = {True: 0.25, False: 0.5}                # idwt2d: (1/sqrt2)^2 / (2 if rescale)


def scales(rescale):
    """(dwt2d, dwt3d, idwt2d, idwt3d) scale factors applied after the +-1 butterflies."""
    rescale = bool(rescale)
    return _S2[rescale], _S3[rescale], _INV2[rescale], _INV3[rescale]


# -------------------------------------------------------------------------------------- references
# The spec. Butterflies in the published order (3-D analysis along T, H, W; 2-D along W, H; synthesis in
# reverse), computed in float32 (float64 for float64) and scaled once at the end; the fused kernels do
# the same additions in the same order, so float32 results agree with these bit for bit.
def _reflect_to_even(x, dim):
    """Append x[N-2] along `dim` when its length N is odd (the published reflect padding)."""
    n = x.shape[dim]
    return torch.cat([x, x.narrow(dim, n - 2, 1)], dim) if n % 2 else x


def _analysis(parts, dim):
    """Split each tensor along `dim` into (low, high) = (a + b, a - b) of its sample pairs, low first."""
    out = []
    for p in parts:
        p = _reflect_to_even(p, dim)
        a, b = p.unflatten(dim, (p.shape[dim] // 2, 2)).unbind(dim + 1)
        out += [a + b, a - b]
    return out


def _synthesis(bands, dim):
    """Merge consecutive (low, high) pairs along `dim` into samples (l + h, l - h), interleaved."""
    return [torch.stack([lo + hi, lo - hi], dim + 1).flatten(dim, dim + 1) for lo, hi in zip(bands[0::2], bands[1::2])]


def haar_dwt3d_reference(x, rescale=True):
    """x: (B, C, T, H, W) -> (B, 8C, ceil(T/2), ceil(H/2), ceil(W/2)), computed in float32."""
    bands = [x.to(acc_dtype(x.dtype))]
    for dim in (2, 3, 4):
        bands = _analysis(bands, dim)
    return (torch.cat(bands, dim=1) * _S3[bool(rescale)]).to(x.dtype)


def haar_dwt2d_reference(x, rescale=True):
    """x: (B, C, 1, H, W) -> (B, 4C, 1, ceil(H/2), ceil(W/2)); band = 2*bw + bh."""
    bands = [x.to(acc_dtype(x.dtype)).squeeze(2)]
    for dim in (3, 2):  # along W first: W is the major bit of the band index
        bands = _analysis(bands, dim)
    return (torch.cat(bands, dim=1) * _S2[bool(rescale)]).unsqueeze(2).to(x.dtype)


def haar_idwt3d_reference(x, rescale=True):
    """(B, 8C, T, H, W) -> (B, C, 2T, 2H, 2W)."""
    bands = list(torch.chunk(x.to(acc_dtype(x.dtype)), 8, dim=1))
    for dim in (4, 3, 2):
        bands = _synthesis(bands, dim)
    return (bands[0] * _INV3[bool(rescale)]).to(x.dtype)


def haar_idwt2d_reference(x, rescale=True):
    """(B, 4C, 1, H, W) -> (B, C, 1, 2H, 2W)."""
    bands = list(torch.chunk(x.to(acc_dtype(x.dtype)).squeeze(2), 4, dim=1))
    for dim in (2, 3):
        bands = _synthesis(bands, dim)
    return (bands[0] * _INV2[bool(rescale)]).unsqueeze(2).to(x.dtype)


def haar_patch_reference(x, rescale=True):
    """x: (B, C, T, H, W) with T odd > 1 -> (dwt2d(frame 0), dwt3d(frames 1..T-1))."""
    return haar_dwt2d_reference(x[:, :, :1], rescale), haar_dwt3d_reference(x[:, :, 1:], rescale)


def haar_unpatch_reference(xi, xv, rescale=True):
    """(B, 4C, 1, H, W), (B, 8C, T, H, W) -> (B, C, 1 + 2T, 2H, 2W)."""
    return torch.cat([haar_idwt2d_reference(xi, rescale), haar_idwt3d_reference(xv, rescale)], dim=2)


# ------------------------------------------------------------------------------------------ checks
def _check_video(op, name, x, *, min_size=2, frames=None):
    check_tensor(op, name, x, ndim=5, layout="(B, C, T, H, W)")
    if x.numel() == 0 and min(x.shape[:2]) == 0:
        raise ValueError(f"{op}: {name} must not be empty, got {describe(x)}")
    for dim, axis in ((2, "T"), (3, "H"), (4, "W")):
        if dim == 2 and frames is not None:
            continue
        if x.shape[dim] < min_size:
            raise ValueError(f"{op}: {name} needs {axis} >= {min_size} (reflect padding of odd sizes), got {describe(x)}")
    if frames == "one" and x.shape[2] != 1:
        raise ValueError(f"{op}: {name} must hold one frame (B, C, 1, H, W), got {describe(x)}")
    if frames == "odd" and (x.shape[2] < 3 or x.shape[2] % 2 == 0):
        raise ValueError(f"{op}: {name} must have an odd number of frames T >= 3, got {describe(x)}")


def _check_bands(op, name, x, nbands):
    check_tensor(op, name, x, ndim=5, layout=f"(B, {nbands}C, T, H, W)")
    if x.shape[1] == 0 or x.shape[1] % nbands:
        raise ValueError(f"{op}: {name} must have a positive multiple of {nbands} channels (sub-bands), got {describe(x)}")
    if min(x.shape) == 0:
        raise ValueError(f"{op}: {name} must not be empty, got {describe(x)}")


def _half_up(n):
    return (n + 1) // 2


def _dwt_shape(x, nbands, frames_out):
    b, c, t, h, w = x.shape
    return (b, nbands * c, frames_out, _half_up(h), _half_up(w))


# ----------------------------------------------------------------------- fused primitives (kernels)
# Two kernels per backend serve every op: `analysis` (a DWT, or the adjoint of an inverse DWT) and
# `synthesis` (an inverse DWT, or the adjoint of a DWT, reflect folds included). `slots`/`mask` select
# the 3-D bands for the latent compression (ops/haar_multilevel.py): band b goes to xv channel block
# slots[b] (-1: dropped) and is zeroed / read as zero where bit b of `mask` is clear.
IDENTITY_SLOTS = tuple(range(8))
ALL_BANDS = 0xFF


def _band_ints(has_xi, has_xv, slots, mask):
    return [int(has_xi), int(has_xv), int(mask)] + [int(s) for s in slots]


def analysis(backend, x, *, two_d=False, three_d=False, s2=1.0, s3=1.0, slots=IDENTITY_SLOTS, mask=ALL_BANDS,
             out_dtype=None):
    """x: (B, C, T, H, W), any strides -> (xi, xv): xi (B, 4C, 1, Ho, Wo) of frame 0 when `two_d`;
    xv (B, n*C, ceil(Tv/2), Ho, Wo) of frames (1 if two_d else 0).. when `three_d`, n = 1 + max(slots).
    out_dtype: the outputs' dtype (default x's; float32 with a 16-bit x, or 16-bit with a float32 x)."""
    b, c, t, h, w = x.shape
    ho, wo = _half_up(h), _half_up(w)
    f0 = 1 if two_d else 0
    out_dtype = out_dtype or x.dtype
    xi = x.new_empty((b, 4 * c, 1, ho, wo), dtype=out_dtype) if two_d else None
    nslots = max(slots) + 1
    xv = x.new_empty((b, nslots * c, _half_up(t - f0), ho, wo), dtype=out_dtype) if three_d else None
    if backend == "triton":
        from ..triton.haar import haar_analysis

        haar_analysis(x, xi, xv, slots, mask, s2, s3)
    else:
        _native.run(backend, "haar_analysis", [x, x if xi is None else xi, x if xv is None else xv],
                    ints=_band_ints(two_d, three_d, slots, mask), floats=[s2, s3])
    return xi, xv


def synthesis(backend, xi, xv, out_shape, *, s2=1.0, s3=1.0, slots=IDENTITY_SLOTS, mask=ALL_BANDS, out_dtype=None):
    """xi (B, 4C, 1, Ho, Wo) or None, xv (B, n*C, To, Ho, Wo) or None -> y (B, C, T, H, W) = out_shape:
    frame 0 from xi, frames (1 if xi else 0).. from xv; for odd sizes the reflected samples fold back.
    out_dtype: y's dtype (default the inputs'; float32 with 16-bit inputs, or 16-bit with float32 ones)."""
    ref = xv if xv is not None else xi
    y = ref.new_empty(out_shape, dtype=out_dtype or ref.dtype)
    if backend == "triton":
        from ..triton.haar import haar_synthesis

        haar_synthesis(xi, xv, y, slots, mask, s2, s3)
    else:
        _native.run(backend, "haar_synthesis", [ref if xi is None else xi, ref if xv is None else xv, y],
                    ints=_band_ints(xi is not None, xv is not None, slots, mask), floats=[s2, s3])
    return y


# ------------------------------------------------------------------------------------ op registry
# Each op: OpBackends for forward and backward; reference = autograd through the spec above.
dwt3d_fwd, dwt3d_bwd = OpBackends("haar_dwt3d"), OpBackends("haar_dwt3d_backward")
dwt2d_fwd, dwt2d_bwd = OpBackends("haar_dwt2d"), OpBackends("haar_dwt2d_backward")
idwt3d_fwd, idwt3d_bwd = OpBackends("haar_idwt3d"), OpBackends("haar_idwt3d_backward")
idwt2d_fwd, idwt2d_bwd = OpBackends("haar_idwt2d"), OpBackends("haar_idwt2d_backward")
patch_fwd, patch_bwd = OpBackends("haar_patch"), OpBackends("haar_patch_backward")
unpatch_fwd, unpatch_bwd = OpBackends("haar_unpatch"), OpBackends("haar_unpatch_backward")

for _fwd, _bwd, _ref in (
    (dwt3d_fwd, dwt3d_bwd, haar_dwt3d_reference),
    (dwt2d_fwd, dwt2d_bwd, haar_dwt2d_reference),
    (idwt3d_fwd, idwt3d_bwd, haar_idwt3d_reference),
    (idwt2d_fwd, idwt2d_bwd, haar_idwt2d_reference),
):
    _fwd.register("reference", ALL_DTYPES)(_ref)
    _bwd.register("reference", ALL_DTYPES)(
        lambda grad, x, rescale, _ref=_ref: vjp(lambda t: _ref(t, rescale), (x,), grad)[0]
    )
patch_fwd.register("reference", ALL_DTYPES)(haar_patch_reference)
patch_bwd.register("reference", ALL_DTYPES)(
    lambda gi, gv, x, rescale: vjp(lambda t: haar_patch_reference(t, rescale), (x,), (gi, gv))[0]
)
unpatch_fwd.register("reference", ALL_DTYPES)(haar_unpatch_reference)
unpatch_bwd.register("reference", ALL_DTYPES)(
    lambda grad, xi, xv, rescale: tuple(vjp(lambda a, b: haar_unpatch_reference(a, b, rescale), (xi, xv), grad))
)


def _register_fused(backend, dtypes):
    """Every op, forward and backward, as one analysis or synthesis launch of `backend`."""
    def A(x, **kw):
        return analysis(backend, x, **kw)

    def S(xi, xv, shape, **kw):
        return synthesis(backend, xi, xv, shape, **kw)

    def up(x, bands, frames):  # output shape of an inverse: (B, C, frames, 2H, 2W)
        return (x.shape[0], x.shape[1] // bands, frames, 2 * x.shape[3], 2 * x.shape[4])

    reg = [
        (dwt3d_fwd, lambda x, r: A(x, three_d=True, s3=_S3[r])[1]),
        (dwt3d_bwd, lambda g, x, r: S(None, g, x.shape, s3=_S3[r])),
        (dwt2d_fwd, lambda x, r: A(x, two_d=True, s2=_S2[r])[0]),
        (dwt2d_bwd, lambda g, x, r: S(g, None, x.shape, s2=_S2[r])),
        (idwt3d_fwd, lambda x, r: S(None, x, up(x, 8, 2 * x.shape[2]), s3=_INV3[r])),
        (idwt3d_bwd, lambda g, x, r: A(g, three_d=True, s3=_INV3[r])[1]),
        (idwt2d_fwd, lambda x, r: S(x, None, up(x, 4, 1), s2=_INV2[r])),
        (idwt2d_bwd, lambda g, x, r: A(g, two_d=True, s2=_INV2[r])[0]),
        (patch_fwd, lambda x, r: A(x, two_d=True, three_d=True, s2=_S2[r], s3=_S3[r])),
        (patch_bwd, lambda gi, gv, x, r: S(gi, gv, x.shape, s2=_S2[r], s3=_S3[r])),
        (unpatch_fwd, lambda xi, xv, r: S(xi, xv, up(xv, 8, 1 + 2 * xv.shape[2]), s2=_INV2[r], s3=_INV3[r])),
        (unpatch_bwd, lambda g, xi, xv, r: A(g, two_d=True, three_d=True, s2=_INV2[r], s3=_INV3[r])),
    ]
    for ops, fn in reg:
        ops.register(backend, dtypes)(fn)


_register_fused("cpu", ALL_DTYPES)
_register_fused("cuda", GPU_DTYPES)
_register_fused("triton", GPU_DTYPES)


def _single_input_op(name, fwd, bwd, check, out_shape):
    """Defines leanvae::<name>(Tensor x, bool rescale, str backend) -> Tensor and its backward."""
    return define_op(
        name, "(Tensor x, bool rescale, str backend) -> Tensor",
        impl=lambda x, rescale, backend: fwd(backend, x.device, x.dtype, x, rescale),
        fake=lambda x, rescale, backend: x.new_empty(out_shape(x)),
        check=lambda x, rescale: check(x),
        backward=Backward(
            "(Tensor grad, Tensor x, bool rescale, str backend) -> Tensor",
            impl=lambda grad, x, rescale, backend: bwd(backend, x.device, x.dtype, grad, x, rescale),
            fake=lambda grad, x, rescale, backend: x.new_empty(x.shape),
            rule=lambda bwd_op, inputs, grad: (bwd_op(grad, *inputs), None),
        ),
    )


def _check_dwt3d(x):
    _check_video("haar_dwt3d", "x", x)


def _check_dwt2d(x):
    _check_video("haar_dwt2d", "x", x, frames="one")


def _check_idwt3d(x):
    _check_bands("haar_idwt3d", "x", x, 8)


def _check_idwt2d(x):
    _check_bands("haar_idwt2d", "x", x, 4)
    if x.shape[2] != 1:
        raise ValueError(f"haar_idwt2d: x must hold one frame (B, 4C, 1, H, W), got {describe(x)}")


_dwt3d_op = _single_input_op("haar_dwt3d", dwt3d_fwd, dwt3d_bwd, _check_dwt3d, lambda x: _dwt_shape(x, 8, _half_up(x.shape[2])))
_dwt2d_op = _single_input_op("haar_dwt2d", dwt2d_fwd, dwt2d_bwd, _check_dwt2d, lambda x: _dwt_shape(x, 4, 1))
_idwt3d_op = _single_input_op(
    "haar_idwt3d", idwt3d_fwd, idwt3d_bwd, _check_idwt3d,
    lambda x: (x.shape[0], x.shape[1] // 8, 2 * x.shape[2], 2 * x.shape[3], 2 * x.shape[4]),
)
_idwt2d_op = _single_input_op(
    "haar_idwt2d", idwt2d_fwd, idwt2d_bwd, _check_idwt2d,
    lambda x: (x.shape[0], x.shape[1] // 4, 1, 2 * x.shape[3], 2 * x.shape[4]),
)


# ---------------------------------------------------------------- patch transform (two outputs)
def _check_patch(x):
    _check_video("haar_patch", "x", x, frames="odd")


def _patch_shapes(x):
    return _dwt_shape(x, 4, 1), _dwt_shape(x, 8, (x.shape[2] - 1) // 2)


def _patch_rule(bwd_op, inputs, grad_xi, grad_xv):
    x = inputs[0]
    # autograd passes None for an unused output; the kernels want real tensors.
    si, sv = _patch_shapes(x)
    grad_xi = x.new_zeros(si) if grad_xi is None else grad_xi
    grad_xv = x.new_zeros(sv) if grad_xv is None else grad_xv
    return bwd_op(grad_xi, grad_xv, *inputs), None


_patch = define_op(
    "haar_patch", "(Tensor x, bool rescale, str backend) -> (Tensor, Tensor)",
    impl=lambda x, rescale, backend: tuple(patch_fwd(backend, x.device, x.dtype, x, rescale)),
    fake=lambda x, rescale, backend: tuple(x.new_empty(s) for s in _patch_shapes(x)),
    check=lambda x, rescale: _check_patch(x),
    backward=Backward(
        "(Tensor grad_xi, Tensor grad_xv, Tensor x, bool rescale, str backend) -> Tensor",
        impl=lambda gi, gv, x, rescale, backend: patch_bwd(backend, x.device, x.dtype, gi, gv, x, rescale),
        fake=lambda gi, gv, x, rescale, backend: x.new_empty(x.shape),
        rule=_patch_rule,
    ),
)


def _check_unpatch(xi, xv):
    _check_bands("haar_unpatch", "xi", xi, 4)
    _check_bands("haar_unpatch", "xv", xv, 8)
    if xi.shape[2] != 1:
        raise ValueError(f"haar_unpatch: xi must hold one frame (B, 4C, 1, H, W), got {describe(xi)}")
    b, c4, _, h, w = xi.shape
    if (xv.shape[0], xv.shape[1] // 8, xv.shape[3], xv.shape[4]) != (b, c4 // 4, h, w):
        raise ValueError(
            f"haar_unpatch: xi (B, 4C, 1, H, W) and xv (B, 8C, T, H, W) must agree in B, C, H, W; "
            f"got xi {describe(xi)} and xv {describe(xv)}"
        )
    if xi.dtype != xv.dtype or xi.device != xv.device:
        raise TypeError(f"haar_unpatch: xi and xv must share dtype and device; got xi {describe(xi)} and xv {describe(xv)}")


def _unpatch_fake(xi, xv, rescale, backend):
    b, c8, t, h, w = xv.shape
    return xv.new_empty((b, c8 // 8, 1 + 2 * t, 2 * h, 2 * w))


_unpatch = define_op(
    "haar_unpatch", "(Tensor xi, Tensor xv, bool rescale, str backend) -> Tensor",
    impl=lambda xi, xv, rescale, backend: unpatch_fwd(backend, xv.device, xv.dtype, xi, xv, rescale),
    fake=_unpatch_fake,
    check=lambda xi, xv, rescale: _check_unpatch(xi, xv),
    backward=Backward(
        "(Tensor grad, Tensor xi, Tensor xv, bool rescale, str backend) -> (Tensor, Tensor)",
        impl=lambda grad, xi, xv, rescale, backend: tuple(unpatch_bwd(backend, xv.device, xv.dtype, grad, xi, xv, rescale)),
        fake=lambda grad, xi, xv, rescale, backend: (xi.new_empty(xi.shape), xv.new_empty(xv.shape)),
        rule=lambda bwd_op, inputs, grad: (*bwd_op(grad, *inputs), None),
    ),
)


# ------------------------------------------------------------------------------------ public API
def haar_dwt3d(x, rescale=True, *, backend=None):
    """3-D Haar DWT. x: (B, C, T, H, W), T, H, W >= 2 -> (B, 8C, ceil(T/2), ceil(H/2), ceil(W/2))."""
    return _dwt3d_op(x, rescale, backend=backend)


def haar_dwt2d(x, rescale=True, *, backend=None):
    """2-D Haar DWT of one frame. x: (B, C, 1, H, W) -> (B, 4C, 1, ceil(H/2), ceil(W/2))."""
    return _dwt2d_op(x, rescale, backend=backend)


def haar_idwt3d(x, rescale=True, *, backend=None):
    """Inverse 3-D Haar DWT. x: (B, 8C, T, H, W) -> (B, C, 2T, 2H, 2W)."""
    return _idwt3d_op(x, rescale, backend=backend)


def haar_idwt2d(x, rescale=True, *, backend=None):
    """Inverse 2-D Haar DWT. x: (B, 4C, 1, H, W) -> (B, C, 1, 2H, 2W)."""
    return _idwt2d_op(x, rescale, backend=backend)


def haar_patch(x, rescale=True, *, backend=None):
    """The model's patch transform. x: (B, C, T, H, W) -> (xi, xv), either may be None:

    T == 1: (dwt2d(x), None); T odd > 1: (dwt2d(frame 0), dwt3d(frames 1..)) in one launch;
    T even: (None, dwt3d(x)).
    """
    check_tensor("haar_patch", "x", x, ndim=5, layout="(B, C, T, H, W)")
    t = x.shape[2]
    if t == 1:
        return haar_dwt2d(x, rescale, backend=backend), None
    if t % 2 == 0:
        return None, haar_dwt3d(x, rescale, backend=backend)
    return _patch(x, rescale, backend=backend)


def haar_unpatch(xi, xv, rescale=True, *, backend=None):
    """The model's inverse patch transform: (xi, xv) -> video (B, C, T, H, W); xi alone -> image (B, C, H, W)."""
    if xi is not None and xv is not None:
        return _unpatch(xi, xv, rescale, backend=backend)
    if xi is not None:
        return haar_idwt2d(xi, rescale, backend=backend).squeeze(2)
    if xv is not None:
        return haar_idwt3d(xv, rescale, backend=backend)
    raise ValueError("haar_unpatch: xi and xv are both None; expected at least one")
