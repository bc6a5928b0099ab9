"""Drop-in PEG3D / NAF / ResNAF forwards: parity with the model's modules, binding onto existing instances
(parameters, state_dict and repr unchanged), lossless tile inference, and the cache attribute scheme."""
import copy
import importlib.util
import os
import sys
import types

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close

from leanvae.modules import NAF, PEG3D, ResNAF
from leanvae.fused.peg3d import (
    CACHE_ATTR, FusedPEG3D, fused_naf_forward, fused_peg3d_forward, fused_resnaf_forward,
)

PUBLISHED = "/tmp/published/LeanVAE/modules/backbones.py"


def _bind(module, fn):
    module.forward = types.MethodType(fn, module)
    return module


def _tokens(shape, dtype=torch.float32):
    return torch.randn(shape, device=DEVICE, dtype=dtype)


def _set_tiling(root, tile_inference, is_first_chunk=True):
    """What the model's set_tile_inference / _set_first_chunk do."""
    for m in root.modules():
        if hasattr(m, "tile_inference"):
            m.tile_inference = tile_inference
        if hasattr(m, "is_first_chunk"):
            m.is_first_chunk = is_first_chunk


def _run_chunked(module, x, sizes):
    """The model's tile inference: first chunk with is_first_chunk=True, the others False."""
    outs, start = [], 0
    for idx, n in enumerate(sizes):
        _set_tiling(module, True, idx == 0)
        outs.append(module(x[:, start:start + n]))
        start += n
    _set_tiling(module, False)
    return torch.cat(outs, dim=1)


def test_fused_peg3d_matches_peg3d_and_keeps_its_parameters():
    torch.manual_seed(1)
    ref = PEG3D(24).to(DEVICE)
    torch.manual_seed(1)
    fused = FusedPEG3D(24).to(DEVICE)
    assert list(fused.state_dict()) == list(ref.state_dict()) == ["ds_conv.weight", "ds_conv.bias"]
    for (n1, p1), (n2, p2) in zip(fused.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)  # same initialisation under the same seed
    assert (fused.tile_inference, fused.is_first_chunk, fused.causal_cached) == (False, True, None)
    x = _tokens((2, 5, 6, 7, 64))[..., 8:32]  # a channel slice, as the decoder passes
    xf, xr = x.detach().requires_grad_(), x.detach().clone().requires_grad_()
    g = torch.randn_like(x)
    fused(xf).backward(g)
    ref(xr).backward(g)
    assert_close(fused(x), ref(x))
    assert_close(xf.grad, xr.grad)
    for p1, p2 in zip(fused.parameters(), ref.parameters()):
        assert_close(p1.grad, p2.grad)


def test_fused_peg3d_is_not_switched_as_a_plain_peg3d():
    """FusedPEG3D shares PEG3D's construction but keeps its own forward: the switch leaves it alone (it is
    fused already), a class-level switch of PEG3D does not reach it, and a fused NAF calls it as a module."""
    from leanvae.fused.switch import use_fused_kernels

    naf = NAF(1, 8).to(DEVICE)
    naf.dconv_layer[0] = FusedPEG3D(8).to(DEVICE)
    x = _tokens((1, 3, 4, 5, 8))
    expected = naf(x)
    with use_fused_kernels(naf, backend="reference", conv=True, ffd=False) as h:
        assert any("FusedPEG3D defines its own forward" in s for s in h.skipped), h.skipped
        assert "forward" not in vars(naf.dconv_layer[0])
        assert torch.equal(naf(x), expected)
    own, plain = vars(FusedPEG3D)["forward"], PEG3D.forward
    with use_fused_kernels(backend="reference"):
        assert PEG3D.forward is not plain and vars(FusedPEG3D)["forward"] is own


def test_binding_onto_an_instance_keeps_parameters_state_dict_and_repr():
    naf = ResNAF(2, 16).to(DEVICE)
    before = (repr(naf), list(naf.state_dict()), [p.data_ptr() for p in naf.parameters()])
    ref = copy.deepcopy(naf)
    _bind(naf, fused_resnaf_forward)
    for peg in naf.dconv_layer:
        _bind(peg, fused_peg3d_forward)
    assert (repr(naf), list(naf.state_dict()), [p.data_ptr() for p in naf.parameters()]) == before
    naf.load_state_dict(ref.state_dict(), strict=True)
    x = _tokens((1, 3, 4, 5, 16))
    assert_close(naf(x), ref(x))


