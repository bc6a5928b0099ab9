"""leanvae.diffusers.AutoencoderLeanVAE: the reference model behind diffusers' autoencoder interface.

Parity with the plain model on the same weights (each variant), save/load, slicing, tiling, torch_dtype,
the fused-kernel switch, published checkpoints (from_pretrained and `python -m leanvae convert`), and a
real client: diffusers' WanPipeline generating frames through it, normalising the latent exactly once.
Everything runs offline on tiny random models.
"""
import argparse
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers (the [diffusers] extra) is not installed")

import leanvae  # noqa: E402
from leanvae.cli import main  # noqa: E402
from leanvae.diffusers import AutoencoderLeanVAE  # noqa: E402
from leanvae.model import WAN_LATENT_STATS  # noqa: E402
from helpers import ROOT  # noqa: E402
from test_published_parity import seeded_weights  # noqa: E402

TINY = dict(embedding_dim=32, l_dim=8, h_dim=24, sep_num_layer=1, fusion_num_layer=1, ista_iter_num=1,
            ista_layer_num=1, chunksize_enc=5, chunksize_dec=2)
LATENT = {"original": 4, "wan2.1": 16, "wan2.2": 48}
# float32 rounding bound, relative to the output's largest value. The diffusers class runs the plain
# model's operations in the same order; the only extra arithmetic is exact ([-1, 1] <-> [-0.5, 0.5] is a
# power of two) or one normalisation round trip of the latent, (z - m) * (1/s) then * s + m, a few float32
# ulps of the latent's scale that the decoder carries through its ~20 layers (measured: <= 3e-7).
# A real difference (a wrong range, a missing or doubled normalisation) moves outputs by 1e-2 or more.
BOUND = 1e-5


def public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def plain(variant, seed=1234, **cfg):
    """A plain LeanVAE of `variant` on the tiny config with seeded, non-trivial weights."""
    model = leanvae.LeanVAE(leanvae.make_args(variant, **{**TINY, "latent_dim": LATENT[variant], **cfg})).eval()
    model.load_state_dict(seeded_weights(model, seed), strict=True)
    return model


def video(b=2, t=5, h=16, w=24, seed=5):
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def stats(variant):
    return (torch.tensor(v).view(1, -1, 1, 1, 1) for v in WAN_LATENT_STATS[variant])


# ----------------------------------------------------------------------------------- the interface
@pytest.mark.parametrize("variant", ["original", "wan2.1", "wan2.2"])
def test_matches_the_plain_model(variant):
    ref = plain(variant)
    vae = AutoencoderLeanVAE.from_leanvae(ref).eval()
    x = video()
    with torch.no_grad():
        out = vae.encode(x)
        dist = out.latent_dist
        z = dist.mode()
        assert torch.equal(dist.sample(torch.Generator().manual_seed(0)), z) and torch.equal(dist.mean, z)
        assert torch.equal(vae.encode(x, return_dict=False)[0].mode(), z)
        assert z.shape == (2, LATENT[variant], 2, 2, 3)
        y = vae.decode(z).sample
        assert torch.equal(vae.decode(z, return_dict=False)[0], y)
        assert y.shape == x.shape
        if variant == "original":
            # The plain model's pixels are in [-0.5, 0.5]: both maps are exact powers of two.
            assert torch.equal(z, ref.encode(x / 2))
            assert torch.equal(y, 2 * ref.decode(z))
        else:
            # The plain Wan model normalises inside; ours returns the Wan VAE's own space, as
            # WanPipeline expects: compare through the published normalisation formulas.
            mean, std = stats(variant)
            z_plain = ref.encode(x)
            assert rel(z, z_plain * std + mean) <= BOUND
            assert rel((z - mean) * (1.0 / std), z_plain) <= BOUND
            assert rel(y, ref.decode(z_plain)) <= BOUND
            assert rel(vae.decode(z_plain * std + mean).sample, ref.decode(z_plain)) <= BOUND
            # ... and not the plain model's normalised latent (the test would see a double normalisation).
            assert rel(z, z_plain) > 100 * BOUND


def test_config_describes_the_latent_space():
    for variant in ("original", "wan2.1", "wan2.2"):
        c = AutoencoderLeanVAE(model_variant=variant, **TINY).config
        d = LATENT[variant]
        assert (c.z_dim, c.latent_dim, c.scale_factor_temporal, c.scale_factor_spatial) == (d, d, 4, 8)
        assert len(c.latents_mean) == len(c.latents_std) == d
        if variant == "original":
            assert c.latents_mean == [0.0] * d and c.latents_std == [1.0] * d
        else:
            assert (c.latents_mean, c.latents_std) == tuple(WAN_LATENT_STATS[variant])
        assert all(c[k] == TINY[k] for k in TINY)


