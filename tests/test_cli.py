"""The command line: info, bench (on a tiny clip) and reconstruct (on a synthetic video file)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import leanvae
from leanvae.cli import main


def test_info_runs_and_names_backends(capsys):
    assert main(["info", "-v"]) == 0
    out = capsys.readouterr().out
    assert "native modules:" in out and "soft_threshold" in out and "reference" in out


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "leanvae", "info"], capture_output=True, text=True, check=True).stdout
    assert "leanvae-kernels" in out


def test_bench_tiny_clip_agrees_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "--frames", "5", "--size", "16x24", "--repeats", "1", "--warmup", "0", "--quiet",
                 "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(path.read_text())
    assert report["agree"] is True
    assert set(report["results"]) == {"reference", "fused"}
    assert report["results"]["fused"]["error"]["decode"]["max_rel"] < 1e-4
    assert "fused agrees (max_rel vs reference" in out


@pytest.mark.parametrize("argv, msg", [
    (["bench", "--frames", "6", "--size", "16x16"], "frames must be 1+4k"),
    (["bench", "--frames", "5", "--size", "12x16"], "multiples of 8"),
])
def test_bench_bad_arguments(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_bench_bad_size_format():
    with pytest.raises(SystemExit):
        main(["bench", "--size", "big"])


av = pytest.importorskip("av", reason="PyAV (the [video] extra) is not installed")


def _write_clip(path, frames=9, h=20, w=34):
    from leanvae.video import write_video

    t = np.arange(frames)[:, None, None, None]
    y = np.arange(h)[None, :, None, None]
    x = np.arange(w)[None, None, :, None]
    c = np.arange(3)[None, None, None, :]
    clip = (127 + 100 * np.sin(0.3 * x + 0.2 * y + 0.5 * t + c)).astype(np.uint8)
    write_video(path, clip, fps=8)
    return clip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "leanvae.ckpt"
    leanvae.LeanVAE.from_config().save_checkpoint(str(path))
    return str(path)


@pytest.mark.parametrize("extra", [[], ["--fused"], ["--tile", "--fused"]], ids=["reference", "fused", "fused_tiled"])
def test_reconstruct_round_trip(tmp_path, checkpoint, extra, capsys):
    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    _write_clip(src)
    assert main(["reconstruct", str(src), str(dst), "--checkpoint", checkpoint] + extra) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "9 frames 16x32" in out  # 20x34 cropped to multiples of 8
    from leanvae.video import read_video

    frames, _ = read_video(dst)
    assert frames.shape == (9, 16, 32, 3)


def test_reconstruct_errors(tmp_path, checkpoint, capsys):
    src = tmp_path / "in.mp4"
    _write_clip(src)
    assert main(["reconstruct", str(tmp_path / "missing.mp4"), "o.mp4", "--checkpoint", checkpoint]) == 2
    assert "input video not found" in capsys.readouterr().err
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    assert main(["reconstruct", str(bad), str(tmp_path / "o.mp4"), "--checkpoint", checkpoint]) == 2
    assert "cannot decode video" in capsys.readouterr().err
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"weights": {}}, wrong)
    assert main(["reconstruct", str(src), str(tmp_path / "o.mp4"), "--checkpoint", str(wrong)]) == 2
    assert "not a LeanVAE checkpoint" in capsys.readouterr().err
    assert main(["reconstruct", str(src), str(tmp_path / "o.mp4"), "--checkpoint", checkpoint, "--frames", "6"]) == 2
    assert "1+4k" in capsys.readouterr().err


def test_info_with_a_bad_backend_variable_says_so_in_one_line():
    env = {**os.environ, "LEANVAE_KERNELS_BACKEND": "junk"}
    proc = subprocess.run([sys.executable, "-m", "leanvae", "info"], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "LEANVAE_KERNELS_BACKEND" in lines[0] and "junk" in lines[0], proc.stderr


def test_reconstruct_output_folder_missing_and_non_torch_checkpoint(tmp_path, checkpoint, capsys):
    src = tmp_path / "in.mp4"
    _write_clip(src)
    missing = tmp_path / "no" / "such" / "out.mp4"
    assert main(["reconstruct", str(src), str(missing), "--checkpoint", checkpoint]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output folder does not exist" in err[0]
    assert not (tmp_path / "no").exists()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a torch file\n" * 10)
    out = tmp_path / "o.mp4"
    assert main(["reconstruct", str(src), str(out), "--checkpoint", str(garbage)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable torch checkpoint" in err[0], err
    assert sorted(tmp_path.iterdir()) == sorted([src, garbage])  # no output, no temporary file


def test_write_video_leaves_nothing_half_written(tmp_path, monkeypatch):
    from leanvae import video

    frames = np.zeros((3, 16, 16, 3), dtype=np.uint8)

    def broken(av, path, frames, fps):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(video, "_encode", broken)
    with pytest.raises(video.VideoError, match="disk full"):
        video.write_video(tmp_path / "out.mp4", frames, fps=8)
    assert list(tmp_path.iterdir()) == []
