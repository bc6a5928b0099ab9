"""The reference LeanVAE: structure, tiled inference, checkpoints and bad input."""
import argparse
import json
import os

import pytest
import torch
from helpers import DATA

import leanvae



def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = leanvae.LeanVAE.from_config().eval()
    with torch.no_grad():  # make the bottleneck thresholds and steps non-trivial
        for p in m.latent_bottleneck.threshold:
            p.fill_(0.02)
    return m


@pytest.mark.parametrize("latent_dim", [4, 16])
def test_state_dict_matches_published_keys_and_shapes(latent_dim):
    with open(os.path.join(DATA, "published_default_keys.json")) as f:
        expected = json.load(f)["state_dict"][f"latent_dim={latent_dim}"]
    ours = [[k, list(v.shape)] for k, v in leanvae.LeanVAE.from_config(latent_dim=latent_dim).state_dict().items()]
    assert ours == expected
    assert sum(p.numel() for p in leanvae.LeanVAE.from_config(latent_dim=latent_dim).parameters()) > 39_000_000


def test_reference_model_does_not_import_kernels():
    import subprocess
    import sys

    code = "import sys, leanvae; m = leanvae.LeanVAE.from_config(); print('leanvae_kernels' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("chunk", [5, 9, 13])
def test_tiled_encode_matches_untiled(model, chunk):
    x = torch.rand(1, 3, 17, 32, 32) - 0.5
    with torch.no_grad():
        model.set_tile_inference(False)
        z = model.encode(x)
        model.set_tile_inference(True)
        model.chunksize_enc = chunk
        zt = model.encode(x)
        model.set_tile_inference(False)
    assert zt.shape == z.shape == (1, 4, 5, 4, 4)
    assert rel_err(zt, z) < 1e-5  # float32 rounding: GEMM blocking changes with the token count


@pytest.mark.parametrize("chunk", [2, 3, 4, 5])
def test_tiled_decode_matches_untiled(model, chunk):
    z = torch.randn(1, 4, 5, 4, 4)
    with torch.no_grad():
        model.set_tile_inference(False)
        x = model.decode(z)
        model.set_tile_inference(True)
        model.chunksize_dec = chunk
        xt = model.decode(z)
        model.set_tile_inference(False)
    assert xt.shape == x.shape == (1, 3, 17, 32, 32)
    assert rel_err(xt, x) < 1e-5


def test_chunk_larger_than_clip_runs_as_one_chunk(model):
    """The published code raises UnboundLocalError here; we run one chunk, equal to untiled."""
    x = torch.rand(1, 3, 5, 16, 16) - 0.5
    with torch.no_grad():
        z = model.encode(x)
        xr = model.decode(z)
        model.set_tile_inference(True)
        model.chunksize_enc, model.chunksize_dec = 9, 5
        assert model._build_chunk_index(5, "enc") == [(0, 5)]
        assert model._build_chunk_index(2, "dec") == [(0, 2)]
        torch.testing.assert_close(model.encode(x), z, rtol=0, atol=0)
        torch.testing.assert_close(model.decode(z), xr, rtol=0, atol=0)
        model.set_tile_inference(False)


def test_chunk_index_matches_published_schedule(model):
    model.chunksize_enc, model.chunksize_dec = 5, 2
    assert model._build_chunk_index(17, "enc") == [(0, 5), (5, 9), (9, 13), (13, 17)]
    assert model._build_chunk_index(5, "dec") == [(0, 2), (2, 3), (3, 4), (4, 5)]
    model.chunksize_enc = 6
    with pytest.raises(ValueError, match="chunksize_enc must be 1\\+4k"):
        model._build_chunk_index(17, "enc")
    model.chunksize_enc, model.chunksize_dec = 5, 1
    with pytest.raises(ValueError, match="chunksize_dec must be at least 2"):
        model._build_chunk_index(5, "dec")
    model.chunksize_dec = 5


def test_shapes_image_and_video(model):
    with torch.no_grad():
        img = torch.rand(2, 3, 24, 40) - 0.5
        x, rec = model.inference(img)
        assert x.shape == rec.shape == img.shape
        vid = torch.rand(1, 3, 9, 16, 24) - 0.5
        z = model.encode(vid)
        assert z.shape == (1, 4, 3, 2, 3)
        assert model.decode(z).shape == vid.shape
        out = model(vid)
        assert out[1].shape == vid.shape and len(out) == 5


