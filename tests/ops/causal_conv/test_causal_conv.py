"""Causal depthwise 3x3x3 conv (the model's PEG3D): parity with the model's module, gradients, cache and
chunking, group-causal mode, opcheck, compile, bad input, and the CUDA kernels' thread bodies run on the CPU.

Triton kernels run through the interpreter on CPU-only machines (about 50 ms per kernel step there), so
they get a few small cases; the native CPU kernels get the full matrix.
"""
import pytest
import torch
from conftest import DEVICE, kernel_backends
from cuda_emu import conv_fns
from helpers import DTYPE_IDS, assert_close, case_id, strided

import leanvae_kernels as lk
from leanvae.modules import PEG3D
from leanvae_kernels.ops._common import vjp
from leanvae_kernels.ops.causal_conv import causal_dwconv3d_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, T, H, W, C): the model's channel counts, odd channel counts and sizes, one frame, a 1x1 frame.
SHAPES = [(1, 5, 6, 7, 128), (2, 3, 5, 4, 384), (1, 2, 3, 5, 512), (1, 1, 4, 3, 37), (2, 7, 9, 11, 20), (1, 3, 1, 1, 3)]
INTERPRETED = DEVICE.type == "cpu"
SMALL_SHAPES = [(1, 3, 3, 5, 128), (1, 1, 2, 3, 37)]


def _sid(shape):
    return case_id(**dict(zip("BTHWC", shape)))


def _matrix():
    """(backend, shape, dtype) cases: everything for compiled backends, a subset for the interpreter."""
    cases = []
    for p in kernel_backends():
        backend = p.values[0]
        small = backend == "triton" and INTERPRETED
        for shape in SMALL_SHAPES if small else SHAPES:
            for dtype in DTYPES:
                if small and shape != SMALL_SHAPES[0] and dtype == torch.float32:
                    continue
                cases.append(pytest.param(backend, shape, dtype, marks=p.marks,
                                          id=f"{backend}-{_sid(shape)}_{DTYPE_IDS[dtype]}"))
    return cases


def _inputs(shape, dtype, bias=True, cache_frames=0):
    b, t, h, w, c = shape
    x = torch.randn(shape, device=DEVICE).to(dtype)
    weight = (torch.randn(c, 1, 3, 3, 3, device=DEVICE) * 0.3).to(dtype)
    bias_t = torch.randn(c, device=DEVICE).to(dtype) if bias else None
    cache = torch.randn(b, cache_frames, h, w, c, device=DEVICE).to(dtype) if cache_frames else None
    return x, weight, bias_t, cache


def _peg3d(x, weight, bias, residual, grad):
    """The model's PEG3D (and x + PEG3D(x)) in float32: (y, grad x, grad weight, grad bias)."""
    m = PEG3D(x.shape[-1]).to(DEVICE)
    with torch.no_grad():
        m.ds_conv.weight.copy_(weight.float())
        m.ds_conv.bias.copy_(bias.float())
    xr = x.float().requires_grad_()
    y = m(xr)
    if residual:
        y = xr + y
    y.backward(grad.float())
    return y.detach(), xr.grad, m.ds_conv.weight.grad, m.ds_conv.bias.grad


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


@pytest.mark.parametrize("residual", [False, True], ids=["peg", "x_plus_peg"])
@pytest.mark.parametrize("backend, shape, dtype", _matrix())
def test_parity_with_model_peg3d(backend, shape, dtype, residual):
    x, weight, bias, _ = _inputs(shape, dtype)
    g = torch.randn(shape, device=DEVICE).to(dtype)
    ry, rgx, rgw, rgb = _peg3d(x, weight, bias, residual, g)

    xf, wf, bf = _leaves(x, weight, bias)
    y, new_cache = lk.causal_dwconv3d(xf, wf, bf, residual=residual, backend=backend)
    y.backward(g)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_close(y, ry, dtype)
    assert_close(xf.grad, rgx, dtype)
    assert_close(wf.grad, rgw, dtype)
    assert_close(bf.grad, rgb, dtype)
    expected_cache = torch.cat([torch.zeros_like(x[:, :2]), x], dim=1)[:, -2:]
    assert torch.equal(new_cache, expected_cache)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["channel_slice", "transposed", "offset"])
