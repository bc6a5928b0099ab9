"""Exact spatial tiling (LeanVAE.enable_tiling, leanvae/tiling.py): the measured receptive field, tiled vs
untiled encode and decode (reference and fused, smallest and odd tile sizes, with the temporal chunking),
that the halo is needed, bad tile sizes, and the command-line option.

Bound: max|tiled - untiled| <= 1e-6 * max|untiled| (float32). Tiles change how many tokens each GEMM is
called with, and BLAS may then accumulate in another order: float32 rounding (observed <= 2e-7, a few ulps
at the output's scale), far below what a halo one token short gives (checked below: > 100x the bound).
"""
import contextlib

import pytest
import torch
import torch.nn as nn

import leanvae
import leanvae.tiling as tiling
from leanvae import LeanVAE

REL = 1e-6

# Depth sets the receptive field: one conv per NAF/ResNAF layer. SHALLOW: encoder 1 + 1, decoder
# 1 + 1 + one ISTA iteration of 1 + 1: reach 2 / 4 tokens, so small frames are wider than the halo.
SHALLOW = dict(embedding_dim=16, l_dim=8, h_dim=8, sep_num_layer=1, fusion_num_layer=1, ista_iter_num=1,
               ista_layer_num=1)
NARROW = dict(embedding_dim=32, l_dim=8, h_dim=24)  # the published depth, narrow


def _expected_reach(cfg):
    """The count the probe must reproduce: encoder sep + fusion convs; decoder fusion + sep (the part after
    the bottleneck), plus the ISTA bottleneck's forward and backward NAF of every iteration for decode."""
    a = {**leanvae.DEFAULT_ARGS, **cfg}
    enc = a["sep_num_layer"] + a["fusion_num_layer"]
    after = a["fusion_num_layer"] + a["sep_num_layer"]
    return enc, after + 2 * a["ista_iter_num"] * a["ista_layer_num"], after


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return LeanVAE.from_config(**cfg).eval()


@pytest.fixture(scope="module")
def shallow():
    return _model(SHALLOW)


@pytest.fixture(scope="module")
def narrow():
    return _model(NARROW)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _clip(t, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=g) - 0.5


@pytest.mark.parametrize("cfg", [SHALLOW, NARROW, dict(SHALLOW, sep_num_layer=2, ista_layer_num=2)],
                         ids=["shallow", "published_depth", "mixed_depth"])
def test_measured_receptive_field_is_the_conv_depth(cfg):
    rf = tiling.receptive_field(_model(cfg))
    enc, dec, after = _expected_reach(cfg)
    assert rf.scale == 8
    assert rf.encode == ((enc, enc), (enc, enc))
    assert rf.decode == ((dec, dec), (dec, dec))
    assert rf.decoder == ((after, after), (after, after))


def test_probe_sees_the_same_field_through_the_fused_kernels(shallow):
    ref = tiling.receptive_field(shallow, refresh=True)
    with leanvae.use_fused_kernels(shallow):
        fused = tiling.receptive_field(shallow, refresh=True)
    assert fused == ref


