"""`python -m leanvae encode` / `decode` on small synthetic videos (PyAV), with a tiny random model.

One in-process single run and one `torchrun --nproc_per_node=2` (gloo) run are made once per module and
shared by the assertions (fixtures), so the file stays a few seconds plus one torchrun launch.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import leanvae
from helpers import ROOT, assert_close, fill_disk_on_shard_write

av = pytest.importorskip("av", reason="PyAV (the [video] extra) is not installed")
pytest.importorskip("safetensors", reason="safetensors is not installed")
from safetensors import safe_open  # noqa: E402

from leanvae import encode as enc  # noqa: E402
from leanvae.cli import main  # noqa: E402
from leanvae.video import read_video, to_model_input, write_video  # noqa: E402

TINY = dict(embedding_dim=48, l_dim=16, h_dim=32, sep_num_layer=1, fusion_num_layer=1)
OPTS = dict(frames=5, videos_per_shard=2, workers=1, quiet=True)
CLI_OPTS = ["--frames", "5", "--videos-per-shard", "2", "--workers", "1", "-q"]


def _clip(frames, h=32, w=48, phase=0.0):
    t = np.arange(frames)[:, None, None, None]
    y = np.arange(h)[None, :, None, None]
    x = np.arange(w)[None, None, :, None]
    c = np.arange(3)[None, None, None, :]
    return (127 + 100 * np.sin(0.3 * x + 0.2 * y + 0.5 * t + c + phase)).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Videos: 2 good ones (21 and 13 frames, one in a subfolder), a corrupt one, a too-short one (3
    frames for 5-frame clips) and one of an odd size (20x34, not multiples of 8); and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("encode")
    vids = root / "videos"
    (vids / "sub").mkdir(parents=True)
    write_video(str(vids / "a.mp4"), _clip(21), fps=8)
    write_video(str(vids / "sub" / "b.mp4"), _clip(13, phase=1.0), fps=8)
    write_video(str(vids / "c_short.mp4"), _clip(3), fps=8)
    (vids / "d_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    write_video(str(vids / "e_odd.mp4"), _clip(9, h=20, w=34), fps=8)
    (vids / "notes.txt.bak").write_text("not a video")
    torch.manual_seed(0)
    ckpt = root / "tiny.ckpt"
    leanvae.LeanVAE.from_config(**TINY).save_checkpoint(str(ckpt))
    bad = {str(vids / n) for n in ("c_short.mp4", "d_corrupt.mp4", "e_odd.mp4")}
    return dict(root=root, videos=str(vids), ckpt=str(ckpt), bad=bad, good=[str(vids / "a.mp4"), str(vids / "sub" / "b.mp4")])


@pytest.fixture(scope="module")
def single(dataset):
    out = str(dataset["root"] / "single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1)
    try:
        summary = enc.encode_dataset([dataset["videos"]], out, dataset["ckpt"], **OPTS)
    finally:
        torch.set_num_threads(threads)
    return out, summary


def test_workers_do_not_hang_after_pyav_conversions_in_the_parent(dataset, tmp_path):
    """PyAV >= 18 keeps each thread's frame-conversion context, with a pool of threads by default; a forked
    DataLoader worker that inherits one without its threads hung on its first conversion. The parent here
    converts a frame with PyAV's defaults first, then encodes with one worker: it must finish."""
    code = ("import av, sys; av.VideoFrame(64, 64, 'yuv420p').reformat(format='rgb24'); "
            "from leanvae.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, "encode", dataset["good"][0], "--out", str(tmp_path / "out"),
           "--checkpoint", dataset["ckpt"]] + CLI_OPTS
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("encode with a DataLoader worker did not finish in 90 s (a worker hung converting frames)")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "out" / "shards.jsonl").is_file()


@pytest.fixture(scope="module")
def torchrun(dataset):
    out = str(dataset["root"] / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "leanvae", "encode", dataset["videos"], "--out", out, "--checkpoint", dataset["ckpt"]] + CLI_OPTS
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _files(out):
    return sorted(n for n in os.listdir(out) if n != "meta.json")


def _read(out, name):
    with open(os.path.join(out, name), "rb") as f:
        return f.read()


def _index(out):
    return enc.read_index(out)


