"""Video file I/O for `python -m leanvae reconstruct`, `encode` and `decode`.

Two readers/writers: PyAV (the optional extra `[video]`, recommended) and, where PyAV is missing, OpenCV
(`cv2.VideoCapture` / `cv2.VideoWriter` through OpenCV's bundled FFmpeg; e.g. GPU images that ship
opencv-python-headless but not PyAV). `auto` (the default) takes PyAV when it imports, else OpenCV; the
argument `reader=` or the environment variable LEANVAE_VIDEO_READER (auto, pyav, opencv) forces one.
Both decode with FFmpeg, but the YUV -> RGB conversion (chroma upsampling, rounding) is each library's own,
so the same file can give slightly different frames: `leanvae encode` records the reader it used.
"""
import math
import os

import numpy as np
import torch

READERS = ("pyav", "opencv")
READER_ENV = "LEANVAE_VIDEO_READER"
_INSTALL = {"pyav": "pip install av (or pip install 'leanvae-kernels[video]')",
            "opencv": "pip install opencv-python-headless"}


class VideoError(ValueError):
    """A video that cannot be read or written; the message says which file and why."""


def _import(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def _resolve(choice, what):
    if choice is None:
        choice = os.environ.get(READER_ENV, "").strip().lower() or "auto"
    if not isinstance(choice, str) or choice not in ("auto",) + READERS:
        raise ValueError(f"{what} must be one of 'auto', 'pyav', 'opencv' (argument or ${READER_ENV}), got {choice!r}")
    if choice in ("auto", "pyav") and _import("av") is not None:
        return "pyav"
    if choice in ("auto", "opencv") and _import("cv2") is not None:
        return "opencv"
    if choice == "auto":
        raise VideoError(f"reading and writing video needs PyAV (recommended: {_INSTALL['pyav']}) or OpenCV "
                         f"({_INSTALL['opencv']}); neither is installed")
    raise VideoError(f"video {what} {choice!r} was asked for, but it is not installed: {_INSTALL[choice]}")


def sws_options(av):
    """Keyword arguments for PyAV's frame conversions (`to_ndarray`, `reformat`): one conversion thread.

    From PyAV 17 a conversion uses a pool of threads by default, and from 18 the conversion context (with its
    pool) is kept per thread and reused. A DataLoader worker forked from a process whose main thread has such
    a context inherits it without the pool's threads; the worker's first conversion with other settings frees
    it and waits forever for threads that do not exist (seen here: `leanvae encode --workers 1` hung in
    `avpriv_slicethread_free`). One thread per conversion keeps the context free of a pool in every process
    (the workers decode in parallel instead). Older PyAV has no such argument and needs none."""
    major = int(str(getattr(av, "__version__", "0")).split(".")[0] or 0)
    return {"threads": 1} if major >= 17 else {}


def release_conversion_threads():
    """Before forking workers: leave this thread's PyAV conversion context without a thread pool (see
    `sws_options`), in case code outside this module converted frames with PyAV's default settings here."""
    av = _import("av")
    if av is None or not sws_options(av):
        return
    try:
        av.VideoFrame(16, 16, "yuv420p").reformat(format="rgb24", **sws_options(av))
    except Exception:  # noqa: BLE001 - best effort; the workers' own conversions use one thread either way
        pass


def encoder_frame(av, rgb):
    """A PyAV frame of the uint8 (H, W, 3) RGB array `rgb`, converted to the writers' yuv420p with one
    conversion thread (`sws_options`) before the encoder sees it."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    return frame.reformat(format="yuv420p", **sws_options(av))


def video_reader(reader=None):
    """The reader `read_video` uses: `reader`, else $LEANVAE_VIDEO_READER, else 'auto' (PyAV when installed,
    else OpenCV). Returns 'pyav' or 'opencv'; VideoError when the one asked for (or any) is missing."""
    return _resolve(reader, "reader")


def video_writer(writer=None):
    """The library `write_video` uses: `writer` ('auto', 'pyav', 'opencv'), else 'auto' (PyAV when
    installed, else OpenCV). The reader's environment variable does not choose the writer."""
    return _resolve(writer or "auto", "writer")


def read_video(path, max_frames=None, reader=None):
    """Decode `path` to (frames uint8 (T, H, W, 3) RGB, fps). Raises VideoError for unreadable files.
    `reader`: 'auto' (default), 'pyav' or 'opencv' (see `video_reader`)."""
    if _resolve(reader, "reader") == "pyav":
        frames, fps = _read_pyav(path, max_frames)
    else:
        frames, fps = _read_opencv(path, max_frames)
    if not frames:
        raise VideoError(f"{path}: no frames decoded")
    return np.stack(frames), fps


def _read_pyav(path, max_frames):
    av = _import("av")
    frames = []
    sws = sws_options(av)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 24.0
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24", **sws))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except VideoError:
        raise
    except Exception as exc:  # PyAV raises its own error classes (InvalidDataError, ...)
        raise VideoError(f"{path}: cannot decode video ({exc.__class__.__name__}: {exc})") from exc
    return frames, fps


def _read_opencv(path, max_frames):
    cv2 = _import("cv2")
    path = os.fspath(path)
    # cv2 reports nothing for a bad file: VideoCapture just does not open, and read() returns (False, None)
    # where frames are missing, so every one of those outcomes is checked here.
    if not os.path.isfile(path):
        raise VideoError(f"{path}: cannot decode video (no such file)")
    frames = []
    # CAP_FFMPEG explicitly: the automatic choice could take a name with '%' for an image-sequence pattern
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    try:
        if not cap.isOpened():
            hint = "" if _opencv_has_ffmpeg(cv2) else " (this OpenCV build has no FFmpeg video I/O)"
            raise VideoError(f"{path}: cannot decode video (OpenCV could not open it{hint})")
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = float(fps) if fps and math.isfinite(fps) and fps > 0 else 24.0
        while max_frames is None or len(frames) < max_frames:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.size == 0 or frame.dtype != np.uint8:
                raise VideoError(f"{path}: cannot decode video (OpenCV returned a frame of shape "
                                 f"{frame.shape}, {frame.dtype}; expected (H, W, 3) uint8)")
            if frames and frame.shape != frames[0].shape:
                raise VideoError(f"{path}: frame size changed from {frames[0].shape[:2]} to {frame.shape[:2]} "
                                 f"at frame {len(frames)}")
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        # A stream damaged midway makes cv2 stop early without a word (PyAV raises there): compare with the
        # container's frame count. It is exact in MP4/MOV and an estimate from duration x fps in some other
        # containers, which can overshoot by one; hence the one-frame slack.
        expected = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        expected = int(expected) if expected and math.isfinite(expected) and expected > 0 else 0
        if max_frames is not None:
            expected = min(expected, max_frames)
        if frames and len(frames) < expected - 1:
            raise VideoError(f"{path}: cannot decode video (only {len(frames)} of the {expected} frames the "
                             f"container lists could be decoded: corrupt or truncated stream)")
    except VideoError:
        raise
    except Exception as exc:  # cv2.error
        raise VideoError(f"{path}: cannot decode video ({exc.__class__.__name__}: {exc})") from exc
    finally:
        cap.release()
    return frames, fps


def _opencv_has_ffmpeg(cv2):
    try:
        return cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG)
    except Exception:  # very old OpenCV: no registry to ask
        return True


