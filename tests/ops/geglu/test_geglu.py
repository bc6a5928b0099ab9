"""GEGLU op: accuracy against a float64 evaluation under a derived bound, every dtype, odd widths, strided
and transposed inputs, gradients, gradcheck, compile, bad input. IEEE patterns are in test_ieee_ops.py.

The bound (float32 math, unit roundoff u = 2^-24). gelu(g) = g * Phi(g); each backend computes Phi with an
absolute error E_PHI and rounds a few products:
  * cpu: erfc(a) = exp(-a^2) R(a) on a = |g| / sqrt2 < 4 (csrc/cpu/geglu.cpp), R fitted to 2.5e-8 relative
    and evaluated in float (3.4 ulps relative in a float32 simulation: 1.7u in Phi = erfc / 2 <= 1), exp to
    ~2u relative (1u in Phi), the rounding of z = g / sqrt2 (Phi' * |z| * u <= 0.25u), 1 - erfc / 2 (0.5u),
    and 0 for a >= 4 (Phi < 1.3e-8 = 0.2u): under 4u in all; a sweep of 2e6 gates over [-12, 12] measured
    2.1u (with the product g * Phi's rounding).
  * triton: erf within 2 float32 ulps on a GPU (libdevice), (1 + erf) / 2 adds 0.5u: within 2u.
  E_PHI = 4u covers both. Then |out - exact| <= |v| |g| E_PHI + 2u |exact| (the products g * Phi and
  v * gelu), and in a 16-bit dtype one ulp of the result more (half an ulp for the final rounding, and
  the Triton interpreter's float32 -> bfloat16 conversion may differ from torch by one ulp, helpers.TOL).
  The backward's gate gradient (dy * v) * (Phi + g phi(g)) adds phi's error: exp to a few u, plus the
  rounding of g^2 / 2 (relative (g^2/2) u), so |g| phi(g) (g^2/2 + 4) u <= 0.65u: E_D = 6u, and 3u |exact|
  for its three products.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, kernel_backends
from helpers import DTYPE_IDS, assert_close, case_id

import leanvae
import leanvae_kernels as lk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
U32 = 2.0**-24
E_PHI, E_D = 4 * U32, 6 * U32
# (mantissa bits with the implicit one, frexp exponent of the smallest normal)
_FMT = {torch.float32: (24, -125), torch.float16: (11, -13), torch.bfloat16: (8, -125)}
# (N, p): p = 1, odd and prime widths (not multiples of the CPU kernel's 16-lane vectors), the model's 352
# (D = 128's 341 padded to 32) and 1376 (D = 512's 1365 padded)
SHAPES = [(1, 1), (3, 7), (4, 13), (3, 23), (2, 37), (5, 8), (3, 64), (2, 352), (2, 1376)]
# There is no CUDA C++ GEGLU kernel (Triton covers the GPU): the "cuda" param is dropped on GPU machines.
BACKENDS = [b for b in kernel_backends() if b.values[0] != "cuda"]


def ulp(x, dtype):
    bits, emin = _FMT[dtype]
    _, e = torch.frexp(x.abs())
    return torch.ldexp(torch.ones_like(x), e.clamp_min(emin) - bits)


def exact(u):
    """The model's expression in float64: (value * gelu(gate), value, gate)."""
    v, g = u.double().chunk(2, dim=-1)
    return v * F.gelu(g), v, g


def assert_within(actual, expected, bound, what):
    err = (actual.double() - expected).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{what}: error {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} at "
        f"{expected.flatten()[worst].item():.6g}"
    )


def fwd_bound(v, g, ref, dtype):
    b = v.abs() * g.abs() * E_PHI + 2 * U32 * ref.abs()
    return b + ulp(ref, dtype) if dtype != torch.float32 else b