def test_save_load_round_trip_is_bitwise(tmp_path):
    vae = AutoencoderLeanVAE.from_leanvae(plain("wan2.2")).eval()
    vae.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = AutoencoderLeanVAE.from_pretrained(tmp_path).eval()
    assert public(loaded.config) == public(vae.config)
    x = video(b=1)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        assert torch.equal(loaded.encode(x).latent_dist.mode(), z)
        assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)


def test_torch_dtype_is_honoured(tmp_path):
    vae = AutoencoderLeanVAE.from_leanvae(plain("wan2.1")).eval()
    vae.save_pretrained(tmp_path)
    half = AutoencoderLeanVAE.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    # Every parameter, including the bottleneck's phi and Q that the model makes as float32 from numpy.
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.dtype == torch.bfloat16
    x = video(b=1)
    with torch.no_grad():
        z = half.encode(x.bfloat16()).latent_dist.mode()
        y = half.decode(z).sample
        z32 = vae.encode(x).latent_dist.mode()
    assert z.dtype == y.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits (relative step 2^-8 = 3.9e-3); through the encoder's ~10 layers
    # the latent stays within a few steps of the float32 one (measured 6e-3); 5e-2 still catches a
    # wrong scale or layout, which is off by order 1.
    assert rel(z.float(), z32) < 5e-2


def test_slicing_splits_the_batch_only():
    vae = AutoencoderLeanVAE.from_leanvae(plain("original")).eval()
    x = video(b=3)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
        vae.enable_slicing()
        assert vae.use_slicing
        zs = vae.encode(x).latent_dist.mode()
        ys = vae.decode(z).sample
        vae.disable_slicing()
    # One element per call: the GEMMs see fewer rows, which may change float32 summation blocking.
    assert rel(zs, z) <= BOUND and rel(ys, y) <= BOUND
    assert not vae.use_slicing


def test_one_frame_and_images():
    vae = AutoencoderLeanVAE.from_leanvae(plain("wan2.1", use_tile_inference=True)).eval()
    x = video(b=1, t=1)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        assert z.shape == (1, 16, 1, 2, 3)
        y = vae.decode(z).sample
        assert y.shape == x.shape
        assert torch.equal(vae.encode(x[:, :, 0]).latent_dist.mode(), z)
        # the plain model turns its temporal chunking off on images (as published); the wrapper keeps it
        assert vae.model.tile_inference
        ref = vae.model.decode(z, is_image=True, scale_latent=False)
        assert torch.equal(y[:, :, 0], ref)


def test_use_fused_kernels_switches_it():
    vae = AutoencoderLeanVAE.from_leanvae(plain("wan2.1")).eval()
    x = video(b=1)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
        handle = leanvae.use_fused_kernels(vae, backend="cpu")
        try:
            assert handle.replaced, "nothing switched"
            zf = vae.encode(x).latent_dist.mode()
            yf = vae.decode(z).sample
        finally:
            handle.revert()
        assert torch.equal(vae.encode(x).latent_dist.mode(), z)
    # the fused model's bound against the reference (tests/test_use_fused_kernels.py)
    assert rel(zf, z) < 1e-4 and rel(yf, y) < 1e-4


def test_tiling_forwards_to_the_plain_model():
    vae = AutoencoderLeanVAE.from_leanvae(plain("wan2.1")).eval()
    x = video(b=1, h=64, w=96)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
        vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32)
        assert vae.use_tiling and vae.model.use_tiling and vae.model.tile_sample_min_height == 32
        zt = vae.encode(x).latent_dist.mode()
        yt = vae.decode(z).sample
        vae.disable_tiling()
        assert not vae.use_tiling and not vae.model.use_tiling
    # exact tiling: equal to untiled up to float32 GEMM rounding (the tiles see fewer tokens per GEMM),
    # and the Wan latent stays in the Wan VAE's own space (normalised nowhere, not once per tile)
    assert rel(zt, z) <= BOUND and rel(yt, y) <= BOUND


# ---------------------------------------------------------------------------- published checkpoints
def test_from_pretrained_and_convert_a_published_checkpoint(tmp_path, capsys):
    ref = plain("wan2.1")
    ckpt = tmp_path / "wan21.ckpt"
    # the published branches' format: {"args", "state_dict"}, args without a variant
    torch.save({"args": {k: v for k, v in vars(ref.args).items() if k != "variant"}, "state_dict": ref.state_dict()}, ckpt)
    x = video(b=1)
    expected = AutoencoderLeanVAE.from_leanvae(ref).eval()
    with torch.no_grad():
        z = expected.encode(x).latent_dist.mode()
        vae = AutoencoderLeanVAE.from_pretrained(str(ckpt), model_variant="wan2.1")
        assert vae.config.model_variant == "wan2.1" and not vae.training
        assert torch.equal(vae.encode(x).latent_dist.mode(), z)
        out = tmp_path / "converted"
        assert main(["convert", str(ckpt), str(out), "--variant", "wan2.1"]) == 0
        printed = capsys.readouterr().out
        assert "wrote" in printed and "variant wan2.1" in printed
        converted = AutoencoderLeanVAE.from_pretrained(str(out))
        assert public(converted.config) == public(vae.config)
        assert torch.equal(converted.encode(x).latent_dist.mode(), z)
        assert torch.equal(converted.decode(z).sample, expected.decode(z).sample)


