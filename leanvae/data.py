"""Video datasets for `python -m leanvae encode`: input listing, frame preparation, clip cutting.

Frames stay uint8 (T, H, W, 3) until the model needs them, so a clip's "frames" are well defined and a
test can feed exactly the same frames to `model.encode`.
"""
import csv
import os

import numpy as np
import torch

from .video import VideoError, read_video, release_conversion_threads

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".gif", ".ts")
MANIFEST_EXTENSIONS = (".txt", ".csv", ".lst")


def _read_manifest(path):
    """Paths from a manifest: one per line, or a CSV with a `path` column. Relative paths are taken
    relative to the manifest's folder."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"manifest {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise ValueError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if path.lower().endswith(".csv"):
        rows = list(csv.DictReader(lines))
        if not rows or "path" not in rows[0]:
            raise ValueError(f"manifest {path}: a CSV manifest needs a 'path' column, got columns "
                             f"{sorted(rows[0]) if rows else '(empty file)'}")
        entries = [r["path"].strip() for r in rows if r["path"] and r["path"].strip()]
    else:
        entries = [ln.strip() for ln in lines]
    return [e if os.path.isabs(e) else os.path.join(base, e) for e in entries]


def list_videos(inputs):
    """Resolve INPUT arguments (files, folders searched recursively by extension, manifests) to a list of
    video paths, in a deterministic order: arguments in the order given, folders sorted, duplicates
    dropped. A path that does not exist is a ValueError (a typo should not make an empty dataset)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out, seen = [], set()

    def add(p):
        p = os.path.abspath(p)
        if p not in seen:
            seen.add(p)
            out.append(p)

    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = []
            for root, dirs, files in os.walk(item):
                dirs.sort()
                found += [os.path.join(root, f) for f in files if f.lower().endswith(VIDEO_EXTENSIONS)]
            for p in sorted(found):
                add(p)
        elif os.path.isfile(item):
            if item.lower().endswith(MANIFEST_EXTENSIONS):
                for p in _read_manifest(item):
                    add(p)
            else:
                add(item)
        else:
            raise ValueError(f"input not found: {item!r} (expected a video file, a folder or a manifest)")
    return out


def resample_fps(frames, src_fps, fps):
    """Nearest-frame resampling of uint8 (T, H, W, 3) from `src_fps` to `fps`."""
    if fps is None or src_fps <= 0 or abs(src_fps - fps) < 1e-6:
        return frames, src_fps
    n = int(len(frames) * fps / src_fps)
    idx = np.minimum(np.round(np.arange(n) * src_fps / fps).astype(np.int64), len(frames) - 1)
    return frames[idx], float(fps)


def resize_center_crop(frames, size):
    """uint8 (T, H, W, 3) -> uint8 (T, h, w, 3): scale so (h, w) is covered (antialiased bilinear), then
    crop the centre."""
    h, w = size
    t, sh, sw, _ = frames.shape
    scale = max(h / sh, w / sw)
    rh, rw = max(h, round(sh * scale)), max(w, round(sw * scale))
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    if (rh, rw) != (sh, sw):
        x = torch.nn.functional.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - h) // 2, (rw - w) // 2
    x = x[:, :, top:top + h, left:left + w]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def clip_starts(num_frames, frames, stride=None, max_clips=None):
    """First frames of the clips of `frames` frames cut every `stride` frames (default: non-overlapping)."""
    stride = stride or frames
    starts = list(range(0, num_frames - frames + 1, stride))
    return starts[:max_clips] if max_clips else starts


def load_clips(path, frames=17, stride=None, max_clips=None, whole=False, size=None, fps=None, reader=None):
    """Decode `path` and cut it into clips. Returns (info, clips): info a dict (fps, source size, size,
    number of frames after resampling), clips a list of (first_frame, uint8 (T, H, W, 3)).

    Raises VideoError (a ValueError) for an unreadable video, one shorter than a clip, or (without
    `size`) one whose height or width is not a multiple of 8. `reader`: as `leanvae.video.read_video`."""
    raw, src_fps = read_video(path, reader=reader)
    source_size = [int(raw.shape[1]), int(raw.shape[2])]
    raw, out_fps = resample_fps(raw, src_fps, fps)
    if size is not None:
        raw = resize_center_crop(raw, size)
    elif raw.shape[1] % 8 or raw.shape[2] % 8:
        raise VideoError(f"{path}: frames of {raw.shape[1]}x{raw.shape[2]} are not multiples of 8 "
                         f"(pass --size HxW to resize and crop)")
    n = len(raw)
    if whole:
        t = 1 + 4 * ((n - 1) // 4) if n >= 1 else 0
        if t < 1:
            raise VideoError(f"{path}: no frames")
        clips = [(0, raw[:t])]
    else:
        if n < frames:
            raise VideoError(f"{path}: {n} frames{' at ' + str(fps) + ' fps' if fps else ''}, "
                             f"fewer than one clip of {frames}")
        clips = [(s, raw[s:s + frames]) for s in clip_starts(n, frames, stride, max_clips)]
    info = {"fps": out_fps, "source_size": source_size, "size": [int(raw.shape[1]), int(raw.shape[2])],
            "num_frames": n}
    return info, clips


class VideoClipDataset(torch.utils.data.Dataset):
    """Map-style dataset over videos: item i is (i, path, info, clips, error) for `videos[i]`, clips a list
    of (first_frame, uint8 tensor (T, H, W, 3)); a bad video gives error (its reason) and no clips instead of
    raising, so a DataLoader worker never dies on it. `tensors=False` gives the clips as numpy arrays.

    Forked DataLoader workers: the constructor leaves the calling thread's PyAV conversion context without a
    thread pool (`leanvae.video.release_conversion_threads`), which a forked worker would otherwise inherit
    without its threads and hang on; if this process converts frames with PyAV's own defaults after building
    the dataset, call that function again before iterating."""

    def __init__(self, videos, tensors=True, **clip_options):
        release_conversion_threads()
        self.videos = list(videos)
        self.tensors = tensors
        self.clip_options = clip_options

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        path = self.videos[i]
        try:
            info, clips = load_clips(path, **self.clip_options)
            # as tensors: a DataLoader worker hands those over in shared memory, where numpy arrays would be
            # pickled through a pipe (a 17x512x512 clip: about 4x the main process's time per item here)
            if self.tensors:
                clips = [(s, torch.from_numpy(np.ascontiguousarray(c))) for s, c in clips]
            return i, path, info, clips, None
        except (ValueError, OSError) as exc:  # VideoError is a ValueError
            return i, path, None, [], str(exc)