def make_u(n, p, dtype, scale=3.0, device=DEVICE):
    """Gates over about [-10, 10] (both erf branches, the erfc tail and the cut at |z| = 4), values ~ N(0, 1)."""
    g = torch.Generator().manual_seed(n * 1000 + p)
    v = torch.randn(n, p, generator=g)
    gate = torch.randn(n, p, generator=g) * scale
    return torch.cat([v, gate], dim=1).to(device, dtype)


def check_forward_backward(u, backend, dtype, dy=None):
    uf = u.detach().clone().requires_grad_()
    out = lk.geglu(uf, backend=backend)
    p = u.shape[-1] // 2
    assert out.dtype == dtype and out.shape == (*u.shape[:-1], p) and out.is_contiguous()
    ref, v, g = exact(u)
    assert_within(out, ref, fwd_bound(v, g, ref, dtype), f"{backend} forward")

    dy = torch.randn(out.shape, device=u.device).to(dtype) if dy is None else dy
    out.backward(dy)
    ud = u.detach().double().requires_grad_()
    vd, gd = ud.chunk(2, dim=-1)
    (vd * F.gelu(gd)).backward(dy.double())
    gv, gg = uf.grad.chunk(2, dim=-1)
    ev, eg = ud.grad.chunk(2, dim=-1)
    dyd = dy.double()
    bv = (dyd * g).abs() * E_PHI + 2 * U32 * ev.abs()
    bg = (dyd * v).abs() * E_D + 3 * U32 * eg.abs()
    if dtype != torch.float32:
        bv, bg = bv + ulp(ev, dtype), bg + ulp(eg, dtype)
    assert uf.grad.dtype == dtype and uf.grad.shape == u.shape
    assert_within(gv, ev, bv, f"{backend} grad value")
    assert_within(gg, eg, bg, f"{backend} grad gate")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: case_id(N=s[0], p=s[1]))
def test_forward_backward_within_bound(backend, dtype, shape):
    check_forward_backward(make_u(*shape, dtype), backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["slice", "transposed", "rows_strided", "leading_dims"])
def test_non_contiguous_input(backend, kind):
    base = make_u(6, 13, torch.float32)
    if kind == "slice":  # a column slice of a wider tensor: row stride 40, not 26
        wide = torch.randn(6, 40, device=DEVICE)
        wide[:, 5:31] = base
        u = wide[:, 5:31]
    elif kind == "transposed":  # unit row stride, column stride 6
        u = base.t().contiguous().t()
    elif kind == "rows_strided":  # every other row of a larger tensor
        big = torch.randn(12, 26, device=DEVICE)
        big[::2] = base
        u = big[::2]
    else:
        u = base.view(2, 3, 26)
    assert not u.is_contiguous() or kind == "leading_dims"
    check_forward_backward(u, backend, torch.float32)
    # non-contiguous upstream gradient, too
    dy = torch.randn(13, *u.shape[:-1], device=DEVICE).movedim(0, -1)
    check_forward_backward(u, backend, torch.float32, dy=dy)


def test_dense_gate_sweep_cpu():
    """Every region of the CPU erf (the |z| = 1 and 4 seams, the tail) on 2^18 gates in [-12, 12]."""
    g = torch.linspace(-12, 12, 1 << 18)
    u = torch.stack([torch.ones_like(g), g], dim=1)
    check_forward_backward(u, "cpu", torch.float32)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float64_and_gradcheck(backend):
    u = make_u(3, 7, torch.float64, device="cpu").requires_grad_()
    ref, _, _ = exact(u.detach())
    assert_close(lk.geglu(u, backend=backend), ref)
    assert torch.autograd.gradcheck(lambda t: lk.geglu(t, backend=backend), (u,))


def test_reference_is_the_model_expression():
    u = make_u(4, 37, torch.float32)
    assert torch.equal(lk.geglu_reference(u), leanvae.modules.GEGLU()(u))
    ub = u.bfloat16()  # 16-bit: float32 math, one rounding (the model rounds gelu(gate) first)
    assert torch.equal(lk.geglu_reference(ub), leanvae.modules.GEGLU()(ub.float()).bfloat16())


