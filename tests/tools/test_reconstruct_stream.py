"""`reconstruct` streams: chunk by chunk through the model's causal caches, equal to the whole-clip call."""
import numpy as np
import pytest
import torch

import leanvae
from leanvae import streaming
from leanvae.cli import main
from leanvae.streaming import StreamingReconstruction

TINY = dict(embedding_dim=32, l_dim=8, h_dim=24, sep_num_layer=1, fusion_num_layer=1, ista_layer_num=1)


def rel_err(a, b):
    # the measure and bound of the model's tiling tests (tests/test_reference_model.py)
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = leanvae.LeanVAE.from_config(**TINY).eval()
    with torch.no_grad():
        for p in m.latent_bottleneck.threshold:
            p.fill_(0.02)
    return m


def _stream(model, x, pieces):
    rec = StreamingReconstruction(model)
    out, i = [], 0
    for n in pieces:
        out += rec.feed(x[:, :, i:i + n])
        i += n
    out += rec.feed(x[:, :, i:])
    out += rec.finish()
    return torch.cat(out, dim=2), rec


@pytest.mark.parametrize("frames", [1, 5, 9, 17, 21, 33])
def test_streamed_equals_whole_clip(model, frames):
    x = torch.rand(1, 3, frames + 3, 16, 24) - 0.5  # 3 extra frames: cut, as 1+4k requires
    clip = x[:, :, :frames]
    with torch.no_grad():
        whole = model.inference(clip if frames > 1 else clip[:, :, 0])[1]
        whole = whole if frames > 1 else whole.unsqueeze(2)
        model.set_tile_inference(True)
        tiled = model.decode(model.encode(clip)) if frames > 1 else whole
        model.set_tile_inference(False)
    y, rec = _stream(model, x, [2, 1, 6, 3])
    assert y.shape == whole.shape and rec.dropped == 3 and rec.frames_out == frames
    assert rel_err(y, whole) < 1e-5
    assert torch.equal(y, tiled)  # the same calls as the model's own tiled inference, in the same order
    assert not model.tile_inference  # restored


def test_streamed_equals_whole_clip_with_fused_kernels(model):
    x = torch.rand(1, 3, 25, 16, 16) - 0.5
    with leanvae.use_fused_kernels(model), torch.no_grad():
        whole = model.inference(x)[1]
        y, _ = _stream(model, x, [4, 4, 4])
    assert rel_err(y, whole) < 1e-5


@pytest.mark.parametrize("chunk_frames", [5, 13])
def test_streamed_with_other_chunk_sizes_equals_whole_clip(model, chunk_frames):
    x = torch.rand(1, 3, 29, 16, 16) - 0.5
    with torch.no_grad():
        whole = model.inference(x)[1]
    rec = StreamingReconstruction(model, chunk_frames=chunk_frames)
    out = [o for i in range(29) for o in rec.feed(x[:, :, i:i + 1])] + rec.finish()
    assert [o.shape[2] for o in out][0] == chunk_frames and max(o.shape[2] for o in out) == chunk_frames
    assert rel_err(torch.cat(out, dim=2), whole) < 1e-5
    for bad in (4, 6, 1, "5"):
        with pytest.raises(ValueError, match="chunk_frames must be 1\\+4k"):
            StreamingReconstruction(model, chunk_frames=bad)


def test_chunk_sizes_stay_fixed_as_the_clip_grows(model):
    """Peak memory proxy: the frames held at once (input, latent, output) do not depend on the clip's length."""
    def peaks(frames):
        rec = StreamingReconstruction(model)
        most_in = most_lat = most_out = 0
        x = torch.rand(1, 3, frames, 8, 8) - 0.5
        for i in range(frames):
            for out in rec.feed(x[:, :, i:i + 1]):
                most_out = max(most_out, out.shape[2])
            most_in, most_lat = max(most_in, rec._n_frames), max(most_lat, rec._n_latents)
        rec.finish()
        return most_in, most_lat, most_out

    short, long = peaks(33), peaks(65)
    assert short == long
    assert short[0] < model.chunksize_enc and short[1] < model.chunksize_dec + model.chunksize_enc
    assert short[2] == 1 + 4 * (model.chunksize_dec - 1)


def test_bad_chunk_sizes_fail_before_any_work(model):
    model.chunksize_enc = 6
    try:
        with pytest.raises(ValueError, match="chunksize_enc"):
            StreamingReconstruction(model)
        assert not model.tile_inference
    finally:
        model.chunksize_enc = 9


av = pytest.importorskip("av", reason="PyAV (the [video] extra) is not installed")


def _clip(frames, h, w):
    t = np.arange(frames)[:, None, None, None]
    y, x, c = np.arange(h)[None, :, None, None], np.arange(w)[None, None, :, None], np.arange(3)[None, None, None, :]
    return (127 + 100 * np.sin(0.3 * x + 0.2 * y + 0.5 * t + c)).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    from leanvae.video import write_video

    root = tmp_path_factory.mktemp("stream")
    ckpt = root / "tiny.ckpt"
    model.save_checkpoint(str(ckpt))
    paths = {"ckpt": str(ckpt)}
    for frames in (11, 23):
        paths[frames] = str(root / f"in{frames}.mp4")
        write_video(paths[frames], _clip(frames, 20, 26), fps=8)
    return paths


def test_cli_streams_writes_as_it_goes_and_matches_the_whole_clip(files, model, tmp_path, monkeypatch, capsys):
    from leanvae.video import read_video, to_frames, to_model_input

    written = []
    original = streaming.VideoSink.write

    def spy(self, frames):
        written.append(np.array(frames))
        return original(self, frames)

    monkeypatch.setattr(streaming.VideoSink, "write", spy)
    out = tmp_path / "out.mp4"
    assert main(["reconstruct", files[23], str(out), "--checkpoint", files["ckpt"]]) == 0
    captured = capsys.readouterr()
    # stated before the work (the progress bar comes after), in one line each
    assert captured.err.index("cropped to 16x24") < captured.err.index("frame/s")
    assert "using the first 21 of the 23 frames" in captured.err
    assert "21 frames 16x24" in captured.out and "PSNR" in captured.out
    assert [len(w) for w in written] == [5, 4, 4, 4, 4]  # written chunk by chunk (--chunk-frames 5), as decoded
    frames, _ = read_video(files[23], 21)
    with torch.no_grad():
        whole = to_frames(model.inference(to_model_input(frames[:, :16, :24]))[1])
    streamed = np.concatenate(written)
    # uint8 of values within 1e-5 relative: equal but where a value sits on a rounding boundary
    assert np.abs(streamed.astype(int) - whole.astype(int)).max() <= 1
    assert read_video(str(out))[0].shape == (21, 16, 24, 3)


def test_cli_quiet_prints_only_the_result(files, tmp_path, capsys):
    assert main(["reconstruct", files[11], str(tmp_path / "o.mp4"), "--checkpoint", files["ckpt"], "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.count("\n") == 1 and "9 frames 16x24" in captured.out


def test_cli_refuses_the_input_as_output_before_any_work(files, capsys):
    before = open(files[11], "rb").read()
    assert main(["reconstruct", files[11], files[11], "--checkpoint", files["ckpt"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same file" in err[0]
    assert open(files[11], "rb").read() == before
