"""Each op's pure-PyTorch reference (the spec) against the reference model's own modules, and opcheck
of every registered op (the cases: op_table.py). Kernel backends are tested against these references in the per-op test files."""
import pytest
import torch
import torch.nn.functional as F
from helpers import case_id
from op_table import OPS, op_cases, registered_ops

import leanvae
import leanvae_kernels as lk

ODD_VIDEO_SHAPES = [(1, 3, 4, 8, 8), (2, 2, 5, 7, 9), (1, 3, 3, 2, 3), (1, 1, 2, 11, 6)]


def ids(shapes):
    return [case_id(B=s[0], C=s[1], T=s[2], H=s[3], W=s[4]) for s in shapes]


@pytest.mark.parametrize("shape", ODD_VIDEO_SHAPES, ids=ids(ODD_VIDEO_SHAPES))
def test_dwt3d_reference_matches_model(shape):
    x = torch.randn(shape)
    expected = leanvae.Patcher()._3ddwt(x, rescale=True)
    torch.testing.assert_close(lk.haar_dwt3d_reference(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lk.haar_dwt3d_reference(x, rescale=False), leanvae.Patcher()._3ddwt(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (2, 3)], ids=lambda s: case_id(H=s[0], W=s[1]))
def test_dwt2d_reference_matches_model(hw):
    x = torch.randn(2, 3, 1, *hw)
    torch.testing.assert_close(lk.haar_dwt2d_reference(x), leanvae.Patcher()._2ddwt(x, rescale=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 2, 5, 9], ids=lambda t: f"T{t}")
def test_patch_and_unpatch_references_match_model(t):
    x = torch.randn(2, 3, t, 12, 10)
    xi, xv = leanvae.Patcher()(x)
    ri, rv = lk.haar_patch(x, backend="reference")
    for a, b in ((ri, xi), (rv, xv)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    back = leanvae.UnPatcher()((xi, xv))
    torch.testing.assert_close(lk.haar_unpatch(xi, xv, backend="reference"), back, rtol=1e-5, atol=1e-5)
    if t > 1:  # the inverse is exact for even sizes: the model round-trips the clip
        torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_idwt_references_match_model():
    x = torch.randn(2, 24, 3, 5, 4)
    torch.testing.assert_close(lk.haar_idwt3d_reference(x), leanvae.UnPatcher()._3didwt(x, rescale=True), rtol=1e-5, atol=1e-5)
    x2 = torch.randn(2, 12, 1, 5, 4)
    torch.testing.assert_close(
        lk.haar_idwt2d_reference(x2).squeeze(2), leanvae.UnPatcher()._2didwt(x2, rescale=True), rtol=1e-5, atol=1e-5
    )


def _peg(c):
    torch.manual_seed(1)
    m = leanvae.PEG3D(c)
    with torch.no_grad():
        m.ds_conv.bias.normal_()
    return m


@pytest.mark.parametrize("c", [1, 5, 128])
def test_conv_reference_matches_peg3d(c):
    m = _peg(c)
    x = torch.randn(2, 4, 5, 7, c)
    y, cache = lk.causal_dwconv3d_reference(x, m.ds_conv.weight, m.ds_conv.bias)
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, x[:, -2:])
    y, _ = lk.causal_dwconv3d_reference(x, m.ds_conv.weight, m.ds_conv.bias, residual=True)
    torch.testing.assert_close(y, x + m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [(1, 1, 1, 1, 1), (2, 3), (1, 4), (3, 1, 1)], ids=lambda c: "chunks" + "-".join(map(str, c)))
def test_conv_reference_cache_matches_peg3d_tiling(chunks):
    """One-frame and longer chunks: the op's cache reproduces the model's own tile-inference cache."""
    m = _peg(6)
    x = torch.randn(1, sum(chunks), 4, 5, 6)
    m.tile_inference = True
    cache, start = None, 0
    for i, n in enumerate(chunks):
        m.is_first_chunk = i == 0
        part = x[:, start : start + n]
        y, cache = lk.causal_dwconv3d_reference(part, m.ds_conv.weight, m.ds_conv.bias, cache)
        torch.testing.assert_close(y, m(part), rtol=1e-5, atol=1e-5)
        start += n
    full, _ = lk.causal_dwconv3d_reference(x, m.ds_conv.weight, m.ds_conv.bias)
    torch.testing.assert_close(y, full[:, -chunks[-1]:], rtol=1e-6, atol=1e-6)


def test_group_causal_reference_semantics():
    """g = T and no cache: centred taps with zeros at both ends of the group (one plain padded conv)."""
    c = 3
    w = torch.randn(c, 1, 3, 3, 3)
    x = torch.randn(1, 4, 5, 5, c)
    y, cache = lk.causal_dwconv3d_reference(x, w, group_size=4)
    xc = x.permute(0, 4, 1, 2, 3)
    expected = F.conv3d(F.pad(xc, (1, 1, 1, 1, 1, 1)), w, groups=c).permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert cache.shape == (1, 1, 5, 5, c) and torch.equal(cache, x[:, -1:])
    # Two groups of 2 == chunked calls of 2 frames passing the one-frame cache.
    y2, _ = lk.causal_dwconv3d_reference(x, w, group_size=2)
    a, ca = lk.causal_dwconv3d_reference(x[:, :2], w, group_size=2)
    b, _ = lk.causal_dwconv3d_reference(x[:, 2:], w, cache=ca, group_size=2)
    torch.testing.assert_close(y2, torch.cat([a, b], 1), rtol=0, atol=0)


def test_ista_references_match_model_expressions():
    torch.manual_seed(2)
    ista = leanvae.ISTA(points_num=64, out_num=4, iter_num=1, layer_num=1)
    r, y = torch.randn(50, 64), torch.randn(50, 4)
    w = ista.weights[0]
    expected = r - w * torch.mm(torch.mm(r, ista.phi.t()) - y, ista.phi)
    torch.testing.assert_close(lk.ista_step_reference(r, y, ista.phi, w), expected, rtol=1e-5, atol=1e-5)
    th = ista.threshold[0]
    torch.testing.assert_close(
        lk.soft_threshold_reference(r, th), torch.mul(torch.sign(r), F.relu(torch.abs(r) - th)), rtol=0, atol=0
    )


def test_every_registered_op_has_an_opcheck_case():
    assert registered_ops() == set(op_cases())


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_opcheck_every_op(name, backend):
    # Backward ops have no autograd formula of their own (no double backward), so their inputs don't require grad.
    grad = not name.endswith("_backward")
    for args in op_cases()[name]:
        args = tuple(a.clone().requires_grad_(grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        torch.library.opcheck(getattr(torch.ops.leanvae, name).default, args + (backend,))