def test_auto_on_cpu_runs_the_native_kernel():
    u = make_u(3, 9, torch.float32, device="cpu")
    assert torch.equal(lk.geglu(u, backend="auto"), lk.geglu(u, backend="cpu"))


def test_empty_rows():
    for backend in ("reference", "cpu"):
        out = lk.geglu(torch.empty(0, 6), backend=backend)
        assert out.shape == (0, 3)


def test_compile_fullgraph():
    f = lambda t: lk.geglu(t, backend="cpu") * 2  # noqa: E731
    u = make_u(3, 11, torch.float32, device="cpu")
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = u.clone().requires_grad_(), u.clone().requires_grad_()
    out_e, out_c = f(a), compiled(b)
    assert torch.equal(out_e, out_c)
    out_e.sum().backward()
    out_c.sum().backward()
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize(
    "arg, exc, match",
    [
        (torch.randn(3, 5), ValueError, "last dimension must be even"),
        (torch.tensor(1.0), ValueError, "0-dim"),
        (torch.ones(3, 4, dtype=torch.int32), TypeError, "u must have dtype"),
        ([1.0, 2.0], TypeError, "u must be a torch.Tensor"),
    ],
    ids=["odd_last_dim", "zero_dim", "int_dtype", "not_a_tensor"],
)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input(arg, exc, match, backend):
    with pytest.raises(exc, match=match):
        lk.geglu(arg, backend=backend)


# ------------------------------------------------------------------------- in the fused feed-forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_ffd_runs_the_fused_op_on_every_path(monkeypatch, dtype):
    """The autograd path and the chunked inference path both call the op where the feed-forward uses it (GPUs,
    16-bit CPU inputs) and still match the model; CPU float32 keeps the torch expression (measured faster)."""
    import leanvae.fused.ffd as fused_ffd
    from leanvae.modules import ffd as make_ffd

    calls = []
    real = fused_ffd.geglu

    def counting(u, *, backend=None):
        calls.append(backend)
        return real(u, backend=backend)

    monkeypatch.setattr(fused_ffd, "geglu", counting)
    torch.manual_seed(3)
    m = make_ffd(128).to(DEVICE, dtype)
    x = torch.randn(2, 40, 128, device=DEVICE, dtype=dtype)
    uses_op = DEVICE.type != "cpu" or dtype != torch.float32
    rows = 30 * 2 * 352 * x.element_size()  # 30-row chunks: 3 calls
    with torch.no_grad():
        ref = x + m(x)
        out = fused_ffd.ffd_apply(m, x, residual=True, chunk_bytes=rows)
    if not uses_op:
        assert calls == []
    elif DEVICE.type == "cpu":
        assert calls == ["cpu"] * 3
    else:
        assert len(calls) == 3
    assert_close(out, ref, dtype)
    calls.clear()
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    (xr + m(xr)).sum().backward()
    fused_ffd.ffd_apply(m, xf, residual=True).sum().backward()
    assert len(calls) == (1 if uses_op else 0)
    assert_close(xf.grad, xr.grad, dtype)


def test_ffd_geglu_backend_choice():
    from leanvae.fused.ffd import _geglu_backend

    assert _geglu_backend("auto", "cpu", torch.float32) is None  # measured slower than torch's GELU + mul_ here
    assert _geglu_backend("auto", "cpu", torch.bfloat16) == "cpu"
    assert _geglu_backend("cpu", "cpu", torch.bfloat16) == "cpu"
    assert _geglu_backend("reference", "cpu", torch.bfloat16) is None  # the torch expression
    assert _geglu_backend("cuda", "cpu", torch.bfloat16) is None  # no CUDA C++ GEGLU kernel
    assert _geglu_backend("auto", "meta", torch.float32) is None
