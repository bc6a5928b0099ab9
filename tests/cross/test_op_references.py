"""Each op's pure-PyTorch reference (the spec) against the reference model's own modules, and opcheck
of every registered op. Kernel backends are tested against these references in the per-op test files."""
import pytest
import torch
import torch.nn.functional as F
from helpers import case_id

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


def _opcheck_cases():
    """Arguments (without the trailing backend) for every op registered under leanvae::, backward ops too."""
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    x5 = rnd(1, 2, 3, 5, 4)
    odd = rnd(1, 2, 5, 5, 4)
    bands3 = rnd(1, 16, 2, 3, 2)
    bands2 = rnd(1, 8, 1, 3, 2)
    conv_x, w, b, cache = rnd(1, 3, 4, 5, 6), rnd(6, 1, 3, 3, 3), rnd(6), rnd(1, 2, 4, 5, 6)
    r, y, phi, step = rnd(7, 16), rnd(7, 4), rnd(4, 16), torch.tensor(0.9)
    return {
        "haar_dwt3d": [(x5, True)],
        "haar_dwt3d_backward": [(rnd(1, 16, 2, 3, 2), x5, True)],
        "haar_dwt2d": [(x5[:, :, :1], True)],
        "haar_dwt2d_backward": [(rnd(1, 8, 1, 3, 2), x5[:, :, :1].contiguous(), True)],
        "haar_idwt3d": [(bands3, True)],
        "haar_idwt3d_backward": [(rnd(1, 2, 4, 6, 4), bands3, True)],
        "haar_idwt2d": [(bands2, False)],
        "haar_idwt2d_backward": [(rnd(1, 2, 1, 6, 4), bands2, False)],
        "haar_patch": [(odd, True)],
        "haar_patch_backward": [(rnd(1, 8, 1, 3, 2), rnd(1, 16, 2, 3, 2), odd, True)],
        "haar_unpatch": [(rnd(1, 8, 1, 3, 2), bands3, True)],
        "haar_unpatch_backward": [(rnd(1, 2, 5, 6, 4), rnd(1, 8, 1, 3, 2), bands3, True)],
        "causal_dwconv3d": [(conv_x, w, b, cache, True, 0), (conv_x, w, None, None, False, 2)],
        "causal_dwconv3d_backward": [(rnd(1, 3, 4, 5, 6), rnd(1, 2, 4, 5, 6), conv_x, w, b, cache, True, 0)],
        "haar_latent_compress": [(rnd(1, 3, 4, 4, 8), 2, [0, 1, 2, 4], True, False), (rnd(1, 2, 2, 4, 2), 1, [7], False, True)],
        "haar_latent_compress_backward": [(rnd(1, 12, 1, 1, 2), [1, 3, 4, 4, 8], 2, [0, 1, 2, 4], True, False)],
        "haar_latent_decompress": [(rnd(1, 12, 1, 1, 2), 2, [0, 1, 2, 4], True, False)],
        "haar_latent_decompress_backward": [(rnd(1, 3, 4, 4, 8), [1, 12, 1, 1, 2], 2, [0, 1, 2, 4], True, False)],
        "ista_step": [(r, y, phi, step)],
        "ista_residual_step": [(r, rnd(7, 16), y, phi, step)],
        "ista_residual_step_backward": [(rnd(7, 16), r, rnd(7, 16), y, phi, step)],
        "ista_init_step": [(y, rnd(16, 4), phi, step)],
        "ista_init_step_backward": [(rnd(7, 16), y, rnd(16, 4), phi, step)],
        "ista_step_backward": [(rnd(7, 16), r, y, phi, step)],
        "soft_threshold": [(r, torch.tensor([0.1]))],
        "soft_threshold_backward": [(rnd(7, 16), r, torch.tensor([0.1]))],
        "geglu": [(r,), (rnd(2, 3, 10).transpose(0, 1),)],
        "geglu_backward": [(rnd(7, 8), r)],
    }


def test_every_registered_op_has_an_opcheck_case():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("leanvae::")}
    assert registered == set(_opcheck_cases())


@pytest.mark.parametrize("name", sorted(_opcheck_cases()))
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_opcheck_every_op(name, backend):
    # Backward ops have no autograd formula of their own (no double backward), so their inputs don't require grad.
    grad = not name.endswith("_backward")
    for args in _opcheck_cases()[name]:
        args = tuple(a.clone().requires_grad_(grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        torch.library.opcheck(getattr(torch.ops.leanvae, name).default, args + (backend,))
