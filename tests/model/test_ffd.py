"""The padded-GEMM feed-forward (leanvae/fused/ffd.py) against the model's ffd, with and without the
residual, in every dtype, with gradients, under autocast, and its fallbacks."""
import pytest
import torch
from conftest import DEVICE
from helpers import DTYPE_IDS, assert_close, case_id
from torch import nn

from leanvae.modules import ffd
from leanvae.fused.ffd import PAD, ffd_apply, is_ffd

DIMS = [128, 384, 512, 40]  # inner widths 341, 1024, 1365, 106: padded, aligned, padded, padded


def make(dim, dtype=torch.float32):
    torch.manual_seed(dim)
    m = ffd(dim).to(DEVICE)
    with torch.no_grad():
        m[0].weight.add_(0.1 * torch.randn_like(m[0].weight))
        m[0].bias.add_(0.1 * torch.randn_like(m[0].bias))
    return m.to(dtype)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dim", DIMS, ids=lambda d: case_id(D=d))
def test_matches_model_float32(dim, residual):
    m = make(dim)
    x = torch.randn(2, 3, 5, 7, dim, device=DEVICE)
    with torch.no_grad():
        ref = x + m(x) if residual else m(x)
        out = ffd_apply(m, x, residual)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=lambda d: DTYPE_IDS[d])
def test_other_dtypes(dtype):
    m32 = make(512)
    m = make(512, dtype)
    x = torch.randn(64, 512, device=DEVICE)
    with torch.no_grad():
        exact = (x.double() + m32.double()(x.double()))
        ref = x.to(dtype) + m(x.to(dtype))
        out = ffd_apply(m, x.to(dtype), residual=True)
    assert out.dtype == dtype
    if dtype == torch.float64:
        assert_close(out, exact, dtype)
    else:  # no further from the exact result than the model's own low-precision path (+ one ulp of slack)
        err = lambda a: ((a.double() - exact).norm() / exact.norm()).item()  # noqa: E731
        assert err(out) <= 1.25 * err(ref) + 1e-3


def test_gradients_match_model():
    m_ref, m_fused = make(384), make(384)
    x = torch.randn(4, 9, 384, device=DEVICE)
    g = torch.randn_like(x)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    (xr + m_ref(xr)).backward(g)
    ffd_apply(m_fused, xf, residual=True).backward(g)
    assert_close(xf.grad, xr.grad, torch.float32)
    for (n, a), (_, b) in zip(m_fused.named_parameters(), m_ref.named_parameters()):
        assert a.grad.shape == b.grad.shape, n
        assert_close(a.grad, b.grad, torch.float32, msg=n)


def test_autocast_keeps_model_dtypes():
    m = make(512)
    x = torch.randn(16, 512, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ref, out = x + m(x), ffd_apply(m, x, residual=True)
        ref2, out2 = m(x), ffd_apply(m, x)
    assert out.dtype == ref.dtype == torch.float32 and out2.dtype == ref2.dtype == torch.bfloat16
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


def test_padding_is_a_multiple_and_zero_pads_are_exact():
    """gelu(0) * 0 = 0: an input with a huge value still gives finite, identical pad contributions."""
    m = make(128)
    assert PAD % 8 == 0 and is_ffd(m)
    x = torch.randn(3, 128, device=DEVICE) * 1e3
    with torch.no_grad():
        assert_close(ffd_apply(m, x), m(x), torch.float32)


def test_fallbacks_run_the_module_itself():
    m = make(64)
    m[3].p = 0.5
    m.train()
    x = torch.randn(8, 64, device=DEVICE)
    torch.manual_seed(1)
    a = ffd_apply(m, x, residual=True)
    torch.manual_seed(1)
    b = x + m(x)
    assert torch.equal(a, b)  # active dropout: the module's own forward, same random stream
    other = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64)).to(DEVICE)
    assert not is_ffd(other)
    assert torch.equal(ffd_apply(other, x), other(x))


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_inference_chunks_equal_one_pass(residual):
    """Without autograd the tokens run in chunks (here forced small, with a ragged last chunk, on strided
    input): the same numbers as one pass, and as the model."""
    m = make(128)
    x = torch.randn(7, 2, 23, 128, device=DEVICE).transpose(0, 1)  # 322 tokens, not contiguous
    with torch.no_grad():
        ref = x + m(x) if residual else m(x)
        whole = ffd_apply(m, x, residual, chunk_bytes=1 << 30)
        chunked = ffd_apply(m, x, residual, chunk_bytes=50 * 2 * 352 * 4)  # 50 tokens a chunk
    assert chunked.shape == ref.shape and chunked.is_contiguous()
    assert_close(chunked, whole, torch.float32)
    assert_close(chunked, ref, torch.float32)