def test_checkpoint_round_trip_strict(tmp_path, model):
    path = tmp_path / "leanvae.ckpt"
    # The published format, with training options in args as the released checkpoints carry them.
    torch.save({"args": {**vars(model.args), "lr": 1e-4, "batch_size": 8}, "state_dict": model.state_dict()}, path)
    loaded = leanvae.LeanVAE.load_from_checkpoint(str(path), strict=True).eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(1, 3, 5, 16, 16) - 0.5
    with torch.no_grad():
        torch.testing.assert_close(loaded.inference(x)[1], model.inference(x)[1], rtol=0, atol=0)
    path2 = tmp_path / "again.ckpt"
    loaded.save_checkpoint(str(path2))
    assert leanvae.LeanVAE.load_from_checkpoint(str(path2)).args.latent_dim == 4


def test_checkpoint_of_16_channels_loads_strict(tmp_path):
    m = leanvae.LeanVAE.from_config(latent_dim=16)
    path = tmp_path / "c16.ckpt"
    m.save_checkpoint(str(path))
    assert leanvae.LeanVAE.load_from_checkpoint(str(path)).latent_bottleneck.phi.shape == (16, 512)


def test_bad_checkpoints(tmp_path):
    p = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, p)
    with pytest.raises(ValueError, match="not a LeanVAE checkpoint"):
        leanvae.LeanVAE.load_from_checkpoint(str(p))
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        leanvae.LeanVAE.load_from_checkpoint(str(p))
    with pytest.raises(FileNotFoundError):
        leanvae.LeanVAE.load_from_checkpoint(str(tmp_path / "missing.ckpt"))
    wrong = leanvae.LeanVAE.from_config(latent_dim=16)
    torch.save({"args": {"latent_dim": 4}, "state_dict": wrong.state_dict()}, p)
    with pytest.raises(RuntimeError, match="size mismatch"):
        leanvae.LeanVAE.load_from_checkpoint(str(p))


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: torch.rand(1, 3, 16, 16, 16, 1), ValueError, "image .* or a video"),
        (lambda: torch.rand(3, 16, 16), ValueError, "image .* or a video"),
        (lambda: torch.rand(1, 4, 5, 16, 16), ValueError, "3 channels"),
        (lambda: torch.rand(1, 3, 6, 16, 16), ValueError, "1\\+4k frames"),
        (lambda: torch.rand(1, 3, 5, 12, 16), ValueError, "multiples of 8"),
        (lambda: torch.rand(1, 3, 5, 16, 20), ValueError, "multiples of 8"),
        (lambda: torch.rand(1, 3, 5, 16, 16, dtype=torch.float64), TypeError, "dtype torch.float64 but the model"),
        (lambda: torch.zeros(1, 3, 5, 16, 16, dtype=torch.int64), TypeError, "floating-point"),
        (lambda: [1, 2, 3], TypeError, "must be a torch.Tensor"),
    ],
    ids=["rank6", "rank3", "channels", "frames", "H", "W", "dtype", "int", "list"],
)
def test_bad_input_encode(model, make, err, match):
    with pytest.raises(err, match=match):
        model.encode(make())
    with pytest.raises(err, match=match):
        model.inference(make())


def test_bad_input_decode_and_forward(model):
    with pytest.raises(ValueError, match=r"z must be \(B, 4, T, H/8, W/8\)"):
        model.decode(torch.randn(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match=r"z must be"):
        model.decode(torch.randn(4, 2, 4, 4))
    with pytest.raises(ValueError, match="one latent frame"):
        model.decode(torch.randn(1, 4, 2, 4, 4), is_image=True)
    with pytest.raises(ValueError, match="k >= 1"):
        model(torch.rand(1, 3, 1, 16, 16))
    with pytest.raises(TypeError, match="unknown argument"):
        leanvae.make_args(latent=4)


def test_bad_input_device(model):
    # The meta device stands in for "another device" on machines without a GPU.
    with pytest.raises(ValueError, match="is on meta but the model is on cpu"):
        model.encode(torch.empty(1, 3, 5, 16, 16, device="meta"))
    with pytest.raises(ValueError, match="is on meta"):
        model.decode(torch.empty(1, 4, 2, 2, 2, device="meta"))


def test_autocast_allows_other_dtypes(model):
    x = torch.rand(1, 3, 5, 16, 16).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.encode(x).shape == (1, 4, 2, 2, 2)
