"""The command line: info, bench (on a tiny clip) and reconstruct (on a synthetic video file)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT

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


def test_bench_report_has_one_formatter(tmp_path):
    """`leanvae bench`'s text table and benchmarks/report.py's Markdown table are rendered from the same
    cells (leanvae.bench.report_rows), and the error columns follow the dtype (max_rel in float32, RMS otherwise)."""
    import importlib.util

    from leanvae.bench import REPORT_COLUMNS, format_table, report_rows

    spec = importlib.util.spec_from_file_location(
        "bench_report", os.path.join(ROOT, "benchmarks", "report.py"))
    report_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report_py)

    def row(seconds, err):
        return {"encode": {"seconds": seconds, "peak_bytes": 3 * 2**20}, "decode": {"seconds": 2 * seconds, "peak_bytes": 2**20},
                "total_seconds": 3 * seconds, "speedup_vs_reference": 0.5 / seconds,
                **({"error": {p: {"max_rel": 2e-6, "rms_rel": 3e-3} for p in ("encode", "decode")}} if err else {})}

    for dtype, shown in (("float32", "2.0e-06"), ("bfloat16", "3.0e-03")):
        rep = {"setup": {"batch": 1, "frames": 5, "height": 16, "width": 24, "dtype": dtype, "device": "cpu",
                         "latent_dim": 4, "backend": "auto", "tile": False, "repeats": 1},
               "results": {"reference": row(0.5, False), "fused": row(0.25, True)}, "agree": True, "criterion": "c"}
        rows = report_rows(rep)
        assert rows[1] == ["fused", "0.250", "0.500", "0.750", "2.00x", "3", "1", shown, shown]
        text = format_table(rep).splitlines()
        assert text[1].split() == " ".join(REPORT_COLUMNS).split()
        assert [line.split() for line in text[2:4]] == rows
        path = tmp_path / f"{dtype}.json"
        path.write_text(json.dumps(rep))
        md = report_py.e2e_tables([str(path)])[0]
        assert "| " + " | ".join(REPORT_COLUMNS) + " |" in md
        assert ["| " + " | ".join(cells) + " |" for cells in rows] == [line for line in md if line.startswith("| ")][2:]


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
                          cwd=ROOT, timeout=120)
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