class _FrameMean(nn.Module):
    """A global layer: every token gets the mean over the frame added (tokens (B, T, H, W, D))."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        x = self.inner(x)
        return x + x.mean(dim=(2, 3), keepdim=True)


def test_a_global_layer_is_found_and_refused():
    m = _model(SHALLOW)
    m.decoder.low_layer = _FrameMean(m.decoder.low_layer)
    with pytest.raises(ValueError, match="decode is not spatially local along H"):
        tiling.receptive_field(m)
    with pytest.raises(ValueError, match="not spatially local"):
        m.enable_tiling(8, 8)
    assert not m.use_tiling


def _check_tiled(model, x, tile, chunks=None):
    """Tiled encode and decode of x equal the untiled ones within REL; the temporal switch is restored."""
    saved = model.chunksize_enc, model.chunksize_dec
    own = lambda: (vars(model.latent_bottleneck).get("recon"), vars(model.decoder).get("_feature_transform"))  # noqa: E731
    attrs = own()  # what the tiled decode wraps for its duration (the fused switch may have set recon)
    if chunks:
        model.chunksize_enc, model.chunksize_dec = chunks
    try:
        with torch.no_grad():
            z0 = model.encode(x)
            r0 = model.decode(z0, is_image=x.ndim == 4)
            model.enable_tiling(*tile)
            z = model.encode(x)
            r = model.decode(z0, is_image=x.ndim == 4)
    finally:
        model.disable_tiling()
        model.chunksize_enc, model.chunksize_dec = saved
    assert z.shape == z0.shape and r.shape == r0.shape
    assert _rel(z, z0) <= REL, _rel(z, z0)
    assert _rel(r, r0) <= REL, _rel(r, r0)
    assert model.tile_inference is False
    assert own() == attrs
    return z0, r0


def _maybe_fused(model, fused):
    return leanvae.use_fused_kernels(model) if fused else contextlib.nullcontext()


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_smallest_tiles_equal_untiled(shallow, fused):
    # 5x24x80: 3x10 tokens, one token per tile (30 tiles); the halos (2 / 4 tokens) are clipped at the
    # frame's borders for the outer tiles and not for the inner ones
    with _maybe_fused(shallow, fused):
        _check_tiled(shallow, _clip(5, 24, 80), (8, 8))


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_odd_tiles_with_temporal_chunks_equal_untiled(shallow, fused):
    # 9x40x120 (5x15 tokens) in tiles of at most 16x56 pixels (2x7 tokens: rows 2/2/1, columns 5/5/5), each
    # tile through the causal cache in chunks of 5 frames / 2 latent frames
    with _maybe_fused(shallow, fused):
        _check_tiled(shallow, _clip(9, 40, 120), (16, 56), chunks=(5, 2))


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_published_depth_tiles_equal_untiled(narrow, fused):
    # the published depth (halos 6 / 14 tokens, wider than this frame: every tile reads all of it)
    with _maybe_fused(narrow, fused):
        _check_tiled(narrow, _clip(5, 32, 48), (16, 24))


def test_feed_forward_and_conv_slices_equal_untiled(shallow, monkeypatch):
    # A tile's feed-forwards run in slices of tokens (NAF.token_slice); here 7 tokens a slice, which divides
    # no tile's token count, so slices end mid-row and mid-frame. Its convs run in slices of 3 channels
    # (PEG3D.channel_slice), which divides none of the model's widths (8, 16).
    from leanvae.modules import NAF, PEG3D

    monkeypatch.setattr(tiling, "CONV_CHANNEL_SLICE", 3)
    convs = []
    conv3d = torch.nn.functional.conv3d

    def recording_conv3d(x, *args, **kwargs):
        convs.append(x.shape[1])
        return conv3d(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv3d", recording_conv3d)

    nafs = [m for m in shallow.modules() if isinstance(m, NAF)]
    hidden = nafs[0].ffd_layer[0][1]
    monkeypatch.setattr(tiling, "FEED_FORWARD_SLICE_BYTES", 7 * hidden.out_features * hidden.weight.element_size())
    calls = []
    hooks = [m.ffd_layer[0].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
             for m in nafs[:1]]
    try:
        _check_tiled(shallow, _clip(5, 24, 40), (16, 24))
    finally:
        for h in hooks:
            h.remove()
    # the untiled calls convolve all 8 or 16 channels at once, the tiles' calls 3 at a time (2 for the rest)
    assert {3, 8, 16} <= set(convs) and set(convs) <= {2, 1, 3, 8, 16}
    assert PEG3D.channel_slice is None
    sliced = [shape[0] for shape in calls if len(shape) == 2]  # the untiled calls see (B, T, H, W, D)
    assert max(sliced) == 7 and min(sliced) < 7 and len(sliced) > 4  # 7-token slices, a shorter last one
    assert all("token_slice" not in m.__dict__ for m in nafs) and NAF.token_slice is None  # restored
    assert all("channel_slice" not in m.__dict__ for m in shallow.modules())


@pytest.mark.parametrize("residual", [False, True])
def test_naf_feed_forward_in_slices_equals_whole(residual):
    from leanvae.modules import NAF, ResNAF

    torch.manual_seed(0)
    naf = (ResNAF if residual else NAF)(num_layer=1, dim=16).eval()
    x = torch.randn(2, 3, 5, 7, 16).permute(0, 1, 3, 2, 4)  # non-contiguous, as a conv's output is
    with torch.no_grad():
        whole = naf.feed_forward(0, x, residual=residual)
        naf.token_slice = 9
        sliced = naf.feed_forward(0, x, residual=residual)
        with torch.enable_grad():  # with autograd the slices are not used (one graph for the whole input)
            graph = naf.feed_forward(0, x.requires_grad_(), residual=residual)
    assert sliced.shape == whole.shape == x.shape
    assert _rel(sliced, whole) <= REL and _rel(graph, whole) <= REL


def test_conv_in_channel_slices_equals_whole():
    from leanvae.modules import PEG3D

    torch.manual_seed(0)
    peg = PEG3D(20).eval()
    x = torch.randn(2, 4, 6, 5, 20)
    with torch.no_grad():
        whole = peg(x)
        peg.channel_slice = 8  # slices of 8, 8 and 4 channels
        sliced = peg(x)
        with torch.enable_grad():  # with autograd the slices are not used
            graph = peg(x.requires_grad_())
    assert sliced.shape == whole.shape and _rel(sliced, whole) <= REL and _rel(graph, whole) <= REL


def test_image_tiles_equal_untiled(shallow):
    x = _clip(1, 32, 48)[:, :, 0]
    shallow.set_tile_inference(True)
    _check_tiled(shallow, x, (16, 16))  # an image switches temporal tiling off, as the untiled call does


def test_temporal_switch_is_kept_on_video(shallow):
    shallow.set_tile_inference(True)
    shallow.enable_tiling(8, 16)
    try:
        with torch.no_grad():
            shallow.decode(shallow.encode(_clip(5, 16, 32)))
        assert shallow.tile_inference is True
        assert all(m.tile_inference for m in shallow.modules() if hasattr(m, "tile_inference"))
    finally:
        shallow.disable_tiling()
        shallow.set_tile_inference(False)


@pytest.mark.parametrize("what", ["encode", "decode", "decoder"])
def test_a_halo_one_token_short_is_wrong(shallow, what, monkeypatch):
    # "decoder": the tile's halo is whole, but the bottleneck's output is cropped one token too close to the
    # tile for the decoder's own reach
    x = _clip(5, 24, 80)
    with torch.no_grad():
        z0 = shallow.encode(x)
        ref = z0 if what == "encode" else shallow.decode(z0)
    rf = tiling.receptive_field(shallow)
    short = lambda reach: tuple((b - 1, a - 1) for b, a in reach)  # noqa: E731
    cut = tiling.ReceptiveField(rf.scale, short(rf.encode) if what == "encode" else rf.encode,
                                short(rf.decode) if what == "decode" else rf.decode,
                                short(rf.decoder) if what == "decoder" else rf.decoder)
    monkeypatch.setattr(tiling, "receptive_field", lambda model, refresh=False: cut)
    shallow.enable_tiling(8, 8)
    try:
        with torch.no_grad():
            out = shallow.encode(x) if what == "encode" else shallow.decode(z0)
    finally:
        shallow.disable_tiling()
    assert _rel(out, ref) > 100 * REL


def test_bad_tile_sizes_name_the_argument_and_the_smallest(shallow):
    for h, w, name in [(12, 8, "tile_sample_min_height"), (8, 4, "tile_sample_min_width"),
                       (0, 8, "tile_sample_min_height"), (-8, 8, "tile_sample_min_height")]:
        with pytest.raises(ValueError, match=f"{name} must be a multiple of 8 pixels .*the smallest allowed is 8"):
            shallow.enable_tiling(h, w)
    for bad in (8.0, True, "8"):
        with pytest.raises(TypeError, match="tile_sample_min_width must be an int"):
            shallow.enable_tiling(8, bad)
    assert not shallow.use_tiling


def test_enable_defaults_and_disable():
    m = _model(SHALLOW)
    assert not m.use_tiling
    m.enable_tiling()
    assert m.use_tiling and (m.tile_sample_min_height, m.tile_sample_min_width) == (256, 256)
    m.enable_tiling(tile_sample_min_width=64)
    assert (m.tile_sample_min_height, m.tile_sample_min_width) == (256, 64)
    m.disable_tiling()
    assert not m.use_tiling
    assert "use_tiling" not in str(m.state_dict().keys())


def test_tile_spans_cover_evenly():
    assert tiling.tile_spans(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert tiling.tile_spans(12, 5) == [(0, 4), (4, 8), (8, 12)]
    assert tiling.tile_spans(4, 8) == [(0, 4)]


def test_encode_dataset_rejects_bad_tile_sizes(tmp_path):
    from leanvae.encode import encode_dataset

    with pytest.raises(ValueError, match=r"tile_size must be \(H, W\), multiples of 8 pixels; the smallest allowed is \(8, 8\)"):
        encode_dataset([str(tmp_path)], str(tmp_path / "out"), "missing.ckpt", tile_size=(12, 8))
    with pytest.raises(ValueError, match="tile_size cannot be combined with whole"):
        encode_dataset([str(tmp_path)], str(tmp_path / "out"), "missing.ckpt", tile_size=(8, 8), whole=True)


def test_reconstruct_tile_size_option(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV (the [video] extra) is not installed")
    import numpy as np

    from leanvae.cli import main
    from leanvae.video import write_video

    ckpt = tmp_path / "tiny.ckpt"
    _model(SHALLOW).save_checkpoint(str(ckpt))
    t, y, x = np.meshgrid(np.arange(5), np.arange(16), np.arange(32), indexing="ij")
    clip = (127 + 100 * np.sin(0.3 * x + 0.2 * y + 0.5 * t))[..., None].repeat(3, -1).astype(np.uint8)
    write_video(str(tmp_path / "in.mp4"), clip, fps=8)
    psnr = []
    for extra in ([], ["--tile-size", "8x16"]):
        assert main(["reconstruct", str(tmp_path / "in.mp4"), str(tmp_path / "out.mp4"), "--checkpoint", str(ckpt)]
                    + extra) == 0
        psnr.append(capsys.readouterr().out.split("PSNR ")[1].split(" dB")[0])
    assert psnr[0] == psnr[1]  # the same reconstruction to the printed precision
    assert main(["reconstruct", str(tmp_path / "in.mp4"), str(tmp_path / "o.mp4"), "--checkpoint", str(ckpt),
                 "--tile-size", "12x16"]) == 2
    err = capsys.readouterr().err
    assert "--tile-size 12x16" in err and "tile_sample_min_height must be a multiple of 8" in err


def test_encode_dataset_with_tile_size_stores_the_untiled_latents(tmp_path):
    pytest.importorskip("av", reason="PyAV (the [encode] extra) is not installed")
    pytest.importorskip("safetensors", reason="safetensors (the [encode] extra) is not installed")
    import numpy as np

    from leanvae.encode import encode_dataset, load_latent, read_index
    from leanvae.video import write_video

    ckpt = tmp_path / "tiny.ckpt"
    _model(SHALLOW).save_checkpoint(str(ckpt))
    t, y, x = np.meshgrid(np.arange(5), np.arange(24), np.arange(40), indexing="ij")
    clip = (127 + 100 * np.sin(0.3 * x + 0.2 * y + 0.5 * t))[..., None].repeat(3, -1).astype(np.uint8)
    (tmp_path / "videos").mkdir()
    write_video(str(tmp_path / "videos" / "a.mp4"), clip, fps=8)
    latents = []
    for name, tile in (("plain", None), ("tiled", (8, 16))):
        out = str(tmp_path / name)
        encode_dataset([str(tmp_path / "videos")], out, str(ckpt), frames=5, fused=False, tile_size=tile,
                       workers=0, quiet=True)
        (rec,) = read_index(out)
        latents.append(load_latent(out, rec))
    assert latents[0].shape == (4, 2, 3, 5)
    assert _rel(latents[1], latents[0]) <= REL
