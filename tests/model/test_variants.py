"""The Wan-aligned variants of the reference model against the published branches that define them.

westlake-repl/LeanVAE has two branches that train LeanVAE as a stand-in for the Wan VAEs:
`align-wan-2-1` (commit be760f7, variant "wan2.1") and `align-wan-2-2` (commit 2e69a97, variant "wan2.2").
Their model is the main branch's with a fixed latent width (16 / 48), inputs in [-1, 1] and a
`LatentScaler` (Wan's per-channel mean and std) at the end of `encode` and the start of `decode`.

Checked two ways, as tests/test_published_parity.py does for the main branch:
- Always: golden fixtures tests/data/published_wan21_golden.pt and published_wan22_golden.pt. Each was made
  by importing that branch's `LeanVAE/models/autoencoder.py` LeanVAE with `load_published` (from
  test_published_parity), building it on the fixture's "config" (an argparse.Namespace of it), loading
  `seeded_weights(model)` (seed 1234) strictly, running `run_variant(model)` from this file on CPU in
  float32, and saving {"config", "weights_sha256": checksum(weights), "outputs"} with torch.save. The
  weights are regenerated here from the seed and their checksum compared, so a changed torch RNG fails
  loudly instead of comparing different models.
- When LEANVAE_PUBLISHED_WAN21_SRC / LEANVAE_PUBLISHED_WAN22_SRC point at checkouts of those branches:
  the branch's classes are imported and compared live, bit for bit, on its default configuration.
"""
import argparse
import os
import sys

import pytest
import torch

import leanvae
from leanvae.model import WAN_LATENT_STATS
from test_published_parity import IMAGE_SHAPE, assert_matches_golden, SMALL, VIDEO_SHAPES, checksum, load_published, seeded_weights

from helpers import DATA  # noqa: E402
FIXTURES = {"wan2.1": os.path.join(DATA, "published_wan21_golden.pt"), "wan2.2": os.path.join(DATA, "published_wan22_golden.pt")}
CONFIGS = {"wan2.1": dict(SMALL, latent_dim=16), "wan2.2": dict(SMALL, embedding_dim=64, l_dim=16, h_dim=48, latent_dim=48)}
LIVE_SRC = {"wan2.1": os.environ.get("LEANVAE_PUBLISHED_WAN21_SRC"), "wan2.2": os.environ.get("LEANVAE_PUBLISHED_WAN22_SRC")}


def wan_inputs():
    """Videos and an image in [-1, 1], the Wan variants' input range."""
    g = torch.Generator().manual_seed(99)
    videos = [torch.rand(s, generator=g) * 2 - 1 for s in VIDEO_SHAPES]
    image = torch.rand(IMAGE_SHAPE, generator=g) * 2 - 1
    return videos, image


def run_variant(model):
    """Every public path of a Wan-variant model (ours or the branch's) on the fixture inputs.

    (`inference` is left out: it is `decode(encode(x))`, both covered.)
    """
    videos, image = wan_inputs()
    out = {}
    with torch.no_grad():
        for i, x in enumerate(videos):
            z = model.encode(x.clone())
            out[f"video{i}.encode"] = z
            out[f"video{i}.decode"] = model.decode(z.clone())
            torch.manual_seed(7)  # wan2.2's training pass samples the posterior
            fwd = model(x.clone())
            out[f"video{i}.forward.recon"] = fwd[1]
            out[f"video{i}.forward.latent"] = fwd[2]
            model.set_tile_inference(True)
            zt = model.encode(x.clone())
            out[f"video{i}.tiled.encode"] = zt
            out[f"video{i}.tiled.decode"] = model.decode(zt.clone())
            model.set_tile_inference(False)
        zi = model.encode(image.clone())
        out["image.encode"] = zi
        out["image.decode"] = model.decode(zi.clone(), is_image=True)
    return out


def load_branch(src):
    """The LeanVAE class of the published checkout `src`, imported afresh (another branch may be loaded)."""
    for name in [n for n in sys.modules if n == "LeanVAE" or n.startswith("LeanVAE.")]:
        del sys.modules[name]
    return load_published(src)


def ours_with_seeded_weights(variant, config):
    model = leanvae.LeanVAE(argparse.Namespace(**config), variant=variant).eval()
    sd = seeded_weights(model)
    model.load_state_dict(sd, strict=True)
    return model, sd


@pytest.mark.parametrize("variant", ["wan2.1", "wan2.2"])
def test_golden_fixture_matches_branch_outputs(variant):
    fixture = torch.load(FIXTURES[variant], weights_only=True)
    assert fixture["config"] == CONFIGS[variant]
    model, sd = ours_with_seeded_weights(variant, fixture["config"])
    assert checksum(sd) == fixture["weights_sha256"], (
        "seeded weights differ from those the fixture was made with (torch RNG changed?); regenerate the fixture"
    )
    ours = run_variant(model)
    assert_matches_golden(ours, fixture["outputs"])  # relative to each output's scale


@pytest.mark.parametrize("variant", ["wan2.1", "wan2.2"])
def test_golden_fixture_fails_without_the_latent_scaler(variant):
    """The fixture pins the scaler: the same weights with the original variant's plain latent differ."""
    fixture = torch.load(FIXTURES[variant], weights_only=True)
    model, _ = ours_with_seeded_weights(variant, fixture["config"])
    x = wan_inputs()[0][0]
    with torch.no_grad():
        raw = model.encode(x.clone(), scale_latent=False)
    expected = fixture["outputs"]["video0.encode"]
    assert (raw - expected).abs().max().item() > 0.1 * expected.abs().max().item()


