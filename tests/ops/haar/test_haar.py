"""Haar wavelet ops: parity with the model's Patcher/UnPatcher and with the op references, forward and
backward, every runnable backend and dtype, odd sizes, strided inputs, gradcheck, opcheck, compile,
64-bit offsets, bad input, and the drop-in modules."""
import types

import pytest
import torch
from conftest import DEVICE, kernel_backends
from helpers import DTYPE_IDS, assert_close, case_id, strided

import leanvae_kernels as lk
from leanvae.wavelets import Patcher, UnPatcher
from leanvae_kernels import _native
from leanvae.fused.haar import FusedPatcher, FusedUnPatcher, fused_patcher_forward, fused_unpatcher_forward
from leanvae_kernels.ops import haar as H

BACKENDS = kernel_backends()
HALF = [torch.float16, torch.bfloat16]
# (B, C, T, H, W): the model's 3 channels and 17 frames, odd T/H/W (reflect), T = 1 (image), even T,
# the smallest legal sizes, a prime width.
VIDEOS = [(1, 3, 17, 16, 20), (2, 3, 9, 7, 11), (1, 2, 1, 6, 5), (1, 2, 4, 5, 6), (1, 1, 3, 2, 3), (2, 4, 5, 9, 13),
          (1, 1, 3, 10, 129)]
# The Triton interpreter costs ~0.1 s per program (one per (b, c, frame pair) here), so on a CPU-only
# machine Triton runs the same kinds of cases with fewer channels and frames; on a GPU it runs them all.
# (1, 1, 3, 10, 129): the W fold crosses two programs' tiles (64 blocks wide), the H fold too (4 rows).
VIDEOS_INTERPRETED = [(1, 2, 5, 6, 10), (1, 1, 9, 7, 11), (1, 2, 1, 6, 5), (1, 1, 4, 5, 6), (1, 1, 3, 2, 3), (1, 1, 3, 10, 129)]


def _cases(full, small):
    """(backend, shape) params: every kernel backend; the interpreted Triton backend on `small`."""
    out = []
    for bp in BACKENDS:
        backend = bp.values[0]
        shapes = small if backend == "triton" and DEVICE.type == "cpu" else full
        for shape in shapes:
            sid = case_id(**dict(zip("BCTHW", shape))) if len(shape) == 5 else str(shape)
            out.append(pytest.param(backend, shape, id=f"{backend}-{sid}", marks=bp.marks))
    return out


def _video(shape, dtype=torch.float32):
    return torch.randn(shape, device=DEVICE).to(dtype)


def _flat(pair):
    return [t for t in pair if t is not None]


def _patch_grads(xs):
    """Upstream grads for the (xi, xv) outputs of a patch of `xs` (None where an output is None)."""
    ref = Patcher().to(xs.device)(xs.float())
    return tuple(None if t is None else torch.randn(t.shape, device=t.device).to(xs.dtype) for t in ref)


def _grad_of(fn, inputs, grads):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grads) if o is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return outs, [t.grad for t in inputs]


# ----------------------------------------------------------------------------- parity with the model
@pytest.mark.parametrize("backend, shape", _cases(VIDEOS, VIDEOS_INTERPRETED))
def test_patch_matches_model_forward_and_backward(backend, shape):
    x = _video(shape)
    grads = _patch_grads(x)
    ref_out, (ref_gx,) = _grad_of(Patcher().to(DEVICE), [x], grads)
    out, (gx,) = _grad_of(lambda t: lk.haar_patch(t, backend=backend), [x], grads)
    assert [o is None for o in out] == [o is None for o in ref_out]
    for o, r in zip(_flat(out), _flat(ref_out)):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert_close(o, r)
    assert_close(gx, ref_gx)
    # The fused float32 forward is the reference's +-1 butterflies, bit for bit.
    for o, r in zip(_flat(out), _flat(lk.haar_patch(x, backend="reference"))):
        assert torch.equal(o, r)


