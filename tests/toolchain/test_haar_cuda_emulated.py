"""The CUDA Haar kernels (csrc/cuda/haar_body.cuh, with haar.cu's launch geometry) run on the CPU by the
test suite's emulation (tests/cuda_emu.py), against the native CPU backend.

The kernels use no shared memory, no synchronisation and no warp intrinsics; the emulation runs every
thread of every block, under the race checker like every emulated kernel (a report fails the call).
What this checks: the indexing, the tiling, the vector loads and their fallbacks, the odd-size folds,
strides, band slots and masks. What it cannot check: real device behaviour (float <-> 16-bit conversions
here are the CPU's, alignment faults, performance). Skipped without a host C++ compiler.
"""
import pytest
import torch
from cuda_emu import lib_or_skip, run
from helpers import DTYPE_IDS

import leanvae_kernels as lk
from leanvae_kernels.ops import haar as H

pytestmark = pytest.mark.racecheck


@pytest.fixture(scope="module")
def emu():
    return lib_or_skip()


def _call(lib, which, tensors, ints, floats):
    run("haar_synthesis" if which else "haar_analysis", tensors, ints, floats)


def _analysis(lib, x, two_d, three_d, s2, s3, slots=H.IDENTITY_SLOTS, mask=H.ALL_BANDS, out_dtype=None):
    b, c, t, h, w = x.shape
    ho, wo, f0 = (h + 1) // 2, (w + 1) // 2, int(two_d)
    out_dtype = out_dtype or x.dtype
    xi = torch.full((b, 4 * c, 1, ho, wo), float("nan"), dtype=out_dtype) if two_d else x
    xv = torch.full((b, (max(slots) + 1) * c, (t - f0 + 1) // 2, ho, wo), float("nan"), dtype=out_dtype) if three_d else x
    _call(lib, 0, [x, xi, xv], H._band_ints(two_d, three_d, slots, mask), [s2, s3])
    return (xi if two_d else None), (xv if three_d else None)


def _synthesis(lib, xi, xv, shape, s2, s3, slots=H.IDENTITY_SLOTS, mask=H.ALL_BANDS, out_dtype=None):
    ref = xv if xv is not None else xi
    y = torch.full(shape, float("nan"), dtype=out_dtype or ref.dtype)
    _call(lib, 1, [ref if xi is None else xi, ref if xv is None else xv, y],
          H._band_ints(xi is not None, xv is not None, slots, mask), [s2, s3])
    return y


# Widths around the 2*kV = 4 samples a thread reads and the 128 blocks of a thread block; odd sizes.
SHAPES = [(1, 3, 17, 8, 20), (2, 2, 9, 7, 11), (1, 1, 5, 3, 3), (1, 2, 3, 2, 258), (1, 1, 4, 9, 257), (1, 1, 3, 10, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_cuda_matches_cpu(emu, dtype, shape):
    x = torch.randn(shape).to(dtype)
    s2, s3, i2, i3 = H.scales(False)
    has_2d = shape[2] % 2 == 1
    for two_d, three_d in ((has_2d, True), (True, False)):
        src = x if three_d else x[:, :, :1]
        xi, xv = _analysis(emu, src, two_d, three_d, s2, s3)
        ri, rv = H.analysis("cpu", src, two_d=two_d, three_d=three_d, s2=s2, s3=s3)
        for a, r in zip((xi, xv), (ri, rv)):
            assert a is None or torch.equal(a, r)
        # The adjoint (odd sizes fold) and the inverse (even sizes).
        y = _synthesis(emu, ri, rv, src.shape, s2, s3)
        assert torch.equal(y, H.synthesis("cpu", ri, rv, src.shape, s2=s2, s3=s3))
        up = (src.shape[0], src.shape[1], (1 if two_d else 0) + 2 * (rv.shape[2] if three_d else 0),
              2 * ri_or(ri, rv).shape[3], 2 * ri_or(ri, rv).shape[4])
        y = _synthesis(emu, ri, rv, up, i2, i3)
        assert torch.equal(y, H.synthesis("cpu", ri, rv, up, s2=i2, s3=i3))


def ri_or(ri, rv):
    return rv if rv is not None else ri


def test_emulated_cuda_strided_slots_and_masks(emu):
    big = torch.randn(2, 5, 12, 9, 23)
    x = big[:, 1:4, 1:, :, 1::2]  # frame and channel slices, W stride 2
    ri, rv = H.analysis("cpu", x.contiguous(), two_d=True, three_d=True)
    xi, xv = _analysis(emu, x, True, True, 1.0, 1.0)
    assert torch.equal(xi, ri) and torch.equal(xv, rv)
    # Latent-compression band maps: dropped bands (slot -1), zeroed bands (mask), reordered slots.
    z = torch.randn(1, 2, 4, 6, 10)
    for slots, mask in (((2, -1, 0, -1, 1, -1, -1, -1), 0xFF), (tuple(range(8)), 0b00010111), ((0,) + (-1,) * 7, 1)):
        _, a = _analysis(emu, z, False, True, 0.5, 0.25, slots, mask)
        _, r = H.analysis("cpu", z, three_d=True, s2=0.5, s3=0.25, slots=slots, mask=mask)
        assert torch.equal(a, r)
        bands = torch.randn_like(r).transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous input
        y = _synthesis(emu, None, bands, z.shape, 1.0, 0.125, slots, mask)
        assert torch.equal(y, H.synthesis("cpu", None, bands, z.shape, s3=0.125, slots=slots, mask=mask))


def test_emulated_cuda_int64_offsets(emu):
    """Element offsets past 2^31 (a strided view into a lazily committed 4 GiB buffer)."""
    n = (1 << 31) + 4096
    buf = torch.empty(n, dtype=torch.bfloat16)
    x = buf.as_strided((1, 1, 3, 2, 4), (0, 0, 1 << 30, 4, 1))
    small = torch.randn(1, 1, 3, 2, 4).to(torch.bfloat16)
    x.copy_(small)
    xi, xv = _analysis(emu, x, True, True, 1.0, 1.0)
    ri, rv = lk.haar_patch(small, backend="reference")
    assert torch.equal(xi, ri) and torch.equal(xv, rv)
    y = buf.as_strided((1, 1, 3, 2, 4), (0, 0, 1 << 30, 4, 1))
    _call(emu, 1, [ri, rv, y], H._band_ints(True, True, H.IDENTITY_SLOTS, H.ALL_BANDS), [0.25, 0.125])
    assert torch.equal(y.contiguous(), lk.haar_unpatch(ri, rv, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: DTYPE_IDS[d])
def test_emulated_cuda_mixed_dtypes_between_levels(emu, dtype):
    # The latent transforms' levels: 16-bit in -> float32 out, float32 in -> 16-bit out,
    # both directions, against the CPU kernels (same float32 arithmetic, one rounding at the end).
    z = torch.randn(1, 2, 8, 6, 10).to(dtype)
    lll = ((0,) + (-1,) * 7, 1)
    for out_dtype in (torch.float32, dtype):
        src = z if out_dtype == torch.float32 else z.float()
        _, a = _analysis(emu, src, False, True, 1.0, 0.5, *lll, out_dtype=out_dtype)
        _, r = H.analysis("cpu", src, three_d=True, s3=0.5, slots=lll[0], mask=lll[1], out_dtype=out_dtype)
        assert a.dtype == r.dtype == out_dtype and torch.equal(a, r)
        y = _synthesis(emu, None, r, src.shape, 1.0, 2.0, *lll, out_dtype=src.dtype)
        ry = H.synthesis("cpu", None, r, src.shape, s3=2.0, slots=lll[0], mask=lll[1], out_dtype=src.dtype)
        assert y.dtype == src.dtype and torch.equal(y, ry)
    with pytest.raises(ValueError, match="is not supported"):
        _analysis(emu, z, False, True, 1.0, 1.0, out_dtype=torch.float16 if dtype == torch.bfloat16 else torch.bfloat16)
