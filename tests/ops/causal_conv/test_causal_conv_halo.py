"""Halo rows of the causal depthwise conv: a frame split into bands of rows, each band convolved with the
row above and below it (for the cache frames and the frames of x), gives exactly the rows of one call on
the whole frame. This is what patch-parallel inference (leanvae/parallel.py) relies on.
"""
import pytest
import torch
from conftest import DEVICE, kernel_backends
from helpers import DTYPE_IDS, assert_close, strided

import leanvae_kernels as lk
from leanvae_kernels.ops.causal_conv import causal_dwconv3d_reference

INTERPRETED = DEVICE.type == "cpu"
BACKENDS = kernel_backends() + [pytest.param("reference", id="reference")]
# Row boundaries of the bands for H = 7: two uneven bands, 1-row bands, four bands.
CUTS = [(0, 3, 7), (0, 1, 2, 7), (0, 2, 4, 5, 7), (0, 6, 7)]


def _frame(shape, dtype, group_size, cache=True):
    b, t, h, w, c = shape
    p = 1 if group_size else 2
    x = torch.randn(shape, device=DEVICE).to(dtype)
    weight = (torch.randn(c, 1, 3, 3, 3, device=DEVICE) * 0.3).to(dtype)
    bias = torch.randn(c, device=DEVICE).to(dtype)
    cache_t = torch.randn(b, p, h, w, c, device=DEVICE).to(dtype) if cache else None
    return x, weight, bias, cache_t


def _bands(x, cache, cuts, group_size):
    """[(x band, cache band, halo_top, halo_bottom)] as a neighbour would send them: its rows of
    cat(cache or zeros, x)."""
    b, t, h, w, c = x.shape
    p = 1 if group_size else 2
    prev = cache if cache is not None else x.new_zeros((b, p, h, w, c))
    full = torch.cat([prev, x], dim=1)
    out = []
    for a, e in zip(cuts[:-1], cuts[1:]):
        out.append((x[:, :, a:e], cache[:, :, a:e] if cache is not None else None,
                    full[:, :, a - 1] if a > 0 else None, full[:, :, e] if e < h else None))
    return out


def _cases():
    for p in BACKENDS:
        backend = p.values[0]
        small = backend == "triton" and INTERPRETED
        for group_size in (0, 2):
            for cuts in CUTS[:2] if small else CUTS:
                yield pytest.param(backend, group_size, cuts, marks=p.marks,
                                   id=f"{backend}-g{group_size}-{'_'.join(map(str, cuts))}")


@pytest.mark.parametrize("residual", [False, True], ids=["peg", "x_plus_peg"])
@pytest.mark.parametrize("backend, group_size, cuts", _cases())
def test_bands_equal_whole_frame(backend, group_size, cuts, residual):
    shape = (2, 4, cuts[-1], 5, 16)
    x, weight, bias, cache = _frame(shape, torch.float32, group_size)
    y, new_cache = lk.causal_dwconv3d(x, weight, bias, cache, residual=residual, group_size=group_size, backend=backend)
    for (xb, cb, top, bottom), a, e in zip(_bands(x, cache, cuts, group_size), cuts[:-1], cuts[1:]):
        yb, nb = lk.causal_dwconv3d(xb, weight, bias, cb, residual=residual, group_size=group_size,
                                    halo_top=top, halo_bottom=bottom, backend=backend)
        # Same kernel, same per-output accumulation order: the whole frame's rows bit for bit.
        assert torch.equal(yb, y[:, :, a:e]), f"rows {a}:{e}: max {(yb - y[:, :, a:e]).abs().max()}"
        assert torch.equal(nb, new_cache[:, :, a:e])
        yr, _ = causal_dwconv3d_reference(xb, weight, bias, cb, residual, group_size, top, bottom)
        assert_close(yb, yr)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_bands_equal_whole_frame_low_precision_cpu(dtype):
    x, weight, bias, cache = _frame((1, 3, 7, 6, 24), dtype, 0)
    y, _ = lk.causal_dwconv3d(x, weight, bias, cache, backend="cpu")
    cuts = (0, 2, 3, 7)
    for (xb, cb, top, bottom), a, e in zip(_bands(x, cache, cuts, 0), cuts[:-1], cuts[1:]):
        yb, _ = lk.causal_dwconv3d(xb, weight, bias, cb, halo_top=top, halo_bottom=bottom, backend="cpu")
        assert torch.equal(yb, y[:, :, a:e])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bands_chunked_in_time_with_cache(backend):
    """Each band carries its own cache across time chunks; halos come from the neighbours' chunks."""
    x, weight, bias, _ = _frame((1, 7, 7, 5, 16), torch.float32, 0, cache=False)
    y, _ = lk.causal_dwconv3d(x, weight, bias, backend=backend)
    cuts = (0, 3, 4, 7)
    caches = [None] * 3
    full_cache = None
    outs = [[] for _ in caches]
    for t0, t1 in ((0, 3), (3, 4), (4, 7)):
        xc = x[:, t0:t1]
        for i, (xb, cb, top, bottom) in enumerate(_bands(xc, full_cache, cuts, 0)):
            yb, caches[i] = lk.causal_dwconv3d(xb, weight, bias, caches[i], halo_top=top, halo_bottom=bottom,
                                               backend=backend)
            outs[i].append(yb)
        _, full_cache = lk.causal_dwconv3d(xc, weight, bias, full_cache, backend=backend)
    got = torch.cat([torch.cat(o, dim=1) for o in outs], dim=2)
    assert torch.equal(got, y)


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
@pytest.mark.parametrize("group_size", [0, 2])
def test_band_gradients_equal_whole_frame(backend, group_size):
    """Gradients through the halos reach the neighbours' rows: the bands' summed gradients of x, cache,
    weight and bias equal the whole frame's (up to float32 summation order)."""
    x, weight, bias, cache = _frame((1, 3, 5, 4, 8), torch.float32, group_size)
    g = torch.randn(x.shape, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, cache)]
    y, _ = lk.causal_dwconv3d(*leaves, residual=True, group_size=group_size, backend=backend)
    y.backward(g)
    band_leaves = [t.clone().requires_grad_() for t in (x, weight, bias, cache)]
    xl, wl, bl, cl = band_leaves
    cuts = (0, 2, 3, 5)
    loss = 0
    for (xb, cb, top, bottom), a, e in zip(_bands(xl, cl, cuts, group_size), cuts[:-1], cuts[1:]):
        yb, _ = lk.causal_dwconv3d(xb, wl, bl, cb, residual=True, group_size=group_size, halo_top=top,
                                   halo_bottom=bottom, backend=backend)
        loss = loss + (yb * g[:, :, a:e]).sum()
    loss.backward()
    for name, full, band in zip(("x", "weight", "bias", "cache"), leaves, band_leaves):
        assert_close(band.grad, full.grad, msg=name)