def write_video(path, frames, fps, writer=None):
    """Encode uint8 frames (T, H, W, 3) RGB to `path`. PyAV: H.264 when available, else MPEG-4, CRF 10.
    OpenCV: MPEG-4 Part 2 ('mp4v'; MJPEG for .avi) at OpenCV's default quality, lossier than PyAV's.
    `writer`: 'auto' (PyAV when installed, else OpenCV), 'pyav' or 'opencv'.

    Written to a temporary name in the same folder and renamed when complete, so an interrupted or failed
    write never leaves a file that looks finished. A missing folder is a VideoError."""
    lib = video_writer(writer)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) with T >= 1, got {frames.dtype} {tuple(frames.shape)}")
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise VideoError(f"{path}: folder {folder} does not exist")
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.partial-{os.getpid()}{ext}")  # same extension: the format follows it
    module = _import("av" if lib == "pyav" else "cv2")
    try:
        if lib == "pyav":
            _encode(module, tmp, frames, fps)
        else:
            _encode_opencv(module, tmp, frames, fps)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, VideoError):
            raise
        if isinstance(exc, OSError) or (lib == "pyav" and isinstance(exc, module.error.FFmpegError)) or (
                lib == "opencv" and isinstance(exc, module.error)):
            raise VideoError(f"{path}: cannot write video ({exc.__class__.__name__}: {exc})") from exc
        raise


def _encode(av, path, frames, fps):
    t, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10"}
        for f in frames:
            for packet in stream.encode(encoder_frame(av, f)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _encode_opencv(cv2, path, frames, fps):
    _, h, w, _ = frames.shape
    fourcc = "MJPG" if path.lower().endswith(".avi") else "mp4v"  # codecs OpenCV's own FFmpeg always has
    out = cv2.VideoWriter(path, cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), float(max(1, round(fps))), (w, h))
    if not out.isOpened():
        raise VideoError(f"{path}: OpenCV cannot write this video (codec {fourcc}, {w}x{h}); PyAV can: {_INSTALL['pyav']}")
    try:
        for f in frames:
            out.write(cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2BGR))
    finally:
        out.release()
    if not os.path.isfile(path) or os.path.getsize(path) == 0:  # VideoWriter.write reports no failure
        raise VideoError(f"{path}: OpenCV wrote no video (codec {fourcc}, {w}x{h})")


def to_model_input(frames):
    """uint8 (T, H, W, 3) -> float (1, 3, T, H, W) in [-0.5, 0.5], as the published inference script."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).unsqueeze(0).float()
    return x / 255.0 - 0.5


def to_frames(x):
    """(1, 3, T, H, W) in [-0.5, 0.5] -> uint8 (T, H, W, 3), as the published inference script."""
    x = ((x.float().clamp(-0.5, 0.5) + 0.5) * 255.0).to(torch.uint8)
    return x[0].permute(1, 2, 3, 0).cpu().numpy()


def psnr(a, b):
    """PSNR in dB between two uint8 arrays of the same shape."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