def test_strided_input_read_in_place(backend, kind):
    """Strided x (the decoder passes x[..., 128:] of a 512-channel tensor) gives the contiguous result exactly."""
    shape = (1, 3, 3, 5, 24)
    x, weight, bias, cache = _inputs(shape, torch.float32, cache_frames=2)
    if kind == "channel_slice":
        xs = torch.randn(shape[:-1] + (40,), device=DEVICE)[..., 9:33]
        xs.copy_(x)
    else:
        xs = strided(x, kind)
    cs = strided(cache, "last")
    y, c = lk.causal_dwconv3d(x, weight, bias, cache, residual=True, backend=backend)
    ys, cs_new = lk.causal_dwconv3d(xs, weight, bias, cs, residual=True, backend=backend)
    assert torch.equal(ys, y) and torch.equal(cs_new, c)
    ry, _ = causal_dwconv3d_reference(x, weight, bias, cache, residual=True)
    assert_close(ys, ry)


CHUNKINGS = [(0, [1, 2, 1, 3]), (0, [3, 4]), (1, [1, 3, 3]), (2, [2, 4, 2]), (3, [3, 6])]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("group_size, splits", CHUNKINGS, ids=[f"g{g}_{'-'.join(map(str, s))}" for g, s in CHUNKINGS])
def test_chunked_calls_equal_one_call(backend, group_size, splits):
    """Chunks (of whole groups in group mode) passing the returned cache reproduce one call bit for bit."""
    t = sum(splits)
    x, weight, bias, _ = _inputs((1, t, 2, 3, 24), torch.float32)
    y_full, cache_full = lk.causal_dwconv3d(x, weight, bias, residual=True, group_size=group_size, backend=backend)
    ys, cache, start = [], None, 0
    for n in splits:
        y, cache = lk.causal_dwconv3d(x[:, start:start + n], weight, bias, cache, residual=True, group_size=group_size,
                                      backend=backend)
        ys.append(y)
        start += n
    assert torch.equal(torch.cat(ys, dim=1), y_full)
    assert torch.equal(cache, cache_full)
    assert torch.equal(cache_full, x[:, -(1 if group_size else 2):])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=lambda d: DTYPE_IDS[d])
def test_chunked_calls_equal_one_call_cpu_dtypes(dtype):
    x, weight, bias, _ = _inputs((2, 6, 5, 37, 19), dtype)
    y_full, cache_full = lk.causal_dwconv3d(x, weight, bias, backend="cpu")
    y1, c1 = lk.causal_dwconv3d(x[:, :1], weight, bias, backend="cpu")
    y2, c2 = lk.causal_dwconv3d(x[:, 1:2], weight, bias, c1, backend="cpu")
    y3, c3 = lk.causal_dwconv3d(x[:, 2:], weight, bias, c2, backend="cpu")
    assert torch.equal(torch.cat([y1, y2, y3], 1), y_full) and torch.equal(c3, cache_full)