@pytest.mark.parametrize("cls, fused", [(NAF, fused_naf_forward), (ResNAF, fused_resnaf_forward)], ids=["NAF", "ResNAF"])
def test_naf_forwards_match_the_model_forward_and_backward(cls, fused):
    ref = cls(2, 24).to(DEVICE)
    mod = _bind(copy.deepcopy(ref), fused)
    x = _tokens((2, 5, 5, 6, 24))
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    y_ref, y = ref(xr), mod(xf)
    assert_close(y, y_ref)
    y_ref.backward(g)
    y.backward(g)
    assert_close(xf.grad, xr.grad)
    for (name, p), q in zip(mod.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("cls, fused", [(NAF, fused_naf_forward), (ResNAF, fused_resnaf_forward)], ids=["NAF", "ResNAF"])
def test_tile_inference_is_lossless(cls, fused):
    """Chunked == untiled: exactly for the conv alone, to float32 rounding for the whole block (the GEMMs of the
    feed-forward round differently with the number of tokens, as in the reference)."""
    ref = cls(2, 32).to(DEVICE).eval()
    mod = _bind(copy.deepcopy(ref), fused)
    x = _tokens((1, 9, 4, 6, 32))
    sizes = [5, 4] if cls is ResNAF else [1, 3, 4, 1]
    with torch.no_grad():
        full = mod(x)
        chunked = _run_chunked(mod, x, sizes)
        ref_chunked = _run_chunked(ref, x, sizes)
    assert_close(chunked, full)
    assert_close(chunked, ref_chunked)
    peg = FusedPEG3D(32).to(DEVICE)
    with torch.no_grad():
        assert torch.equal(_run_chunked(peg, x, sizes), peg(x))


def test_cache_scheme_when_switching_implementations_mid_stream():
    """Reference first chunk -> fused second chunk uses the reference's padded cache; a fused chunk clears
    causal_cached, so a reverted (reference) forward cannot read a stale cache: it fails loudly."""
    peg = PEG3D(16).to(DEVICE)
    x = _tokens((1, 7, 4, 5, 16))
    with torch.no_grad():
        full = peg(x)
        _set_tiling(peg, True, True)
        y1 = peg(x[:, :3])  # the reference forward
        _bind(peg, fused_peg3d_forward)
        _set_tiling(peg, True, False)
        y2 = peg(x[:, 3:5])  # fused, reading the reference's cache
        assert peg.causal_cached is None and getattr(peg, CACHE_ATTR).shape == (1, 2, 4, 5, 16)
        y3 = peg(x[:, 5:])  # fused, reading its own cache
    assert_close(torch.cat([y1, y2, y3], 1), full)
    del peg.forward  # revert: the class's (reference) forward again
    with pytest.raises(TypeError):
        peg(x[:, :2])


def test_non_first_chunk_without_cache_raises():
    peg = FusedPEG3D(8).to(DEVICE)
    _set_tiling(peg, True, False)
    with pytest.raises(RuntimeError, match="no previous chunk left a cache"):
        peg(_tokens((1, 2, 3, 3, 8)))
    _set_tiling(peg, True, True)
    peg(_tokens((1, 2, 3, 3, 8)))
    _set_tiling(peg, True, False)
    with pytest.raises(ValueError, match="expected"):
        peg(_tokens((1, 2, 4, 3, 8)))  # a different frame size than the previous chunk


def test_first_chunk_ignores_a_stale_cache():
    peg = FusedPEG3D(8).to(DEVICE)
    x = _tokens((1, 4, 3, 3, 8))
    with torch.no_grad():
        _run_chunked(peg, _tokens((1, 4, 3, 3, 8)), [2, 2])  # an earlier stream leaves a cache behind
        assert torch.equal(_run_chunked(peg, x, [3, 1]), peg(x))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU autocast case")
def test_autocast_dtype_follows_the_model():
    ref = ResNAF(1, 16)
    mod = _bind(copy.deepcopy(ref), fused_resnaf_forward)
    peg = PEG3D(16)
    fpeg = _bind(copy.deepcopy(peg), fused_peg3d_forward)
    x = _tokens((1, 3, 4, 4, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for a, b in ((fpeg(x), peg(x)), (mod(x), ref(x))):
            assert a.dtype == b.dtype
            assert_close(a.float(), b.float(), torch.bfloat16)


def _published_backbones():
    if not os.path.exists(PUBLISHED):
        pytest.skip(f"the published LeanVAE source is not at {PUBLISHED}")
    spec = importlib.util.spec_from_file_location("_published_backbones", PUBLISHED)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ImportError as exc:
        pytest.skip(f"the published backbones do not import here ({exc})")
    sys.modules.pop("_published_backbones", None)
    return mod


def test_binds_onto_the_published_modules():
    pub = _published_backbones()
    ref = pub.ResNAF(2, 16).to(DEVICE).eval()
    mod = copy.deepcopy(ref)
    _bind(mod, fused_resnaf_forward)
    x = _tokens((1, 5, 4, 5, 16))
    with torch.no_grad():
        assert_close(mod(x), ref(x))
        assert_close(_run_chunked(mod, x, [3, 2]), _run_chunked(ref, x, [3, 2]))
