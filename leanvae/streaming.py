"""Reconstruct a video chunk by chunk: frames are decoded, encoded, decoded and written as they come.

Memory stays flat in the clip's length: at any time only one encoder chunk of input frames, the few latent
frames waiting for the decoder, one decoded chunk and the models' causal caches are held.

    with open_video(path) as src, VideoSink(out, src.fps, h, w) as sink:
        rec = StreamingReconstruction(model)
        for chunk in rec.feed(x): sink.write(...)
        for chunk in rec.finish(): sink.write(...)

`StreamingReconstruction` runs the model's own temporal tiling (`LeanVAE._build_chunk_index`: a first
chunk of `chunksize_enc` frames then chunks of `chunksize_enc - 1`; the decoder likewise with
`chunksize_dec` latent frames) through the causal caches of its `PEG3D` modules, with the encoder's and the
decoder's "first chunk" flags set separately so the two can interleave. Its output is the concatenation of
what `model.decode(model.encode(x))` returns with tile inference on, chunk for chunk the same calls.
"""
import os

import numpy as np
import torch

from .video import _INSTALL, VideoError, _import, _resolve, encoder_frame, sws_options


def _set_first_chunk(roots, first):
    for root in roots:
        for module in root.modules():
            if hasattr(module, "is_first_chunk"):
                module.is_first_chunk = first