def _check_against_reference(fn, x, weight, bias, cache, residual, group_size, dtype):
    """fn(x, w, b, cache) -> (y, new_cache) with autograd; compares outputs and every gradient."""
    y_ref, c_ref = causal_dwconv3d_reference(x, weight, bias, cache, residual, group_size)
    gy = torch.randn_like(y_ref)
    gc = torch.randn_like(c_ref)
    expected = vjp(lambda *a: causal_dwconv3d_reference(*a, residual, group_size), (x, weight, bias, cache), (gy, gc))
    leaves = _leaves(x, weight, bias, cache)
    y, c = fn(*leaves)
    torch.autograd.backward([y, c], [gy, gc])
    assert_close(y, y_ref, dtype)
    assert torch.equal(c, c_ref)
    for name, leaf, exp in zip(("x", "weight", "bias", "cache"), leaves, expected):
        if leaf is not None:
            assert_close(leaf.grad, exp, dtype, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_group_causal_parity(backend, group_size):
    """IV-VAE's group-causal mode (g frames per group, one-frame cache): outputs and all gradients."""
    x, weight, bias, cache = _inputs((1, 5, 2, 4, 20), torch.float32, cache_frames=1)

    def fn(x_, w_, b_, c_):
        return lk.causal_dwconv3d(x_, w_, b_, c_, residual=True, group_size=group_size, backend=backend)

    _check_against_reference(fn, x, weight, bias, cache, True, group_size, torch.float32)


@pytest.mark.parametrize("backend", kernel_backends())
def test_cache_gradients_causal(backend):
    """Grad into the cache, and into x through the new cache, including a one-frame chunk (T < 2)."""
    for t in (1, 4):
        x, weight, bias, cache = _inputs((1, t, 2, 5, 16), torch.float32, cache_frames=2)

        def fn(x_, w_, b_, c_):
            return lk.causal_dwconv3d(x_, w_, b_, c_, residual=False, backend=backend)

        _check_against_reference(fn, x, weight, bias, cache, False, 0, torch.float32)


@pytest.mark.parametrize("backend", kernel_backends())
def test_group_end_does_not_read_the_next_group(backend):
    """A tap past a group's end reads zeros: non-finite values in the next group must not leak into it."""
    x, weight, bias, _ = _inputs((1, 4, 3, 4, 8), torch.float32)
    x[:, 2] = float("nan")
    x[:, 3] = float("inf")
    y, _ = lk.causal_dwconv3d(x, weight, bias, group_size=2, backend=backend)
    ref, _ = causal_dwconv3d_reference(x, weight, bias, group_size=2)
    assert torch.isfinite(y[:, :2]).all()
    assert_close(y[:, :2], ref[:, :2])


def test_gradcheck_float64():
    for group_size, n in ((0, 2), (2, 1)):
        x, weight, bias, cache = (t.double() for t in _inputs((1, 3, 3, 4, 5), torch.float32, cache_frames=n))
        leaves = _leaves(x, weight, bias, cache)
        for residual in (False, True):
            assert torch.autograd.gradcheck(
                lambda *a: lk.causal_dwconv3d(*a, residual=residual, group_size=group_size, backend="cpu"), leaves)


def test_cpu_multithreaded_matches_reference_and_is_deterministic():
    """A call large enough for the CPU kernels' parallel path (ragged tiles, several channel blocks): matches the
    reference, and outputs and every gradient (the weight grad is a reduction) are bitwise equal for 1 and 2
    threads."""
    x, weight, bias, cache = _inputs((2, 5, 9, 13, 120), torch.float32, cache_frames=2)
    assert x.numel() >= 1 << 16
    g, gc = torch.randn_like(x), torch.randn_like(cache)
    results = []
    saved = torch.get_num_threads()
    try:
        for threads in (2, 1, 2):
            torch.set_num_threads(threads)
            leaves = _leaves(x, weight, bias, cache)
            y, c = lk.causal_dwconv3d(*leaves, residual=True, backend="cpu")
            torch.autograd.backward([y, c], [g, gc])
            results.append([y.detach(), c] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    y_ref, c_ref = causal_dwconv3d_reference(x, weight, bias, cache, True)
    expected = vjp(lambda *a: causal_dwconv3d_reference(*a, True), (x, weight, bias, cache), (g, gc))
    assert_close(results[0][0], y_ref)
    assert torch.equal(results[0][1], c_ref)
    for got, exp in zip(results[0][2:], expected):
        assert_close(got, exp)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    for group_size, n, with_bias in ((0, 2, True), (2, 1, False)):
        x, weight, bias, cache = _inputs((1, 3, 3, 4, 6), torch.float32, bias=with_bias, cache_frames=n)
        args = (*_leaves(x, weight, bias, cache), True, group_size, backend)
        torch.library.opcheck(torch.ops.leanvae.causal_dwconv3d.default, args)
        gy, gc = torch.randn_like(x), torch.randn_like(cache)
        torch.library.opcheck(torch.ops.leanvae.causal_dwconv3d_backward.default,
                              (gy, gc, x, weight, bias, cache, True, group_size, backend))


def test_compile_fullgraph():
    x, weight, bias, cache = _inputs((1, 4, 3, 5, 8), torch.float32, cache_frames=2)

    def f(x_, w_, b_, c_):
        y, new_cache = lk.causal_dwconv3d(x_ * 2, w_, b_, c_, residual=True, backend="cpu")
        return y.sin().sum() + new_cache.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_leaves, compiled_leaves = _leaves(x, weight, bias, cache), _leaves(x, weight, bias, cache)
    out_c, out_e = compiled(*compiled_leaves), f(*eager_leaves)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    out_c.backward()
    out_e.backward()
    for a, b in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# ------------------------------------------------------------------------------- CUDA kernels, on the CPU
# The forward and grad-input kernels stage each frame's tile (4 rows x 8 pixels x 32 channels, plus the halo)
# in shared memory, then compute from it; the emulation (tests/cuda_emu.py) runs every thread of a block as a
# fiber under a race checker, and a call that it reports on fails. The scalar
# access path takes any strides; the vector path (16-byte loads) needs channel stride 1, C and strides
# multiples of 16 bytes' worth of elements, and 16-byte aligned tensors, and its emulation refuses anything
# else (the CUDA launcher sends such inputs to the scalar path).
cuda_emulation, cuda_emulation_vec = conv_fns("_cudaemu"), conv_fns("_cudaemu_vec")
EMULATIONS = {"scalar_access": cuda_emulation, "vector_access": cuda_emulation_vec}
# C = 20: not a multiple of 8 (16-bit types take the scalar path, float32 the vector one); 40 and 72: partial
# 32-channel tiles; W = 9, 13, 17 and H = 5, 6: partial pixel and row tiles; H = 1; T = 1.
EMU_SHAPES = [(2, 5, 6, 9, 20), (1, 1, 3, 5, 40), (1, 4, 1, 13, 512), (1, 6, 5, 17, 72)]


def _vector_ok(shape, dtype):
    return shape[-1] % (16 // torch.tensor([], dtype=dtype).element_size()) == 0


@pytest.mark.racecheck
@pytest.mark.parametrize("access", list(EMULATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("group_size", [0, 2, 3])
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=_sid)
def test_cuda_thread_bodies_on_cpu(dtype, group_size, shape, access):
    """The CUDA kernels' code (csrc/cuda/causal_conv_body.cuh), compiled for the host and run block by block,
    phase by phase: outputs, every gradient, the cache, and chunked == full bit for bit."""
    EMU_FWD, EMU_BWD = EMULATIONS[access]
    n = 1 if group_size else 2
    x, weight, bias, cache = _inputs(shape, dtype, cache_frames=n)
    if access == "scalar_access":
        xs = torch.empty(shape[:-1] + (shape[-1] + 3,), dtype=dtype)[..., 1:-2]  # strided, misaligned
        xs.copy_(x)
    else:
        xs = x
        if not _vector_ok(shape, dtype):
            with pytest.raises(ValueError, match="the vector path needs"):
                EMU_FWD(x, weight, bias, cache, False, group_size)
            return
    for residual in (False, True):
        y, c = EMU_FWD(xs, weight, bias, cache, residual, group_size)
        y_ref, c_ref = causal_dwconv3d_reference(x, weight, bias, cache, residual, group_size)
        assert_close(y, y_ref, dtype)
        assert torch.equal(c, c_ref)
        gy, gc = torch.randn_like(y), torch.randn_like(c)
        got = EMU_BWD(gy, gc, xs, weight, bias, cache, residual, group_size)
        exp = vjp(lambda *a: causal_dwconv3d_reference(*a, residual, group_size), (x, weight, bias, cache), (gy, gc))
        for name, a, e in zip(("x", "weight", "bias", "cache"), got, exp):
            assert_close(a, e, dtype, msg=f"grad of {name}")
    # Chunked (whole groups) == one call, bit for bit; without a cache and without a bias.
    g = max(group_size, 1)
    cut = g * ((shape[1] // g) // 2) or shape[1]
    y_full, c_full = EMU_FWD(x, weight, None, None, True, group_size)
    y1, c1 = EMU_FWD(x[:, :cut], weight, None, None, True, group_size)
    if cut < shape[1]:
        y2, c2 = EMU_FWD(x[:, cut:], weight, None, c1, True, group_size)
        y1, c1 = torch.cat([y1, y2], 1), c2
    assert torch.equal(y1, y_full) and torch.equal(c1, c_full)


@pytest.mark.racecheck
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("group_size", [0, 2])
def test_cuda_access_paths_agree_bit_for_bit(group_size, dtype):
    """The vector and scalar access paths differ in how they load, not in what they compute: every output,
    the cache and every gradient are equal bit for bit (the taps are explicit fused multiply-adds, so the
    host build rounds like the GPU's FFMA in every instantiation)."""
    shape = (1, 5, 5, 13, 24)  # W = 13: partial pixel tiles in both directions; 24 channels: a partial tile
    x, weight, bias, cache = _inputs(shape, dtype, cache_frames=1 if group_size else 2)
    xs = torch.empty(shape[:-1] + (shape[-1] + 3,), dtype=dtype)[..., 1:-2]
    xs.copy_(x)
    gy, gc = torch.randn_like(x), torch.randn_like(cache)
    gys = gy.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    outs = []
    for (fwd, bwd), xin, gin in ((cuda_emulation_vec, x, gy), (cuda_emulation, xs, gys)):
        y, c = fwd(xin, weight, bias, cache, True, group_size)
        outs.append((y, c) + bwd(gin, gc, xin, weight, bias, cache, True, group_size))
    for name, a, b in zip(("y", "cache", "grad x", "grad weight", "grad bias", "grad cache"), *outs):
        assert torch.equal(a, b), name


@pytest.mark.racecheck
def test_cuda_wgrad_vector_path_with_cache_and_x_of_other_strides():
    """The grad weight's vector path hoists separate 32-bit offsets for x, the cache and grad_y: with each
    laid out differently (aligned, padded rows and columns, channel stride 1) it equals the scalar path
    bit for bit (same additions, same order; its steady loop covers frames 0..T-3 of interior rows and
    columns) and the reference within the table's tolerance."""
    shape, dtype = (1, 6, 6, 37, 16), torch.bfloat16  # W = 37: column blocks of 32 and a partial one
    x, weight, bias, cache = _inputs(shape, dtype, cache_frames=2)
    xp = torch.empty(1, 6, 7, 40, 24, dtype=dtype)[:, :, :6, :37, :16]  # padded rows, columns and channels
    xp.copy_(x)
    cp = torch.empty(1, 2, 6, 38, 16, dtype=dtype)[:, :, :, 1:]  # offset by one pixel: still 16-byte aligned
    cp.copy_(cache)
    gy = torch.randn(shape).to(dtype)
    gc = torch.randn_like(cache)
    got_v = cuda_emulation_vec[1](gy, gc, xp, weight, bias, cp, True, 0)
    got_s = cuda_emulation[1](gy, gc, xp, weight, bias, cp, True, 0)
    exp = vjp(lambda *a: causal_dwconv3d_reference(*a, True, 0), (x, weight, bias, cache), (gy, gc))
    for name, v, s, e in zip(("x", "weight", "bias", "cache"), got_v, got_s, exp):
        assert torch.equal(v, s), name
        assert_close(v, e, dtype, msg=f"grad of {name}")


@pytest.mark.racecheck
@pytest.mark.parametrize("access", list(EMULATIONS))
@pytest.mark.parametrize("group_size", [0, 2])
def test_cuda_three_row_slab_gives_the_whole_frames_row(access, group_size):
    """What the halo rows rely on (ops/causal_conv.py, _with_halos): the kernels run on rows r-1..r+1 of a
    frame (and of its cache) give row r of the call on the whole frame bit for bit, whatever row tile r
    falls in (here the first and last rows of a 4-row tile, and a row inside one)."""
    shape, dtype = (1, 5, 10, 13, 40), torch.bfloat16
    fwd = EMULATIONS[access][0]
    x, weight, bias, cache = _inputs(shape, dtype, cache_frames=1 if group_size else 2)
    y, _ = fwd(x, weight, bias, cache, True, group_size)
    for r in (3, 4, 6):
        ys, _ = fwd(x[:, :, r - 1 : r + 2].contiguous(), weight, bias, cache[:, :, r - 1 : r + 2].contiguous(), True,
                    group_size)
        assert torch.equal(ys[:, :, 1], y[:, :, r]), r


@pytest.mark.racecheck
@pytest.mark.parametrize("kind", ["channel_offset", "odd_pixel_stride", "transposed"])
def test_cuda_vector_path_refuses_misaligned_views(kind):
    """What the CUDA launcher sends to the scalar path (cc::conv_vec_ok): a view whose start is not 16-byte
    aligned, a pixel stride that is not a multiple of 8 bf16 elements, a channel stride other than 1. The
    scalar path gives the reference on each."""
    shape, dtype = (1, 3, 4, 6, 16), torch.bfloat16
    x, weight, bias, cache = _inputs(shape, dtype, cache_frames=2)
    if kind == "channel_offset":
        v = torch.empty(shape[:-1] + (shape[-1] + 8,), dtype=dtype)[..., 1:-7]
    elif kind == "odd_pixel_stride":
        v = torch.empty(shape[:-1] + (shape[-1] + 4,), dtype=dtype)[..., :-4]
    else:
        v = torch.empty((1, 3, 4, 16, 6), dtype=dtype).transpose(3, 4)
    v.copy_(x)
    with pytest.raises(ValueError, match="the vector path needs"):
        cuda_emulation_vec[0](v, weight, bias, cache, True, 0)
    y, c = cuda_emulation[0](v, weight, bias, cache, True, 0)
    y_ref, c_ref = causal_dwconv3d_reference(x, weight, bias, cache, True, 0)
    assert_close(y, y_ref, dtype)
    assert torch.equal(c, c_ref)


# ----------------------------------------------------------------------------------------- bad input
def _bad_cases():
    x = torch.randn(1, 3, 4, 5, 6)
    w = torch.randn(6, 1, 3, 3, 3)
    b = torch.randn(6)
    c2 = torch.randn(1, 2, 4, 5, 6)
    return [
        ((x[0], w, b, None), {}, ValueError, "x must be a 5-D tensor"),
        ((x, w[:5], b, None), {}, ValueError, r"weight must be \(C, 1, 3, 3, 3\)"),
        ((x, w.reshape(6, 27), b, None), {}, ValueError, "weight must be a 5-D tensor"),
        ((x, w, b[:5], None), {}, ValueError, r"bias must be \(C,\)"),
        ((x, w, b, c2[:, :1]), {}, ValueError, r"cache must be \(B, 2, H, W, C\)"),
        ((x, w, b, c2), {"group_size": 2}, ValueError, r"cache must be \(B, 1, H, W, C\)"),
        ((x, w, b, c2[..., :5]), {}, ValueError, "cache must be"),
        ((x, w.double(), b, None), {}, TypeError, "weight has dtype torch.float64 but x has dtype torch.float32"),
        ((x.int(), w, b, None), {}, TypeError, "x must have dtype"),
        ((x, w, 3.0, None), {}, TypeError, "bias must be a torch.Tensor"),
        ((x[:, :0], w, b, None), {}, ValueError, "x must not be empty"),
        ((x, w, b, None), {"group_size": -1}, ValueError, "group_size must be an int >= 0"),
        ((x, w, b, None), {"group_size": 1.5}, ValueError, "group_size must be an int >= 0"),
        ((x, w, b, None), {"residual": 1}, TypeError, "residual must be a bool"),
        ((x, w, b, None), {"backend": "fast"}, ValueError, "backend must be one of"),
    ]


BAD_IDS = ["x_4d", "weight_channels", "weight_2d", "bias_channels", "cache_frames", "group_cache_frames",
           "cache_channels", "weight_dtype", "x_int", "bias_float", "x_empty", "group_negative", "group_float",
           "residual_int", "backend_name"]


@pytest.mark.parametrize("args, kwargs, err, match", _bad_cases(), ids=BAD_IDS)
def test_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        lk.causal_dwconv3d(*args, **kwargs)


def test_explicit_unavailable_backend_raises():
    x, weight, bias, _ = _inputs((1, 2, 3, 3, 4), torch.float32)
    with pytest.raises(lk.BackendUnavailable, match="cuda backend runs on CUDA tensors"):
        lk.causal_dwconv3d(x.cpu(), weight.cpu(), bias.cpu(), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (mixed-device input)")
def test_mixed_devices_raise():
    x, weight, bias, _ = _inputs((1, 2, 3, 3, 4), torch.float32)
    with pytest.raises(ValueError, match="all inputs must share a device"):
        lk.causal_dwconv3d(x.cuda(), weight.cpu(), bias.cuda())


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("residual", [False, True], ids=["peg", "x_plus_peg"])
def test_one_channel_with_bias_backward(backend, residual):
    """C == 1: the weight and bias gradients must be separate tensors (Triton returned two views of one
    buffer, which a custom op must not)."""
    x, weight, bias, cache = _inputs((1, 3, 4, 5, 1), torch.float32, cache_frames=2)
    g = torch.randn(x.shape, device=DEVICE)
    leaves = _leaves(x, weight, bias, cache)
    y, _ = lk.causal_dwconv3d(*leaves, residual=residual, backend=backend)
    y.backward(g)
    ref = _leaves(x, weight, bias, cache)
    yr, _ = causal_dwconv3d_reference(*ref, residual=residual)
    yr.backward(g)
    assert_close(y, yr)
    for got, exp in zip(leaves, ref):
        assert_close(got.grad, exp.grad)
    assert leaves[1].grad.untyped_storage().data_ptr() != leaves[2].grad.untyped_storage().data_ptr()


# --------------------------------------------------- Triton weight grad: launch plan and its independence
WGRAD_CASES = [  # (B, T, H, W, C), group size, cache frames, dtype, strided layout of x / grad_y
    pytest.param((1, 4, 3, 5, 20), 0, 2, torch.float32, "last", id="causal_cache_f32_strided"),
    pytest.param((2, 3, 2, 3, 37), 2, 1, torch.bfloat16, None, id="group2_cache_bf16"),
    pytest.param((1, 5, 2, 4, 16), 3, 0, torch.float16, "transposed", id="group3_nocache_f16_channel_strided"),
    pytest.param((1, 3, 2, 6, 8), 0, 0, torch.float32, "offset", id="causal_nocache_f32_offset"),
]


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter check runs on CPU-only machines")
@pytest.mark.parametrize("shape,group_size,cache_frames,dtype,layout", WGRAD_CASES)
def test_triton_weight_grad_does_not_depend_on_the_launch(shape, group_size, cache_frames, dtype, layout, monkeypatch):
    """The Triton weight grad with its partials sized for 1, 2 and 5 SMs at one program per SM (1, 2 and
    4-5 partial blocks, as the tiles divide): each
    equals the reference's weight and bias grads, the launches agree with one another to float32 rounding
    (the same sums regrouped: the contract), and one launch repeated gives the same bits (fixed order)."""
    pytest.importorskip("triton")
    from leanvae_kernels.triton import causal_conv as tc

    x, weight, bias, cache = _inputs(shape, dtype, cache_frames=cache_frames)
    g = torch.randn(shape).to(dtype)
    if layout:
        x, g = strided(x, layout), strided(g, layout)
    leaves = _leaves(x.float(), weight.float(), bias.float(), cache.float() if cache is not None else None)
    y, _ = causal_dwconv3d_reference(*leaves, group_size=group_size)
    y.backward(g.float())
    exp_w = leaves[1].grad.reshape(shape[-1], 27).t()
    monkeypatch.setattr(tc, "WGRAD_PROGRAMS_PER_SM", 1)
    results, nblks = {}, set()
    for sms in (1, 2, 5):
        tiles, per, nblk, _ = tc.wgrad_plan(*shape, sms, tc.triton.next_power_of_2(shape[3]),
                                            tc.triton.next_power_of_2(shape[4]))
        nblks.add(nblk)
        results[sms] = tc.causal_dwconv3d_bwd_weight(g, x, cache, group_size, sms=sms)
        assert_close(results[sms][0], exp_w, torch.float32, msg=f"grad weight, {nblk} partials")
        assert_close(results[sms][1], leaves[2].grad, torch.float32, msg=f"grad bias, {nblk} partials")
    assert len(nblks) == 3, nblks  # three different launches (1, 2 and 4-5 blocks)
    for sms in (2, 5):
        for a, e in zip(results[sms], results[1]):
            assert_close(a, e, torch.float32)
    again = tc.causal_dwconv3d_bwd_weight(g, x, cache, group_size, sms=5)
    assert torch.equal(again[0], results[5][0]) and torch.equal(again[1], results[5][1])


@pytest.mark.parametrize("sms", [1, 8, 108, 132])
@pytest.mark.parametrize("shape", [(1, 5, 135, 240, 512), (1, 1, 68, 120, 128), (2, 3, 5, 7, 37), (1, 1, 1, 1, 1)],
                         ids=_sid)
def test_triton_weight_grad_plan(shape, sms):
    """The weight grad's launch plan, a pure function of the shape and the SM count (no GPU needed): the
    blocks cover every tile exactly once, about WGRAD_PROGRAMS_PER_SM programs per SM where the tiles
    allow, and the partial sum kernel spreads its columns over at least `sms` programs where 28 C allows,
    with few serial trips (at the target shape before this plan: 14 programs x 159 trips)."""
    from leanvae_kernels.triton import causal_conv as tc

    b, t, h, w, c = shape
    tiles, per, nblk, cblocks = tc.wgrad_plan(*shape, sms)
    assert tiles == b * t * h * -(-w // tc.WGRAD_BLOCK_W) and cblocks == -(-c // tc.WGRAD_BLOCK_C)
    assert (nblk - 1) * per < tiles <= nblk * per  # every tile in exactly one block, no empty block
    programs = nblk * cblocks
    assert programs <= max(cblocks, sms * tc.WGRAD_PROGRAMS_PER_SM)
    if tiles >= sms * tc.WGRAD_PROGRAMS_PER_SM:
        assert programs >= sms * tc.WGRAD_PROGRAMS_PER_SM // 2, (nblk, cblocks)
    block_k, block, sum_programs, trips = tc.sum_plan(nblk, 28 * c, sms)
    assert sum_programs * block >= 28 * c > (sum_programs - 1) * block and trips * block_k >= nblk
    assert block_k * block <= 2048  # accumulator tile: 16 values per thread at 4 warps
    if 28 * c >= 32 * sms:
        assert sum_programs >= sms
    if shape == (1, 5, 135, 240, 512) and sms == 132:
        assert (nblk, cblocks, per) == (66, 16, 307) and (sum_programs, trips) == (224, 3)
