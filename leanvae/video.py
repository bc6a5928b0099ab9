"""Video file I/O for `python -m leanvae reconstruct` (PyAV, the optional extra `[video]`)."""
import os

import numpy as np
import torch


class VideoError(ValueError):
    """A video that cannot be read or written; the message says which file and why."""


def _av():
    try:
        import av
    except ImportError:
        raise VideoError("reading and writing video needs PyAV: pip install 'leanvae-kernels[video]'") from None
    return av


def read_video(path, max_frames=None):
    """Decode `path` to (frames uint8 (T, H, W, 3), fps). Raises VideoError for unreadable files."""
    av = _av()
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 24.0
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except VideoError:
        raise
    except Exception as exc:  # PyAV raises its own error classes (InvalidDataError, ...)
        raise VideoError(f"{path}: cannot decode video ({exc.__class__.__name__}: {exc})") from exc
    if not frames:
        raise VideoError(f"{path}: no frames decoded")
    return np.stack(frames), fps


def write_video(path, frames, fps):
    """Encode uint8 frames (T, H, W, 3) to `path` (H.264 when available, else MPEG-4, CRF 10).

    Written to a temporary name in the same folder and renamed when complete, so an interrupted or failed
    write never leaves a file that looks finished. A missing folder is a VideoError."""
    av = _av()
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise VideoError(f"{path}: folder {folder} does not exist")
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.partial-{os.getpid()}{ext}")  # same extension: the format follows it
    try:
        _encode(av, tmp, frames, fps)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, (OSError, av.error.FFmpegError)) and not isinstance(exc, VideoError):
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
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


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
