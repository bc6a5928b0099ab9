"""Video I/O without PyAV: the OpenCV reader/writer of leanvae.video, the reader choice, and the encode
benchmark on an image that has OpenCV but no PyAV (as the GPU image: PyAV's import is blocked here).

The OpenCV tests skip cleanly without cv2 (pip install opencv-python-headless); the comparisons with PyAV
skip without av. A few seconds in all."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

from leanvae import video
from leanvae.video import VideoError, psnr, read_video, video_reader, write_video

cv2 = pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless) is not installed")
try:
    import av
except ImportError:
    av = None
needs_av = pytest.mark.skipif(av is None, reason="PyAV is not installed")


def _clip(frames=21, h=32, w=48):
    # a different phase per channel: a red/blue swap is a gross error (about 9 dB), not a small one
    t = np.arange(frames)[:, None, None, None]
    y = np.arange(h)[None, :, None, None]
    x = np.arange(w)[None, None, :, None]
    c = np.arange(3)[None, None, None, :]
    return (127 + 100 * np.sin(0.3 * x + 0.2 * y + 0.5 * t + c)).astype(np.uint8)


@pytest.fixture
def no_pyav(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError, as on an image without it
    monkeypatch.delenv(video.READER_ENV, raising=False)


@needs_av
def test_opencv_reads_a_pyav_video_like_pyav(tmp_path):
    path = str(tmp_path / "a.mp4")
    clip = _clip()
    write_video(path, clip, fps=8, writer="pyav")
    a, fps_a = read_video(path, reader="pyav")
    o, fps_o = read_video(path, reader="opencv")
    assert o.shape == a.shape == clip.shape and o.dtype == np.uint8 and fps_o == fps_a == 8.0
    # Both decode the same H.264 stream with FFmpeg, and H.264 decoding is bit-exact by the standard, so
    # the YUV planes are the same; only the YUV->RGB conversion can differ (matrix rounding: at most 1 level
    # per sample, about 48 dB; chroma upsampling on this smooth pattern: a few levels at most). 40 dB (RMS
    # 2.6 levels) allows both and is far above what a real fault gives: a channel swap is about 9 dB, and
    # the codec's own loss against the source frames about 28 dB.
    assert psnr(o, a) >= 40.0, psnr(o, a)
    # both readers see the same codec loss against the source frames
    assert abs(psnr(o, clip) - psnr(a, clip)) < 0.5
    assert psnr(o[..., ::-1], a) < 20.0  # the check above can fail: RGB order matters at this bound
    first, _ = read_video(path, max_frames=5, reader="opencv")
    assert np.array_equal(first, o[:5])


@pytest.mark.parametrize("ext", [".mp4", ".avi"])
def test_opencv_writer_round_trip(tmp_path, ext, no_pyav):
    path = tmp_path / f"b{ext}"
    clip = _clip()
    write_video(path, clip, fps=8)  # auto: OpenCV, PyAV being absent
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left
    o, fps = read_video(path)
    assert o.shape == clip.shape and fps == 8.0
    # MPEG-4 Part 2 / MJPEG at OpenCV's default quality, 4:2:0 chroma on a chroma-heavy pattern: about
    # 28 dB here. 20 dB is a gross-error check (channel order, garbage frames give under 10 dB).
    assert psnr(o, clip) >= 20.0, psnr(o, clip)


def _damaged(tmp_path, clip):
    """Files each reader must refuse: garbage, empty, truncated (index lost), a stream zeroed from 70% of
    its samples on (container intact, so OpenCV opens it and silently stops early), a missing file."""
    good = tmp_path / "good.mp4"
    if av is not None:
        write_video(good, clip, fps=8, writer="pyav")
    else:
        write_video(good, clip, fps=8, writer="opencv")
    data = good.read_bytes()
    files = {"garbage": b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8, "empty": b"",
             "truncated": data[:len(data) // 2]}
    mdat, moov = data.find(b"mdat"), data.find(b"moov")
    assert 0 < mdat < moov, "expected the sample data before the index (FFmpeg's default MP4 layout)"
    cut = mdat + 4 + int(0.7 * (moov - 4 - mdat - 4))
    files["zeroed_tail"] = data[:cut] + bytes(moov - 4 - cut) + data[moov - 4:]
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.mp4"
        paths[name].write_bytes(content)
    paths["missing"] = tmp_path / "missing.mp4"
    return paths


@pytest.mark.parametrize("reader", ["opencv", pytest.param("pyav", marks=needs_av)])
def test_corrupt_and_unreadable_files_are_video_errors(tmp_path, reader):
    clip = _clip()
    for name, path in _damaged(tmp_path, clip).items():
        with pytest.raises(VideoError, match="cannot decode video|no frames decoded") as info:
            read_video(path, reader=reader)
        assert str(path) in str(info.value), (name, str(info.value))


def test_short_video_is_skipped_and_recorded_through_opencv(tmp_path, no_pyav):
    from leanvae.data import VideoClipDataset, load_clips

    write_video(tmp_path / "short.mp4", _clip(3), fps=8)
    with pytest.raises(VideoError, match="3 frames, fewer than one clip of 5"):
        load_clips(str(tmp_path / "short.mp4"), frames=5)
    _, path, info, clips, err = VideoClipDataset([str(tmp_path / "short.mp4")], frames=5)[0]
    assert clips == [] and info is None and "fewer than one clip" in err


def test_reader_choice(monkeypatch):
    monkeypatch.delenv(video.READER_ENV, raising=False)
    assert video_reader("opencv") == "opencv"
    assert video_reader() == ("pyav" if av is not None else "opencv")
    monkeypatch.setenv(video.READER_ENV, "opencv")
    assert video_reader() == "opencv"
    assert video_reader("auto") == ("pyav" if av is not None else "opencv")  # the argument wins
    monkeypatch.setenv(video.READER_ENV, "ffmpeg")
    with pytest.raises(ValueError, match="LEANVAE_VIDEO_READER.*'ffmpeg'"):
        video_reader()
    with pytest.raises(ValueError, match="reader must be one of"):
        read_video("x.mp4", reader="gstreamer")
    monkeypatch.delenv(video.READER_ENV)
    monkeypatch.setitem(sys.modules, "av", None)
    assert video_reader() == "opencv"
    with pytest.raises(VideoError, match="'pyav' was asked for, but it is not installed: pip install av"):
        video_reader("pyav")
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(VideoError, match="needs PyAV.*pip install av.*or OpenCV.*opencv-python-headless"):
        video_reader()
    with pytest.raises(VideoError, match="neither is installed"):
        write_video("x.mp4", _clip(1), fps=8)


def test_write_video_checks_frames(tmp_path, no_pyav):
    with pytest.raises(ValueError, match=r"frames must be uint8 \(T, H, W, 3\).*float32"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=8)
    assert list(tmp_path.iterdir()) == []


def test_encode_bench_runs_without_pyav(tmp_path):
    """The GPU image has OpenCV but no PyAV: benchmarks/test_bench_encode.py must run there, not skip.
    Here: its tiny dry-run case on the CPU, with PyAV's import blocked before anything imports it."""
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    report = str(tmp_path / "bench.json")
    code = ("import sys; sys.modules['av'] = None; import pytest; "
            f"sys.exit(pytest.main(['-p', 'no:cacheprovider', '-q', '-rs', 'benchmarks/test_bench_encode.py', "
            f"'-k', 'clips_per_s', '--benchmark-enable', '--benchmark-json={report}']))")
    env = {**os.environ, "GPU_SUITE_DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop(video.READER_ENV, None)
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.load(open(report))["benchmarks"]
    assert sorted(b["params"]["fused"] for b in results) == [False, True]  # both cases ran, none skipped
    for b in results:
        info = b["extra_info"]
        assert info["reader"] == "opencv" and info["clips"] == 2 and info["clips_per_s"] > 0
        assert 0 < info["device_busy_fraction"] <= 1