def _errors(out):
    with open(os.path.join(out, "errors.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_single_run_output_layout(dataset, single):
    out, summary = single
    # 5 videos, 2 per shard -> 3 shards; a.mp4 gives 4 clips of 5 frames, b.mp4 2
    assert _files(out) == ["errors.jsonl", "index.jsonl", "shard-00000.safetensors", "shard-00001.safetensors",
                           "shard-00002.safetensors", "shards.jsonl"]
    index = _index(out)
    assert [(r["path"], r["first_frame"]) for r in index] == (
        [(dataset["good"][0], s) for s in (0, 5, 10, 15)] + [(dataset["good"][1], s) for s in (0, 5)])
    assert all(r["frames"] == 5 and r["latent_shape"] == [4, 2, 4, 6] and r["latent_dtype"] == "float32"
               and r["size"] == [32, 48] and r["fps"] == 8.0 for r in index)
    assert summary["clips"] == 6 and summary["videos"] == 5 and summary["failures"] == 3
    for r in index:
        with safe_open(os.path.join(out, r["shard"]), framework="pt") as f:
            assert list(f.get_tensor(r["key"]).shape) == r["latent_shape"]
    meta = json.loads(_read(out, "meta.json"))
    assert meta["checkpoint_sha256"] == enc._sha256(dataset["ckpt"])
    assert meta["model_config"]["embedding_dim"] == 48 and meta["leanvae_version"] == leanvae.__version__
    assert meta["options"]["frames"] == 5 and meta["options"]["fused"] is True


def test_errors_file_lists_exactly_the_bad_inputs(dataset, single):
    errors = _errors(single[0])
    assert {e["path"] for e in errors} == dataset["bad"]
    reasons = {os.path.basename(e["path"]): e["reason"] for e in errors}
    assert "fewer than one clip of 5" in reasons["c_short.mp4"]
    assert "cannot decode" in reasons["d_corrupt.mp4"] or "no frames" in reasons["d_corrupt.mp4"]
    assert "not multiples of 8" in reasons["e_odd.mp4"]


def test_latents_equal_model_encode(dataset, single):
    out = single[0]
    fused = leanvae.LeanVAE.load_from_checkpoint(dataset["ckpt"]).eval()
    handle = leanvae.use_fused_kernels(fused)
    reference = leanvae.LeanVAE.load_from_checkpoint(dataset["ckpt"]).eval()
    frames = {p: read_video(p)[0] for p in dataset["good"]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in _index(out):
            x = to_model_input(frames[r["path"]][r["first_frame"]:r["first_frame"] + r["frames"]])
            with safe_open(os.path.join(out, r["shard"]), framework="pt") as f:
                z = f.get_tensor(r["key"])
            with torch.no_grad():
                # same model, same frames, same (1) thread: the very same numbers
                assert torch.equal(z, fused.encode(x)[0]), r["key"]
                assert_close(z, reference.encode(x)[0], torch.float32, msg=r["key"])
    finally:
        torch.set_num_threads(threads)
        handle.revert()


def test_torchrun_two_ranks_equals_single_process(single, torchrun):
    out = single[0]
    assert _files(torchrun) == _files(out)
    for name in _files(out):  # shards bitwise (latents and their index), merged index and errors
        assert _read(torchrun, name) == _read(out, name), name
    a, b = json.loads(_read(out, "meta.json")), json.loads(_read(torchrun, "meta.json"))
    assert a["options"] == b["options"] and a["checkpoint_sha256"] == b["checkpoint_sha256"]


def test_interrupted_then_resumed_equals_uninterrupted(dataset, single, monkeypatch):
    out = str(dataset["root"] / "resumed")
    real = enc._encode_shard
    calls = []

    def interrupt_after_first(*args, **kwargs):
        if calls:
            # the second shard is being written when the run dies: a temporary file is left behind
            open(args[3] + ".tmp", "wb").write(b"partial")
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(enc, "_encode_shard", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        enc.encode_dataset([dataset["videos"]], out, dataset["ckpt"], **OPTS)
    # shard 0 complete (with its description), shard 1 only a temporary file; the lock was released
    assert sorted(os.listdir(out)) == ["meta.json", "shard-00000.json", "shard-00000.safetensors",
                                       "shard-00001.safetensors.tmp"]
    monkeypatch.setattr(enc, "_encode_shard", real)
    summary = enc.encode_dataset([dataset["videos"]], out, dataset["ckpt"], **OPTS)
    assert summary["resumed_shards"] == 1
    assert _files(out) == _files(single[0])
    for name in _files(out):
        assert _read(out, name) == _read(single[0], name), name
    # a finished DIR: a rerun encodes nothing; --strict exits 1 because inputs were skipped
    assert main(["encode", dataset["videos"], "--out", out, "--checkpoint", dataset["ckpt"]] + CLI_OPTS) == 0
    assert main(["encode", dataset["videos"], "--out", out, "--checkpoint", dataset["ckpt"], "--strict"] + CLI_OPTS) == 1


def test_rerun_with_other_options_or_checkpoint_refuses(dataset, single, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(single[0], out)
    with pytest.raises(enc.EncodeError, match="other options; differing: frames was 5, now 9"):
        enc.encode_dataset([dataset["videos"]], out, dataset["ckpt"], **{**OPTS, "frames": 9})
    other = str(tmp_path / "other.ckpt")
    torch.manual_seed(1)
    leanvae.LeanVAE.from_config(**TINY).save_checkpoint(other)
    with pytest.raises(enc.EncodeError, match="another checkpoint.*--overwrite"):
        enc.encode_dataset([dataset["videos"]], out, other, **OPTS)
    # --overwrite starts over with the new checkpoint
    summary = enc.encode_dataset([dataset["good"][1]], out, other, **{**OPTS, "overwrite": True})
    assert summary["clips"] == 2 and summary["resumed_shards"] == 0
    assert _files(out) == ["errors.jsonl", "index.jsonl", "shard-00000.safetensors", "shards.jsonl"]


def test_reader_is_recorded_and_a_dir_resumes_only_with_the_same_reader(dataset, single, tmp_path, monkeypatch):
    pytest.importorskip("cv2", reason="OpenCV is not installed (the second reader)")
    monkeypatch.delenv("LEANVAE_VIDEO_READER", raising=False)
    out = str(tmp_path / "out")
    shutil.copytree(single[0], out)
    meta = json.loads(_read(out, "meta.json"))
    assert meta["options"]["video_reader"] == "pyav" and single[1]["reader"] == "pyav"
    # PyAV and OpenCV convert colours each their own way: resuming with the other would mix latents
    monkeypatch.setenv("LEANVAE_VIDEO_READER", "opencv")
    with pytest.raises(enc.EncodeError, match="decoded with the 'pyav' video reader.*would decode with 'opencv'.*"
                                              "LEANVAE_VIDEO_READER=pyav"):
        enc.encode_dataset([dataset["videos"]], out, dataset["ckpt"], **OPTS)
    assert _files(out) == _files(single[0])  # refused before touching anything
    # a DIR from before the reader was recorded was read with PyAV: it resumes with PyAV, and only with it
    del meta["options"]["video_reader"]
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(enc.EncodeError, match="'pyav' video reader"):
        enc.encode_dataset([dataset["videos"]], out, dataset["ckpt"], **OPTS)
    monkeypatch.delenv("LEANVAE_VIDEO_READER")
    summary = enc.encode_dataset([dataset["videos"]], out, dataset["ckpt"], **OPTS)
    assert summary["resumed_shards"] == 3 and summary["reader"] == "pyav"


def test_small_shared_memory_sends_numpy_arrays_with_the_same_result(dataset, single, tmp_path, monkeypatch):
    # where /dev/shm is small, clips leave the DataLoader workers pickled instead of in shared memory
    seen = []
    real = enc._shm_room
    monkeypatch.setattr(enc, "_shm_room", lambda nbytes: seen.append(real(nbytes)) or False)
    out = str(tmp_path / "out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the `single` run
    try:
        enc.encode_dataset([dataset["videos"]], out, dataset["ckpt"], **OPTS)
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 1  # asked once, for the one DataLoader of the run
    assert _files(out) == _files(single[0])
    for name in _files(out):
        assert _read(out, name) == _read(single[0], name), name


def test_opencv_reader_encodes_the_same_dataset(dataset, single, tmp_path):
    pytest.importorskip("cv2", reason="OpenCV is not installed")
    out = str(tmp_path / "out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the `single` run
    try:
        summary = enc.encode_dataset([dataset["videos"]], out, dataset["ckpt"], reader="opencv", **OPTS)
    finally:
        torch.set_num_threads(threads)
    assert summary["reader"] == "opencv" and json.loads(_read(out, "meta.json"))["options"]["video_reader"] == "opencv"
    assert {e["path"] for e in _errors(out)} == dataset["bad"]  # the same inputs refused through cv2
    # same clips; latents of frames decoded by another library: close (the readers' frames agree within
    # 40 dB PSNR, tests/tools/test_video_readers.py), and equal where their frames are equal, as with this FFmpeg
    index, ref = _index(out), _index(single[0])
    assert [(r["path"], r["first_frame"], r["latent_shape"]) for r in index] == [
        (r["path"], r["first_frame"], r["latent_shape"]) for r in ref]
    for r, q in zip(index, ref):
        frames_cv = read_video(r["path"], reader="opencv")[0]
        frames_av = read_video(r["path"], reader="pyav")[0]
        if np.array_equal(frames_cv, frames_av):
            assert torch.equal(enc.load_latent(out, r), enc.load_latent(single[0], q)), r["key"]


def test_disk_error_stops_cleanly_and_marks_nothing_complete(dataset, tmp_path, monkeypatch, capsys):
    from leanvae import shards

    fill_disk_on_shard_write(monkeypatch, shards, nth=1)  # the first shard file: half on disk, then full
    out = str(tmp_path / "out")
    code = main(["encode", dataset["good"][1], "--out", out, "--checkpoint", dataset["ckpt"]] + CLI_OPTS)
    assert code == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["meta.json"]


def test_whole_and_resize_and_manifest(dataset, tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,caption\n" + f"{dataset['good'][1]},x\n" + os.path.join(dataset["videos"], "e_odd.mp4") + ",y\n")
    out = str(tmp_path / "out")
    summary = enc.encode_dataset([str(manifest)], out, dataset["ckpt"], whole=True, size=(16, 24), workers=0, quiet=True)
    assert summary["failures"] == 0
    index = _index(out)
    # b.mp4: 13 frames (1+4*3) -> 4 latent frames; e_odd.mp4: 9 frames; both resized+cropped to 16x24
    assert [(r["frames"], r["latent_shape"], r["source_size"]) for r in index] == [
        (13, [4, 4, 2, 3], [32, 48]), (9, [4, 3, 2, 3], [20, 34])]
    # whole clips are encoded chunk by chunk: equal to the model's tiled encode of the whole clip
    from leanvae.data import load_clips

    model = leanvae.LeanVAE.load_from_checkpoint(dataset["ckpt"]).eval()
    handle = leanvae.use_fused_kernels(model)
    model.set_tile_inference(True)
    try:
        for r in index:
            _, clips = load_clips(r["path"], whole=True, size=(16, 24))
            with torch.no_grad():
                expected = model.encode(to_model_input(clips[0][1]))[0]
            assert_close(enc.load_latent(out, r), expected, torch.float32, msg=r["path"])
    finally:
        handle.revert()


def test_decode_writes_videos(dataset, single, tmp_path, capsys):
    videos = tmp_path / "decoded"
    assert main(["decode", single[0], "--out", str(videos), "--limit", "2", "-q"]) == 0
    names = sorted(os.listdir(videos))
    assert names == ["v00000000_c00000.mp4", "v00000000_c00001.mp4"]
    frames, fps = read_video(str(videos / names[0]))
    assert frames.shape == (5, 32, 48, 3) and fps == 8.0


def test_bad_arguments_are_clear(dataset, tmp_path, capsys):
    with pytest.raises(ValueError, match="frames must be 1\\+4k"):
        enc.encode_dataset([dataset["videos"]], str(tmp_path / "o"), dataset["ckpt"], frames=4)
    with pytest.raises(ValueError, match="input not found"):
        enc.encode_dataset([str(tmp_path / "nope")], str(tmp_path / "o"), dataset["ckpt"])
    with pytest.raises(ValueError, match="size must be"):
        enc.encode_dataset([dataset["videos"]], str(tmp_path / "o"), dataset["ckpt"], size=(30, 40))
    assert main(["encode", dataset["videos"], "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "x.pt")]) == 2
    # the message of leanvae.loading, shared with the other commands
    assert f"checkpoint {str(tmp_path / 'x.pt')!r} not found" in capsys.readouterr().err
    assert main(["decode", str(tmp_path), "--out", str(tmp_path / "v")]) == 2
    assert "no index.jsonl" in capsys.readouterr().err


def test_clip_starts_and_fps_resampling():
    from leanvae.data import clip_starts, resample_fps

    assert clip_starts(21, 5) == [0, 5, 10, 15]
    assert clip_starts(21, 5, stride=3) == [0, 3, 6, 9, 12, 15]
    assert clip_starts(21, 5, stride=3, max_clips=2) == [0, 3]
    assert clip_starts(4, 5) == []
    frames = np.arange(24).reshape(24, 1, 1, 1).astype(np.uint8)
    half, fps = resample_fps(frames, 24.0, 12.0)
    assert fps == 12.0 and half[:, 0, 0, 0].tolist() == list(range(0, 24, 2))
    same, fps = resample_fps(frames, 24.0, 24.0)
    assert same is frames and fps == 24.0


def test_missing_safetensors_is_a_clear_message(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    assert main(["encode", dataset["videos"], "--out", str(tmp_path / "o"), "--checkpoint", dataset["ckpt"]]) == 2
    assert "needs the safetensors package: pip install safetensors" in capsys.readouterr().err