@pytest.mark.parametrize("variant", ["wan2.1", "wan2.2"])
def test_scale_latent_false_is_the_wan_space(variant):
    """encode(scale_latent=False) is the published encode with the scaler undone; decode likewise."""
    model, _ = ours_with_seeded_weights(variant, CONFIGS[variant])
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in WAN_LATENT_STATS[variant])
    x = wan_inputs()[0][1]
    with torch.no_grad():
        z_raw = model.encode(x, scale_latent=False)
        z = model.encode(x)
        assert torch.equal(z, (z_raw - mean) * (1.0 / std))  # the published expression, bit for bit
        assert torch.equal(model.decode(z), model.decode(z * std + mean, scale_latent=False))


def test_spatial_tiling_normalises_once():
    """Tiled encode/decode of a Wan variant equals untiled (tiling's float32 bound, 1e-6 of the output's
    scale) in both latent spaces: the scaler runs once, in the outermost call, never per tile. (One
    variant: wan2.2 differs only in the statistics; the receptive-field probe costs seconds per config.)"""
    model, _ = ours_with_seeded_weights("wan2.1", CONFIGS["wan2.1"])
    x = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        want = {s: model.encode(x, scale_latent=s) for s in (True, False)}
        back = {s: model.decode(want[s], scale_latent=s) for s in (True, False)}
        model.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)
        try:
            for s in (True, False):
                z = model.encode(x, scale_latent=s)
                assert (z - want[s]).abs().max() <= 1e-6 * want[s].abs().max(), s
                y = model.decode(want[s], scale_latent=s)
                assert (y - back[s]).abs().max() <= 1e-6 * back[s].abs().max(), s
        finally:
            model.disable_tiling()


def test_variant_args_and_defaults():
    assert leanvae.LeanVAE.from_config("wan2.1", embedding_dim=32, l_dim=8, h_dim=24).args.latent_dim == 16
    m = leanvae.LeanVAE(argparse.Namespace(**CONFIGS["wan2.2"]), variant="wan2.2")
    assert (m.variant, m.args.variant, m.input_range) == ("wan2.2", "wan2.2", (-1.0, 1.0))
    assert leanvae.LeanVAE(argparse.Namespace(**SMALL)).variant == "original"
    assert leanvae.LeanVAE(argparse.Namespace(**SMALL)).input_range == (-0.5, 0.5)
    # The published wan2.1 constructor fixes latent_dim at 16 whatever args say (a checkpoint's args may
    # omit it); we do the same without writing to the caller's namespace.
    args = argparse.Namespace(**SMALL)
    assert leanvae.LeanVAE(args, variant="wan2.1").latent_bottleneck.phi.shape[0] == 16 and args.latent_dim == 4
    # Same modules and keys in every variant.
    keys = {v: [(k, tuple(t.shape)) for k, t in leanvae.LeanVAE(argparse.Namespace(**dict(SMALL, latent_dim=16)), variant=v).state_dict().items()]
            for v in ("original", "wan2.1")}
    assert keys["original"] == keys["wan2.1"]


def test_variant_checkpoint_round_trip(tmp_path):
    model, sd = ours_with_seeded_weights("wan2.2", CONFIGS["wan2.2"])
    path = tmp_path / "wan22.ckpt"
    model.save_checkpoint(str(path))
    loaded = leanvae.LeanVAE.load_from_checkpoint(str(path))
    assert loaded.variant == "wan2.2"
    x = wan_inputs()[0][1]
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: leanvae.LeanVAE(variant="wan2.3"), "variant must be one of 'original', 'wan2.1', 'wan2.2', got 'wan2.3'"),
        (lambda: leanvae.make_args("wan2.1", latent_dim=4), "variant 'wan2.1' has latent_dim 16, got latent_dim=4"),
        (lambda: leanvae.LeanVAE(argparse.Namespace(**SMALL), variant="wan2.2"), "variant 'wan2.2' needs latent_dim 48"),
        (lambda: leanvae.LeanVAE.from_config(variant=None), "variant must be one of"),
    ],
)
def test_bad_variant(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("variant", ["wan2.1", "wan2.2"])
def test_live_against_branch(variant):
    src = LIVE_SRC[variant]
    if not src:
        pytest.skip(f"set LEANVAE_PUBLISHED_{variant.upper().replace('.', '')}_SRC to a checkout of the published "
                    f"{'align-wan-2-1' if variant == 'wan2.1' else 'align-wan-2-2'} branch to compare live")
    Published = load_branch(src)
    args = leanvae.make_args(variant)
    pub = Published(argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "variant"})).eval()
    ours = leanvae.LeanVAE(args).eval()
    assert [(k, v.shape) for k, v in pub.state_dict().items()] == [(k, v.shape) for k, v in ours.state_dict().items()]
    sd = seeded_weights(pub)
    pub.load_state_dict(sd, strict=True)
    ours.load_state_dict(sd, strict=True)
    x = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        za, zb = ours.encode(x.clone()), pub.encode(x.clone())
        assert torch.equal(za, zb)
        assert torch.equal(ours.decode(za.clone()), pub.decode(zb.clone()))
        torch.manual_seed(3)
        a = ours(x.clone())
        torch.manual_seed(3)
        b = pub(x.clone())
        assert len(a) == len(b) == 3 and all(torch.equal(u, v) for u, v in zip(a, b))