def test_convert_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    small = plain("original")
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"args": dict(vars(small.args), latent_dim=8), "state_dict": small.state_dict()}, wrong)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    cases = [
        ([str(tmp_path / "missing.ckpt"), str(tmp_path / "o1")], "not found"),
        ([str(bad), str(tmp_path / "o2")], "not a readable torch checkpoint"),
        ([str(wrong), str(tmp_path / "o3")], "of the wrong shape"),
        ([str(bad), str(busy)], "--overwrite"),
    ]
    for argv, needle in cases:
        # in process (a subprocess per case would import torch and diffusers again): an exception would
        # escape main() here, so a return code 2 with one line means no traceback from the command either
        assert main(["convert", *argv]) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("leanvae convert:") and needle in lines[0], err
    with pytest.raises(ValueError, match="not found"):
        AutoencoderLeanVAE.from_pretrained(str(tmp_path / "missing.ckpt"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model_variant="wan3"), "model_variant must be one of"),
        (dict(model_variant="wan2.1", latents_mean=[0.0] * 16), "latents_mean for model_variant 'wan2.1' is fixed"),
        (dict(model_variant="original", z_dim=8), "z_dim must equal latent_dim"),
        (dict(scale_factor_spatial=16), "fixed at 4 and 8"),
        (dict(model_variant="wan2.1", latent_dim=4), "latent_dim 16"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderLeanVAE(**{**TINY, **kwargs})


def test_bad_inputs():
    vae = AutoencoderLeanVAE(**TINY)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        vae.encode([1, 2])
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        vae.decode(None)
    with pytest.raises(ValueError, match="H and W must be positive multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))


def test_import_leanvae_does_not_import_diffusers():
    code = ("import sys, leanvae, leanvae.cli, leanvae.loading; leanvae.LeanVAE.from_config('wan2.1', embedding_dim=32, "
            "l_dim=8, h_dim=24); leanvae.cli.build_parser(); print('diffusers' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert run.stdout.strip() == "False", run.stderr


# ------------------------------------------------------------------------------ a real client: Wan
def tiny_wan_pipeline(vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=vae.config.z_dim,
        out_channels=vae.config.z_dim, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    ).eval()
    # No tokenizer or text encoder (nothing to download): the prompt is given as embeddings.
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, **kw):
    emb = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3))
    return pipe(prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb), height=16, width=32, num_frames=5,
                num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                max_sequence_length=8, **kw)


def test_wan_pipeline_generates_frames_end_to_end():
    vae = AutoencoderLeanVAE.from_leanvae(plain("wan2.1")).eval()
    pipe = tiny_wan_pipeline(vae)
    frames = run_pipeline(pipe, output_type="pt").frames
    assert frames.shape == (1, 5, 3, 16, 32)  # (batch, frames, channels, H, W), values in [0, 1]
    assert torch.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1 and frames.std() > 0
    frames_np = run_pipeline(pipe, output_type="np").frames
    assert frames_np.shape == (1, 5, 16, 32, 3)


def test_wan_pipeline_normalises_the_latent_exactly_once():
    """WanPipeline denoises in Wan's normalised space and un-normalises with vae.config before vae.decode.

    A spy on decode records what it receives; the denoised latent comes from the last step's callback.
    What decode receives must be the denoised latent un-normalised once (z * std + mean), and the frames
    must be what the plain wan2.1 model (which un-normalises inside its decode, as published) makes of the
    denoised latent: with a double (or missing) normalisation they differ by order 1.
    """
    ref = plain("wan2.1")
    vae = AutoencoderLeanVAE.from_leanvae(ref).eval()
    pipe = tiny_wan_pipeline(vae)
    seen, made, denoised = [], [], []
    decode = vae.decode

    def spy(z, *args, **kwargs):
        seen.append(z.detach().clone())
        out = decode(z, *args, **kwargs)
        made.append((out[0] if isinstance(out, tuple) else out.sample).detach().clone())
        return out

    vae.decode = spy

    def last_latents(pipe_, step, timestep, kwargs):
        denoised[:] = [kwargs["latents"].detach().clone()]
        return {}

    run_pipeline(pipe, output_type="pt", callback_on_step_end=last_latents)
    assert len(seen) == 1 and len(denoised) == 1
    z_n = denoised[0]
    mean, std = stats("wan2.1")
    assert rel(seen[0], z_n * std + mean) <= 1e-6  # one un-normalisation (the pipeline divides by 1/std)
    with torch.no_grad():
        expected = ref.decode(z_n)  # the published wan2.1 decode of the normalised latent
    assert rel(made[0], expected) <= BOUND
    assert rel(made[0], ref.decode(z_n * std + mean)) > 100 * BOUND  # what a double normalisation gives