class StreamingReconstruction:
    """Encode then decode a video fed in pieces of any length; returns reconstructed pieces as they complete.

    `chunk_frames`: frames per encoder chunk, 1+4k (the first chunk; later ones have one frame less, as in
    the model's tiling), with decoder chunks of the matching 1+(chunk_frames-1)/4 latent frames; None: the
    model's `chunksize_enc` and `chunksize_dec`. Peak memory grows with it; the result changes only by
    float rounding (the tiled and untiled model agree to about 1e-7 relative).

    `feed(x)`: x (B, 3, n, H, W) on the model's device and dtype, any n >= 0; returns a list of decoded
    chunks (B, 3, m, H, W) in order. `finish()`: runs what is left (the frames after the last whole chunk,
    cut to 4k, or 1+4k if no chunk ran yet; `dropped` says how many were cut) and returns the last chunks.
    The model's tile-inference switch is on while streaming and restored by `finish()` (or `close()`).
    """

    def __init__(self, model, chunk_frames=None):
        self.model = model
        if chunk_frames is None:  # the model's own chunk sizes (validated here, ValueError naming them)
            model._build_chunk_index(T=1, mtype="enc")
            model._build_chunk_index(T=1, mtype="dec")
            self.chunk_enc, self.chunk_dec = model.chunksize_enc, model.chunksize_dec
        else:
            if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 5 or chunk_frames % 4 != 1:
                raise ValueError(f"chunk_frames must be 1+4k frames with k >= 1 (5, 9, 13, ...), got {chunk_frames!r}")
            # the decoder's chunk holds the latent frames of one encoder chunk: output comes in the same sizes
            self.chunk_enc, self.chunk_dec = chunk_frames, 1 + (chunk_frames - 1) // 4
        self._encode_side = (model.dwt, model.encoder)
        self._decode_side = (model.latent_bottleneck, model.decoder, model.idwt)
        self._was_tiled = bool(model.tile_inference)
        model.set_tile_inference(True)
        self._frames, self._n_frames = [], 0      # input frames waiting for a whole encoder chunk
        self._latents, self._n_latents = [], 0    # latent frames (B, t, h, w, d) waiting for the decoder
        self._enc_first = self._dec_first = True
        self.frames_in = self.frames_encoded = self.frames_out = self.dropped = 0
        self._closed = False

    # --------------------------------------------------------------------------------------- internals
    @staticmethod
    def _take(parts, count, dim):
        joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
        head, rest = joined.narrow(dim, 0, count), joined.narrow(dim, count, joined.shape[dim] - count)
        return head, ([rest] if rest.shape[dim] else [])

    def _encode(self, count):
        chunk, self._frames = self._take(self._frames, count, dim=2)
        self._n_frames -= count
        _set_first_chunk(self._encode_side, self._enc_first)
        self._enc_first = False
        p = self.model.encoder.encode(x=self.model.dwt(chunk))
        z = self.model.latent_bottleneck.sample(p)  # (B, t, h, w, d), as LeanVAE.encode before its permute
        self.frames_encoded += count
        self._latents.append(z)
        self._n_latents += z.shape[1]

    def _decode(self, count):
        z, self._latents = self._take(self._latents, count, dim=1)
        self._n_latents -= count
        # A first chunk of one latent frame is a one-frame clip (a first chunk is otherwise chunksize_dec >= 2
        # frames): the decoder's video path cannot run on it, its image path is the model's own answer.
        is_image = self._dec_first and count == 1
        _set_first_chunk(self._decode_side, self._dec_first)
        self._dec_first = False
        p_rec = self.model.latent_bottleneck.recon(z)
        out = self.model.idwt(x=self.model.decoder.decode(p_rec, is_image=is_image))
        if is_image:
            out = out.unsqueeze(2)
        self.frames_out += out.shape[2]
        return out

    # ---------------------------------------------------------------------------------------- public
    @torch.no_grad()
    def feed(self, x):
        if self._closed:
            raise RuntimeError("StreamingReconstruction: feed() after finish()")
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"StreamingReconstruction.feed: x must be (B, 3, n, H, W), got shape {tuple(x.shape)}")
        if x.shape[2]:
            self._frames.append(x)
            self._n_frames += x.shape[2]
            self.frames_in += x.shape[2]
        out = []
        while True:
            need = self.chunk_enc if self._enc_first else self.chunk_enc - 1
            if self._n_frames < need:
                break
            self._encode(need)
            out += self._decode_ready(final=False)
        return out

    def _decode_ready(self, final):
        out = []
        while self._n_latents:
            need = self.chunk_dec if self._dec_first else self.chunk_dec - 1
            if self._n_latents < need and not final:
                break
            out.append(self._decode(min(need, self._n_latents)))
        return out

    @torch.no_grad()
    def finish(self):
        if self._closed:
            return []
        try:
            if self._n_frames:
                usable = (1 + 4 * ((self._n_frames - 1) // 4)) if self._enc_first else 4 * (self._n_frames // 4)
                self.dropped += self._n_frames - usable
                if usable:
                    self._encode(usable)
                self._frames, self._n_frames = [], 0
            return self._decode_ready(final=True)
        finally:
            self.close()

    def close(self):
        """Restore the model's tile-inference switch and first-chunk flags; drop any buffered frames."""
        if not self._closed:
            self._closed = True
            self._frames, self._latents = [], []
            self.model.set_tile_inference(self._was_tiled)
            self.model._set_first_chunk(True)


# ------------------------------------------------------------------------------------------ video I/O
class VideoSource:
    """Frames of a video file, one at a time: `fps`, `height`, `width`, `count` (from the container; exact
    for MP4/MOV, else counted by demuxing packets or estimated by OpenCV) and iteration over uint8 (H, W, 3)
    RGB frames. VideoError for a file that cannot be opened. Use as a context manager."""

    def __init__(self, path, reader=None):
        self.path = os.fspath(path)
        self.lib = _resolve(reader, "reader")
        self._container = self._cap = None
        if not os.path.isfile(self.path):
            raise VideoError(f"{self.path}: cannot decode video (no such file)")
        try:
            if self.lib == "pyav":
                self._open_pyav()
            else:
                self._open_opencv()
        except VideoError:
            self.close()
            raise
        except Exception as exc:  # PyAV's and OpenCV's own error classes
            self.close()
            raise VideoError(f"{self.path}: cannot decode video ({exc.__class__.__name__}: {exc})") from None

    def _open_pyav(self):
        av = _import("av")
        self._container = av.open(self.path)
        if not self._container.streams.video:
            raise VideoError(f"{self.path}: no video stream")
        stream = self._container.streams.video[0]
        self.fps = float(stream.average_rate) if stream.average_rate else 24.0
        self.height, self.width = stream.codec_context.height, stream.codec_context.width
        count = stream.frames
        if not count:  # containers without a frame count (WebM, some MKV): count packets, decoding nothing
            with av.open(self.path) as probe:
                count = sum(1 for packet in probe.demux(probe.streams.video[0]) if packet.size)
        self.count = int(count)

    def _open_opencv(self):
        cv2 = _import("cv2")
        self._cap = cv2.VideoCapture(self.path, cv2.CAP_FFMPEG)
        if not self._cap.isOpened():
            raise VideoError(f"{self.path}: cannot decode video (OpenCV could not open it)")
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and fps > 0 else 24.0
        self.height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        count = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.count = int(count) if count and np.isfinite(count) and count > 0 else 0

    def __iter__(self):
        try:
            if self.lib == "pyav":
                sws = sws_options(_import("av"))
                for frame in self._container.decode(self._container.streams.video[0]):
                    yield frame.to_ndarray(format="rgb24", **sws)
            else:
                cv2 = _import("cv2")
                while True:
                    ok, frame = self._cap.read()
                    if not ok or frame is None:
                        break
                    yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        except VideoError:
            raise
        except Exception as exc:
            raise VideoError(f"{self.path}: cannot decode video ({exc.__class__.__name__}: {exc})") from None

    def close(self):
        if self._container is not None:
            self._container.close()
            self._container = None
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class VideoSink:
    """Write uint8 (n, H, W, 3) RGB frames to `path` as they come, with `write_video`'s codecs and quality.

    Frames go to a temporary name in the same folder, renamed to `path` only by a clean `close()` (the end
    of a `with` block without an exception), so an interrupted run never leaves a file that looks finished.
    """

    def __init__(self, path, fps, height, width, writer=None):
        self.path = os.fspath(path)
        self.lib = _resolve(writer or "auto", "writer")
        folder, name = os.path.split(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise VideoError(f"{self.path}: folder {folder} does not exist")
        stem, ext = os.path.splitext(name)
        self._tmp = os.path.join(folder, f".{stem}.partial-{os.getpid()}{ext}")
        self.height, self.width, self.frames = height, width, 0
        self._container = self._stream = self._out = None
        rate = max(1, round(fps))
        try:
            if self.lib == "pyav":
                av = _import("av")
                self._container = av.open(self._tmp, mode="w")
                codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
                self._stream = self._container.add_stream(codec, rate=rate)
                self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
                if codec == "libx264":
                    self._stream.options = {"crf": "10"}
            else:
                cv2 = _import("cv2")
                fourcc = "MJPG" if self._tmp.lower().endswith(".avi") else "mp4v"
                self._out = cv2.VideoWriter(self._tmp, cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), float(rate),
                                            (width, height))
                if not self._out.isOpened():
                    raise VideoError(f"{self.path}: OpenCV cannot write this video (codec {fourcc}, {width}x{height}); "
                                     f"PyAV can: {_INSTALL['pyav']}")
        except BaseException as exc:
            self._abort()
            if isinstance(exc, VideoError):
                raise
            if isinstance(exc, Exception):
                raise VideoError(f"{self.path}: cannot write video ({exc.__class__.__name__}: {exc})") from None
            raise

    def write(self, frames):
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"VideoSink.write: frames must be uint8 (n, {self.height}, {self.width}, 3), "
                             f"got {frames.dtype} {tuple(frames.shape)}")
        try:
            if self.lib == "pyav":
                av = _import("av")
                for f in frames:
                    for packet in self._stream.encode(encoder_frame(av, f)):
                        self._container.mux(packet)
            else:
                cv2 = _import("cv2")
                for f in frames:
                    self._out.write(cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2BGR))
        except (ValueError, TypeError):
            raise
        except Exception as exc:
            raise VideoError(f"{self.path}: cannot write video ({exc.__class__.__name__}: {exc})") from None
        self.frames += len(frames)

    def close(self):
        """Finish the file and move it to `path`."""
        try:
            if self.lib == "pyav":
                for packet in self._stream.encode():
                    self._container.mux(packet)
                self._container.close()
                self._container = None
            else:
                self._out.release()
                self._out = None
                if not os.path.isfile(self._tmp) or os.path.getsize(self._tmp) == 0:
                    raise VideoError(f"{self.path}: OpenCV wrote no video")
            os.replace(self._tmp, self.path)
        except BaseException as exc:
            self._abort()
            if isinstance(exc, Exception) and not isinstance(exc, VideoError):
                raise VideoError(f"{self.path}: cannot write video ({exc.__class__.__name__}: {exc})") from None
            raise

    def _abort(self):
        try:
            if self._container is not None:
                self._container.close()
            if self._out is not None:
                self._out.release()
        except Exception:  # already failing: the temporary file is removed below either way
            pass
        self._container = self._out = None
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._abort()