def test_strided_halos_and_gradcheck():
    x, weight, bias, cache = _frame((1, 2, 3, 3, 2), torch.float64, 0)
    top = torch.randn(1, 4, 3, 2, dtype=torch.float64)
    bottom = strided(torch.randn(1, 4, 3, 2, dtype=torch.float64))
    y, _ = lk.causal_dwconv3d(x, weight, bias, cache, halo_top=top, halo_bottom=bottom, backend="cpu")
    yr, _ = causal_dwconv3d_reference(x, weight, bias, cache, False, 0, top, bottom.contiguous())
    assert_close(y, yr)
    args = [t.clone().requires_grad_() for t in (x, weight, bias, cache, top, bottom.contiguous())]

    def f(x_, w_, b_, c_, t_, bo_):
        return lk.causal_dwconv3d(x_, w_, b_, c_, halo_top=t_, halo_bottom=bo_, backend="cpu")[0]

    assert torch.autograd.gradcheck(f, args)


def test_compile_fullgraph_with_halos():
    x, weight, bias, cache = _frame((1, 2, 4, 3, 8), torch.float32, 0)
    top, bottom = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)

    def f(x_):
        return lk.causal_dwconv3d(x_, weight, bias, cache, halo_top=top, halo_bottom=bottom, backend="cpu")[0]

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(halo_top=torch.zeros(1, 3, 3, 8)), ValueError, r"halo_top must be \(B, P\+T, W, C\) = \(1, 4, 3, 8\)"),
    (dict(halo_bottom=torch.zeros(1, 4, 4, 8)), ValueError, "halo_bottom must be"),
    (dict(halo_top=torch.zeros(4, 3, 8)), ValueError, "halo_top"),
    (dict(halo_top=torch.zeros(1, 4, 3, 8, dtype=torch.float64)), TypeError, "halo_top"),
    (dict(halo_top=[[0.0]]), TypeError, "halo_top"),
    (dict(halo_bottom=torch.zeros(1, 3, 3, 8), group_size=2), ValueError, r"\(1, 3, 3, 8\)"),  # P = 1: fine
], ids=["frames", "width", "ndim", "dtype", "not_tensor", "group_mode_P1_ok"])
def test_bad_halos(kwargs, err, match):
    x = torch.zeros(1, 2, 4, 3, 8)
    w = torch.zeros(8, 1, 3, 3, 3)
    if "group_size" in kwargs:  # the valid group-mode shape: must not raise
        lk.causal_dwconv3d(x, w, **kwargs, backend="cpu")
        return
    with pytest.raises(err, match=match):
        lk.causal_dwconv3d(x, w, **kwargs, backend="cpu")