@pytest.mark.parametrize("backend, shape", _cases(VIDEOS, VIDEOS_INTERPRETED))
def test_unpatch_matches_model_forward_and_backward(backend, shape):
    b, c, t, h, w = shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    xi = _video((b, 4 * c, 1, ho, wo)) if t % 2 else None
    xv = _video((b, 8 * c, t // 2, ho, wo)) if t > 1 else None
    inputs = _flat((xi, xv))
    g = torch.randn(UnPatcher().to(DEVICE)((xi, xv)).shape, device=DEVICE)

    def pack(args):
        it = iter(args)
        return (next(it) if xi is not None else None, next(it) if xv is not None else None)

    ref_out, ref_grads = _grad_of(lambda *a: UnPatcher().to(DEVICE)(pack(a)), inputs, (g,))
    out, grads = _grad_of(lambda *a: lk.haar_unpatch(*pack(a), backend=backend), inputs, (g,))
    assert out[0].shape == ref_out[0].shape
    assert_close(out[0], ref_out[0])
    for gf, gr in zip(grads, ref_grads):
        assert_close(gf, gr)
    assert torch.equal(out[0], lk.haar_unpatch(*pack(inputs), backend="reference"))


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("backend, shape", _cases([VIDEOS[0], VIDEOS[1], VIDEOS[3]], [VIDEOS_INTERPRETED[1], VIDEOS_INTERPRETED[3]]))
def test_patch_unpatch_half_precision_against_float32(backend, dtype, shape):
    """16-bit parity is judged against a float32 computation of the same 16-bit inputs (DESIGN.md)."""
    x = _video(shape, dtype)
    grads = _patch_grads(x)
    out, (gx,) = _grad_of(lambda t: lk.haar_patch(t, backend=backend), [x], grads)
    ref_out, (ref_gx,) = _grad_of(lambda t: lk.haar_patch(t, backend="reference"), [x.float()],
                                  tuple(None if g is None else g.float() for g in grads))
    for o, r in zip(_flat(out), _flat(ref_out)):
        assert o.dtype == dtype
        assert_close(o, r, dtype)
    assert_close(gx, ref_gx, dtype)

    bands = tuple(None if o is None else o.detach() for o in out)
    g = torch.randn(lk.haar_unpatch(*bands, backend="reference").shape, device=DEVICE).to(dtype)
    y, gb = _grad_of(lambda *a: lk.haar_unpatch(*(a if len(a) == 2 else _unflat(a, bands)), backend=backend),
                     _flat(bands), (g,))
    yr, gbr = _grad_of(lambda *a: lk.haar_unpatch(*(a if len(a) == 2 else _unflat(a, bands)), backend="reference"),
                       [t.float() for t in _flat(bands)], (g.float(),))
    assert_close(y[0], yr[0], dtype)
    for a, r in zip(gb, gbr):
        assert_close(a, r, dtype)


def _unflat(args, like):
    return (args[0], None) if like[1] is None else (None, args[0])


# ------------------------------------------------------------------------------ the individual ops
OPS = {
    "dwt3d": (lambda x, r, be: lk.haar_dwt3d(x, r, backend=be), lambda s: s),
    "dwt2d": (lambda x, r, be: lk.haar_dwt2d(x, r, backend=be), lambda s: s[:2] + (1,) + s[3:]),
    "idwt3d": (lambda x, r, be: lk.haar_idwt3d(x, r, backend=be), lambda s: (s[0], 8 * s[1]) + s[2:]),
    "idwt2d": (lambda x, r, be: lk.haar_idwt2d(x, r, backend=be), lambda s: (s[0], 4 * s[1], 1) + s[3:]),
}
# Sizes of the model's latent-space channels (128) appear on the native backend only (128 programs).
OP_SHAPES = [(1, 3, 5, 7, 9), (2, 2, 4, 6, 6), (1, 128, 2, 3, 2)]


@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "orthonormal"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend, shape", _cases(OP_SHAPES, [(1, 1, 5, 7, 9)]))
def test_single_ops_against_reference(backend, rescale, op, shape):
    fn, shape_of = OPS[op]
    x = _video(shape_of(shape))
    out = fn(x, rescale, backend)
    ref = fn(x, rescale, "reference")
    assert out.shape == ref.shape
    assert torch.equal(out, ref)  # same butterflies, same order, one scale: bit for bit in float32
    g = torch.randn_like(ref)
    (_,), (gx,) = _grad_of(lambda t: fn(t, rescale, backend), [x], (g,))
    (_,), (gr,) = _grad_of(lambda t: fn(t, rescale, "reference"), [x], (g,))
    assert_close(gx, gr)


@pytest.mark.parametrize("backend, shape", _cases([(1, 2, 4, 6, 8), (2, 3, 8, 10, 4)], [(1, 1, 4, 6, 8)]))
def test_inverse_recovers_input(backend, shape):
    """Independent of any reference: idwt(dwt(x)) == x for even sizes, 3-D, 2-D and the patch pair."""
    x = _video(shape)
    for rescale in (True, False):
        assert_close(lk.haar_idwt3d(lk.haar_dwt3d(x, rescale, backend=backend), rescale, backend=backend), x)
        f = x[:, :, :1]
        assert_close(lk.haar_idwt2d(lk.haar_dwt2d(f, rescale, backend=backend), rescale, backend=backend), f)
    xo = _video(shape[:2] + (shape[2] + 1,) + shape[3:])
    assert_close(lk.haar_unpatch(*lk.haar_patch(xo, backend=backend), backend=backend), xo)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adjoint_identity_odd_sizes(backend):
    """<dwt(x), g> == <x, dwt_backward(g)>: the backward is the adjoint, reflect folds included."""
    x = torch.randn(1, 2, 7, 5, 9, device=DEVICE, dtype=torch.float32)
    xi, xv = lk.haar_patch(x, backend=backend)
    gi, gv = torch.randn_like(xi), torch.randn_like(xv)
    gx = H.patch_bwd(backend, x.device, x.dtype, gi, gv, x, True)
    lhs = (xi.double() * gi.double()).sum() + (xv.double() * gv.double()).sum()
    rhs = (x.double() * gx.double()).sum()
    assert abs(lhs.item() - rhs.item()) <= 1e-5 * max(1.0, abs(lhs.item()))


def test_reference_backward_through_the_op():
    """The reference backend's backward (autograd through the spec, run inside the custom op) is not
    silently zero: it equals autograd through the reference function called directly."""
    x = torch.randn(1, 2, 5, 3, 5, device=DEVICE)
    grads = _patch_grads(x)
    _, (g_op,) = _grad_of(lambda t: lk.haar_patch(t, backend="reference"), [x], grads)
    _, (g_fn,) = _grad_of(lambda t: H.haar_patch_reference(t), [x], grads)
    assert g_op.abs().max() > 0
    assert torch.equal(g_op, g_fn)


def test_gradcheck_float64_cpu():
    torch.manual_seed(1)
    check = torch.autograd.gradcheck
    for shape in [(1, 2, 5, 3, 5), (2, 1, 3, 4, 3), (1, 1, 4, 2, 2)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        for rescale in (True, False):
            assert check(lambda t: lk.haar_dwt3d(t, rescale, backend="cpu"), (x,), fast_mode=True)
            assert check(lambda t: lk.haar_dwt2d(t[:, :, :1], rescale, backend="cpu"), (x,), fast_mode=True)
            if shape[2] % 2:
                assert check(lambda t: lk.haar_patch(t, rescale, backend="cpu"), (x,), fast_mode=True)
        bands = torch.randn(shape[0], 8 * shape[1], *shape[2:], dtype=torch.float64, requires_grad=True)
        image = torch.randn(shape[0], 4 * shape[1], 1, *shape[3:], dtype=torch.float64, requires_grad=True)
        assert check(lambda t: lk.haar_idwt3d(t, False, backend="cpu"), (bands,), fast_mode=True)
        assert check(lambda t: lk.haar_idwt2d(t, True, backend="cpu"), (image,), fast_mode=True)
        assert check(lambda a, b: lk.haar_unpatch(a, b, backend="cpu"), (image, bands), fast_mode=True)
    # One full (slow mode) Jacobian check on the smallest odd case, every fold at once.
    x = torch.randn(1, 1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert check(lambda t: lk.haar_patch(t, backend="cpu"), (x,))
    assert check(lambda t: lk.haar_dwt3d(t, False, backend="cpu"), (x,))


# --------------------------------------------------------------------------------- strided inputs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["frames", "channels", "last", "transposed", "offset"])
def test_strided_inputs(backend, kind):
    big = _video((1, 3, 6, 7, 11))
    if kind == "frames":
        x = big[:, :2, 1:]  # the model's own slice (of a channel slice)
    elif kind == "channels":
        x = big[:, 1:2, 1:]
    else:
        x = strided(big[:, :2, 1:].contiguous(), kind)
    xc = x.contiguous()
    for o, r in zip(lk.haar_patch(x, backend=backend), lk.haar_patch(xc, backend="reference")):
        assert torch.equal(o, r)
    xi, xv = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in lk.haar_patch(xc, backend="reference"))
    assert not xv.is_contiguous()
    assert torch.equal(lk.haar_unpatch(xi, xv, backend=backend), lk.haar_unpatch(xi.contiguous(), xv.contiguous(), backend="reference"))
    # Backward with expanded (stride 0) upstream gradients.
    g = torch.randn(1, device=DEVICE).expand(lk.haar_unpatch(xi, xv, backend="reference").shape)
    gi, gv = (torch.ones(1, device=DEVICE).expand(t.shape) for t in (xi, xv))
    assert_close(H.patch_bwd(backend, x.device, x.dtype, gi, gv, x, True),
                 H.patch_bwd("reference", x.device, x.dtype, gi.contiguous(), gv.contiguous(), xc, True))
    gi2, gv2 = H.unpatch_bwd(backend, x.device, x.dtype, g, xi, xv, True)
    ri2, rv2 = H.unpatch_bwd("reference", x.device, x.dtype, g.contiguous(), xi, xv, True)
    assert_close(gi2, ri2)
    assert_close(gv2, rv2)


# On the CPU the buffer is only reserved (pages are committed when touched); on a GPU it is 4 GiB.
_INT64_BACKENDS = ["cpu"] + ([p for p in BACKENDS] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("backend", _INT64_BACKENDS)
def test_int64_offsets(backend):
    """Inputs and outputs whose element offsets pass 2^31: strided views into a 2^31+ element buffer."""
    device = DEVICE if backend in ("cuda", "triton") else torch.device("cpu")
    n = (1 << 31) + 4096
    try:
        buf = torch.empty(n, dtype=torch.bfloat16, device=device)
    except (RuntimeError, MemoryError) as exc:  # no room for the buffer: nothing to test here
        pytest.skip(f"cannot allocate a {n}-element buffer: {exc}")
    step = 1 << 30  # frames 2^30 elements apart: frame 2 starts past 2^31
    x = buf.as_strided((1, 1, 3, 2, 4), (0, 0, step, 4, 1))
    small = torch.randn(1, 1, 3, 2, 4, device=device).to(torch.bfloat16)
    x.copy_(small)
    xi, xv = lk.haar_patch(x, backend=backend)
    ri, rv = lk.haar_patch(small, backend="reference")
    assert torch.equal(xi, ri) and torch.equal(xv, rv)
    # Output offsets past 2^31: the synthesis kernel writing into a strided view of the same buffer.
    y = buf.as_strided((1, 1, 3, 2, 4), (0, 0, step, 4, 1))
    y.zero_()
    if backend == "triton":
        from leanvae_kernels.triton.haar import haar_synthesis

        haar_synthesis(ri, rv, y, H.IDENTITY_SLOTS, H.ALL_BANDS, H.scales(True)[2], H.scales(True)[3])
    else:
        _native.run(backend, "haar_synthesis", [ri, rv, y], ints=H._band_ints(True, True, H.IDENTITY_SLOTS, H.ALL_BANDS),
                    floats=[H.scales(True)[2], H.scales(True)[3]])
    assert torch.equal(y.contiguous(), lk.haar_unpatch(ri, rv, backend="reference"))


# ------------------------------------------------------------------------------- opcheck / compile
def _op_cases(device="cpu"):
    x = torch.randn(1, 2, 5, 6, 7, device=device)
    xi, xv = lk.haar_patch(x, backend="reference")
    ev = torch.randn(1, 2, 4, 6, 6, device=device)
    return [
        (torch.ops.leanvae.haar_dwt3d.default, (x, True)),
        (torch.ops.leanvae.haar_dwt2d.default, (x[:, :, :1], False)),
        (torch.ops.leanvae.haar_idwt3d.default, (xv, True)),
        (torch.ops.leanvae.haar_idwt2d.default, (xi, True)),
        (torch.ops.leanvae.haar_patch.default, (x, True)),
        (torch.ops.leanvae.haar_unpatch.default, (xi, xv, True)),
        (torch.ops.leanvae.haar_dwt3d_backward.default, (torch.randn(1, 16, 3, 3, 4, device=device), x, True)),
        (torch.ops.leanvae.haar_patch_backward.default, (torch.randn_like(xi), torch.randn_like(xv), x, True)),
        (torch.ops.leanvae.haar_unpatch_backward.default, (torch.randn(1, 2, 5, 6, 8, device=device), xi, xv, True)),
        (torch.ops.leanvae.haar_idwt3d_backward.default, (torch.randn_like(ev), lk.haar_dwt3d(ev), False)),
    ]


@pytest.mark.parametrize("backend", ["cpu", "reference"] + (BACKENDS if DEVICE.type == "cuda" else []))
def test_opcheck(backend):
    device = DEVICE if backend in ("cuda", "triton") else "cpu"
    for op, args in _op_cases(device):
        if "backward" not in str(op):
            args = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args + (backend,))


def test_compile_fullgraph():
    x = torch.randn(1, 3, 9, 10, 12)

    def f(a):
        xi, xv = lk.haar_patch(a * 2, backend="cpu")
        return lk.haar_unpatch(xi * 0.5, xv.relu(), backend="cpu") + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(compiled(xc), f(xr), rtol=0, atol=0)
    compiled(xc).square().sum().backward()
    f(xr).square().sum().backward()
    torch.testing.assert_close(xc.grad, xr.grad, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: lk.haar_dwt3d(torch.randn(2, 3, 4, 4)), ValueError, r"x must be a 5-D tensor \(B, C, T, H, W\)"),
        (lambda: lk.haar_dwt3d(torch.randn(1, 1, 4, 1, 4)), ValueError, "needs H >= 2"),
        (lambda: lk.haar_dwt3d(torch.randn(1, 1, 1, 4, 4)), ValueError, "needs T >= 2"),
        (lambda: lk.haar_dwt3d(torch.zeros(1, 1, 2, 2, 2, dtype=torch.int32)), TypeError, "x must have dtype"),
        (lambda: lk.haar_dwt3d([1.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: lk.haar_dwt2d(torch.randn(1, 1, 2, 4, 4)), ValueError, "must hold one frame"),
        (lambda: lk.haar_idwt3d(torch.randn(1, 12, 2, 2, 2)), ValueError, "multiple of 8 channels"),
        (lambda: lk.haar_idwt2d(torch.randn(1, 4, 2, 2, 2)), ValueError, "must hold one frame"),
        (lambda: lk.haar_patch(None), TypeError, "x must be a tensor"),
        (lambda: lk.haar_unpatch(torch.randn(1, 4, 1, 2, 2), torch.randn(1, 8, 2, 3, 2)), ValueError, "must agree"),
        (lambda: lk.haar_unpatch(torch.randn(1, 4, 1, 2, 2), torch.randn(1, 8, 2, 2, 2).double()), TypeError, "share dtype"),
        (lambda: lk.haar_unpatch(None, None), ValueError, "both None"),
        (lambda: torch.ops.leanvae.haar_patch(torch.randn(1, 1, 4, 2, 2), True, "cpu"), ValueError, "odd number of frames"),
        (lambda: lk.haar_dwt3d(torch.randn(1, 1, 2, 2, 2), backend="fast"), ValueError, "backend must be one of"),
        (lambda: lk.haar_dwt3d(torch.randn(1, 1, 2, 2, 2), backend="cuda"), lk.BackendUnavailable, "cuda"),
    ],
    ids=["ndim", "H1", "T1", "int", "list", "dwt2d_T2", "idwt3d_C12", "idwt2d_T2", "none", "unpatch_shape",
         "unpatch_dtype", "unpatch_none", "patch_even", "backend_name", "cuda_on_cpu"],
)
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ------------------------------------------------------------------------------- drop-in modules
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_modules_are_drop_in(backend):
    x = _video((1, 2, 5, 6, 10))
    with lk.use_backend(backend):
        for cls, fused_cls in ((Patcher, FusedPatcher), (UnPatcher, FusedUnPatcher)):
            ref, fused = cls().to(DEVICE), fused_cls().to(DEVICE)
            assert list(fused.state_dict()) == list(ref.state_dict())
            assert dict(fused.named_buffers()).keys() == dict(ref.named_buffers()).keys()
        p_ref, p_fused = Patcher().to(DEVICE), FusedPatcher().to(DEVICE)
        for o, r in zip(p_fused(x), p_ref(x)):
            assert_close(o, r)
        u_ref, u_fused = UnPatcher().to(DEVICE), FusedUnPatcher().to(DEVICE)
        bands = p_ref(x)
        assert_close(u_fused(x=bands), u_ref(x=bands))  # the model calls idwt(x=...)

        # Bound onto existing instances: same buffers, state_dict and repr; forward uses only `rescale`.
        for rescale in (True, False):
            p, u = Patcher(rescale=rescale).to(DEVICE), UnPatcher(rescale=rescale).to(DEVICE)
            want_bands, keys, text = p(x), list(p.state_dict()), repr(p)
            want_video = u(want_bands)
            p.forward = types.MethodType(fused_patcher_forward, p)
            u.forward = types.MethodType(fused_unpatcher_forward, u)
            assert list(p.state_dict()) == keys and repr(p) == text
            for o, r in zip(p(x), want_bands):
                assert_close(o, r)
            assert_close(u(x=want_bands), want_video)
            img = x[:, :, :1]
            assert_close(u((p(img)[0], None)), UnPatcher(rescale=rescale).to(DEVICE)((p(img)[0], None)))
