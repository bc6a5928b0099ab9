"""Encode a video dataset to latents: `python -m leanvae encode` and `encode_dataset()` behind it.

Layout of the output DIR:
  meta.json              checkpoint sha256, model config, package version, the options that shape latents
  shard-00000.safetensors ...  latents, one tensor per clip (latent_dim, 1+k, H/8, W/8); the shard's index
                         lines and errors ride in its safetensors metadata (key "leanvae"), so a shard is complete exactly
                         when its file exists (written as *.tmp, renamed when complete)
  index.jsonl            one line per clip (merged from the shards at the end)
  errors.jsonl           one line per skipped input, with the reason

Shards are groups of `videos_per_shard` consecutive videos of the sorted input list, independent of the
number of ranks: rank r of N writes shards r, r+N, ...; so 1 process and N ranks write the same bytes,
and a rerun (with any N) skips the shards already complete.
"""
import hashlib
import json
import os
import sys
import time

import torch

__all__ = ["encode_dataset", "decode_dataset", "EncodeError"]

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EncodeError(RuntimeError):
    """A run that cannot go on (mismatched output DIR, disk full, permissions); the message says why."""


def _need(module, extra="encode"):
    try:
        return __import__(module)
    except ImportError:
        raise EncodeError(f"`leanvae {extra}` needs the {module} package: pip install {module}") from None


def _sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def _atomic_write_text(path, text):
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def shard_name(k):
    return f"shard-{k:05d}.safetensors"


class _Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process, no group."""

    def __init__(self, device_type):
        import torch.distributed as dist

        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        self.device_type = device_type
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
            self.owned = True
        if dist.is_available() and dist.is_initialized():
            self.world, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def active(self):
        return self.world > 1

    def _dev(self):
        return torch.device("cuda", torch.cuda.current_device()) if self.device_type == "cuda" else torch.device("cpu")

    def sum(self, values):
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._dev())
        self.dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        if not self.active:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.active:
            self.dist.barrier()

    def close(self):
        if self.owned:
            self.dist.destroy_process_group()


def _prepare_dir(out, meta, overwrite, n_shards):
    """Rank 0: make DIR, refuse a DIR made with another checkpoint or options, write meta.json.
    Returns None, or the message of the refusal."""
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    if overwrite:
        for name in os.listdir(out):
            if name.startswith("shard-") or name in ("index.jsonl", "errors.jsonl", "meta.json") or name.endswith(".tmp"):
                os.remove(os.path.join(out, name))
    elif os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        # DIRs written before the reader was recorded were decoded with PyAV, the only reader then
        old.setdefault("options", {}).setdefault("video_reader", "pyav")
        was, now = old["options"]["video_reader"], meta["options"]["video_reader"]
        if was != now:
            return (f"{out} holds latents of videos decoded with the {was!r} video reader, and this run would "
                    f"decode with {now!r}: the two convert colours differently, so its latents would not match "
                    f"the shards already there. Resume with the same reader (install it, or set "
                    f"LEANVAE_VIDEO_READER={was}), or use a new --out DIR, or --overwrite to start over")
        for key in ("format_version", "checkpoint_sha256", "model_config", "options", "inputs_sha256"):
            if old.get(key) != meta.get(key):
                what = {"checkpoint_sha256": "another checkpoint", "inputs_sha256": "another list of inputs",
                        "model_config": "another model config", "options": "other options"}.get(key, "another format")
                detail = ""
                if key == "options":
                    diff = sorted(k for k in set(old[key]) | set(meta[key]) if old[key].get(k) != meta[key].get(k))
                    detail = "; differing: " + ", ".join(f"{k} was {old[key].get(k)!r}, now {meta[key].get(k)!r}" for k in diff)
                return (f"{out} holds latents made with {what}{detail}. Use a new --out DIR, or --overwrite to "
                        f"delete them and start over")
    elif any(n.startswith("shard-") for n in os.listdir(out)):
        return f"{out} has shard files but no meta.json; use a new --out DIR, or --overwrite to start over"
    for name in os.listdir(out):  # leftovers of an interrupted write never count as complete
        if name.endswith(".tmp"):
            os.remove(os.path.join(out, name))
    _atomic_write_text(meta_path, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return None


def _load_model(checkpoint, device, dtype, fused, tile_or_whole):
    from .loading import load_model

    model = load_model(checkpoint, device="cpu")
    model = model.to(device=device, dtype=dtype)
    if fused:
        import leanvae

        leanvae.use_fused_kernels(model)
    if tile_or_whole:
        model.set_tile_inference(True)
    return model


def _to_input(clips, device, dtype):
    """uint8 [(T, H, W, 3)] -> (B, 3, T, H, W) in [-0.5, 0.5], as `leanvae.video.to_model_input`."""
    # uint8 to the device first (a quarter of float32's bytes), stacked there: no host-side copy of the batch
    x = torch.stack([torch.as_tensor(c).to(device) for c in clips])
    x = x.permute(0, 4, 1, 2, 3).float() / 255.0 - 0.5
    return x.to(dtype)


@torch.no_grad()
def _encode_whole(model, frames, device, dtype):
    """Every frame of a video, chunk by chunk through the causal cache (the model's tiled encode, one
    chunk on the device at a time): equals `model.encode` with tile inference on the whole clip."""
    zs = []
    for idx, (s, e) in enumerate(model._build_chunk_index(T=len(frames), mtype="enc")):
        model._set_first_chunk(idx == 0)
        x = _to_input([frames[s:e]], device, dtype)
        zs.append(model.latent_bottleneck.sample(model.encoder.encode(x=model.dwt(x))))
    return torch.cat(zs, dim=1).permute(0, 4, 1, 2, 3)


def _shard_metadata(records, errors):
    # one key: safetensors keeps metadata in a hash map, so several keys would be written in varying
    # order and the same shard would not be the same bytes from run to run
    return {"leanvae": json.dumps({"format": "leanvae-latents", "format_version": FORMAT_VERSION,
                                   "index": records, "errors": errors})}


def _read_shard_metadata(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        md = f.metadata() or {}
    if "leanvae" not in md:
        raise EncodeError(f"{path} is not a shard written by `leanvae encode` (no 'leanvae' metadata)")
    md = json.loads(md["leanvae"])
    return md["index"], md["errors"]


def _write_shard(path, tensors, metadata):
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise EncodeError(f"cannot write {path}: {exc.strerror or exc} (disk full or no permission?); "
                          f"the run stopped, completed shards are kept and a rerun resumes") from exc


def encode_dataset(inputs, out, checkpoint, *, frames=17, stride=None, max_clips_per_video=None, whole=False,
                   size=None, fps=None, dtype="float32", device=None, batch_size=1, fused=True, tile=False,
                   videos_per_shard=16, workers=2, overwrite=False, quiet=False, reader=None):
    """Encode the videos in `inputs` (files, folders, manifests) to latents in `out` with `checkpoint`.

    Run by one process, or by each rank under torchrun. Bad inputs are skipped and listed in
    errors.jsonl (`summary["failures"]`; the CLI's --strict turns them into exit 1). Returns the summary
    dict (all ranks' totals) on every rank; raises ValueError for bad arguments and EncodeError for a run
    that cannot go on. `reader`: the video reader ('auto', 'pyav', 'opencv'; default $LEANVAE_VIDEO_READER,
    else auto: PyAV when installed, else OpenCV), recorded in meta.json: a DIR is only resumed with the same.
    """
    _need("safetensors")
    from . import __version__
    from .data import VideoClipDataset, list_videos
    from .video import VideoError, video_reader

    # ---- arguments
    if not whole and (not isinstance(frames, int) or frames < 1 or frames % 4 != 1):
        raise ValueError(f"frames must be 1+4k (1, 5, 9, 17, ...), got {frames!r}")
    for name, v in (("stride", stride), ("max_clips_per_video", max_clips_per_video), ("fps", fps)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be positive, got {v!r}")
    if size is not None:
        size = tuple(int(v) for v in size)
        if len(size) != 2 or size[0] <= 0 or size[1] <= 0 or size[0] % 8 or size[1] % 8:
            raise ValueError(f"size must be (H, W), positive multiples of 8, got {size!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(videos_per_shard, int) or videos_per_shard < 1:
        raise ValueError(f"videos_per_shard must be a positive int, got {videos_per_shard!r}")
    from .loading import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)  # a file, a folder, a Hub file or a short name -> a local file
    try:  # once, here: every video of the run (and every DataLoader worker) decodes with the same reader
        reader = video_reader(reader)
    except VideoError as exc:
        raise EncodeError(f"cannot read videos: {exc}") from None
    videos = list_videos(inputs)
    if not videos:
        raise ValueError(f"no videos found in {list(inputs) if not isinstance(inputs, str) else inputs!r} "
                         f"(looked for {', '.join(e for e in __import__('leanvae.data').data.VIDEO_EXTENSIONS)})")

    dev_type = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_type == "cuda":  # each rank on its own GPU, set before nccl starts
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local_rank if device in (None, "cuda") else torch.device(device).index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device or "cpu")
    dist = _Dist(dev_type)
    tdtype = _DTYPES[dtype]
    try:
        return _run(videos, out, checkpoint, dist, dev, tdtype, locals(), __version__, VideoClipDataset)
    finally:
        dist.close()


def _run(videos, out, checkpoint, dist, dev, tdtype, a, version, VideoClipDataset):
    start_time = time.perf_counter()
    rank, world = dist.rank, dist.world
    options = {k: a[k] for k in ("frames", "stride", "max_clips_per_video", "whole", "size", "fps", "dtype",
                                 "fused", "tile", "videos_per_shard", "reader")}
    options["video_reader"] = options.pop("reader")
    options["size"] = list(options["size"]) if options["size"] else None
    if options["whole"]:
        options["frames"] = options["stride"] = options["max_clips_per_video"] = None
    n_shards = (len(videos) + a["videos_per_shard"] - 1) // a["videos_per_shard"]

    # ---- rank 0 checks and prepares DIR; every rank learns the verdict
    msg = None
    model = None
    if rank == 0:
        try:
            ckpt_hash = _sha256(checkpoint)
            ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
            config = dict(ckpt.get("args", {})) if isinstance(ckpt, dict) else {}
            meta = {"format_version": FORMAT_VERSION, "checkpoint": os.path.abspath(checkpoint),
                    "checkpoint_sha256": ckpt_hash, "model_config": json.loads(json.dumps(config, default=str)),
                    "leanvae_version": version, "torch_version": torch.__version__, "options": options,
                    "inputs_sha256": hashlib.sha256("\n".join(videos).encode()).hexdigest(),
                    "num_videos": len(videos), "num_shards": n_shards}
            msg = _prepare_dir(out, meta, a["overwrite"], n_shards)
        except OSError as exc:
            msg = f"cannot prepare {out}: {exc}"
        except Exception as exc:  # unreadable checkpoint
            msg = f"cannot read checkpoint {checkpoint}: {exc.__class__.__name__}: {exc}"
    msg = dist.broadcast(msg)
    if msg:
        raise EncodeError(msg)
    try:
        model = _load_model(checkpoint, dev, tdtype, a["fused"], a["tile"] or a["whole"])
    except Exception as exc:
        raise EncodeError(f"cannot load checkpoint {checkpoint}: {exc}") from exc

    setup_s = time.perf_counter() - start_time
    start_time = time.perf_counter()  # throughput counts from here: checkpoint hashing and model load excluded

    # ---- this rank's shards: k = rank, rank + world, ...; all ranks run the same number of rounds
    vps = a["videos_per_shard"]
    rounds = (n_shards + world - 1) // world
    clip_options = dict(frames=a["frames"], stride=a["stride"], max_clips=a["max_clips_per_video"],
                        whole=a["whole"], size=a["size"], fps=a["fps"], reader=a["reader"])
    bar = None
    if rank == 0 and not a["quiet"]:
        tqdm = _need("tqdm").tqdm
        bar = tqdm(total=len(videos), unit="video", desc="encode", file=sys.stderr, dynamic_ncols=True)
    _ENCODE_SECONDS[0] = 0.0
    totals = [0.0, 0.0, 0.0, 0.0, 0.0]  # videos, clips, frames, failures, skipped (complete) shards
    # one DataLoader over the videos of all this rank's incomplete shards, in order: its workers decode
    # ahead across shard boundaries, so the device does not wait for frames at the start of each shard
    todo = [k for k in range(rank, n_shards, world) if not os.path.exists(os.path.join(out, shard_name(k)))]
    workers = min(a["workers"], len(todo) * vps)
    # tensors cross from the workers through shared memory (/dev/shm); where it is small (containers often
    # give 64 MB) they would fail there, so numpy arrays, pickled through the pipe, are sent instead
    ds = VideoClipDataset([videos[i] for k in todo for i in range(k * vps, min((k + 1) * vps, len(videos)))],
                          tensors=workers > 0 and _shm_room(workers * 4 * _clip_bytes(clip_options)), **clip_options)
    workers = min(workers, len(ds))
    items = iter(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                             collate_fn=_identity, prefetch_factor=4 if workers else None))
    for r in range(rounds):
        k = r * world + rank
        counts = [0, 0, 0, 0, 0]
        if k < n_shards:
            path = os.path.join(out, shard_name(k))
            shard_videos = list(range(k * vps, min((k + 1) * vps, len(videos))))
            if os.path.exists(path):
                records, errors = _read_shard_metadata(path)
                counts = [len(shard_videos), len(records), sum(rec["frames"] for rec in records), len(errors), 1]
            else:
                counts = _encode_shard(model, items, shard_videos, path, a, dev, tdtype)
        g = dist.sum(counts)
        totals = [t + c for t, c in zip(totals, g)]
        if bar is not None:
            el = max(time.perf_counter() - start_time, 1e-9)
            bar.set_postfix_str(f"{totals[1] / el:.2f} clips/s, {totals[2] / el:.1f} frames/s, "
                                f"{int(totals[3])} failed", refresh=False)
            bar.update(int(g[0]))
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start_time
    busy = dist.sum([_ENCODE_SECONDS[0] / max(wall, 1e-9)])[0] / world

    # ---- rank 0 merges the index and the errors of all shards, in input order
    summary = None
    if rank == 0:
        index, errors = [], []
        for k in range(n_shards):
            recs, errs = _read_shard_metadata(os.path.join(out, shard_name(k)))
            index += recs
            errors += errs
        try:
            _atomic_write_text(os.path.join(out, "index.jsonl"), "".join(json.dumps(r) + "\n" for r in index))
            _atomic_write_text(os.path.join(out, "errors.jsonl"), "".join(json.dumps(e) + "\n" for e in errors))
        except OSError as exc:
            raise EncodeError(f"cannot write the index in {out}: {exc}") from exc
        summary = {"device_busy_fraction": busy, "videos": len(videos), "clips": len(index), "frames": sum(r["frames"] for r in index),
                   "failures": len(errors), "shards": n_shards, "resumed_shards": int(totals[4]),
                   "ranks": world, "setup_s": setup_s, "wall_s": wall, "reader": a["reader"], "workers": workers,
                   "clips_per_s": totals[1] / wall, "frames_per_s": totals[2] / wall}
    return dist.broadcast(summary)


_ENCODE_SECONDS = [0.0]  # time spent in model calls on this rank (device busy), for the summary's
# device_busy_fraction: decoding (in the DataLoader workers), input upload and shard writing are outside


def _timed_call(dev, fn, *args):
    """fn(*args), its time added to this rank's model-call seconds. On CUDA the device is synchronised
    before and after, so the time is the device's work for this call (kernels are asynchronous: without
    the second synchronisation only the launches would be counted), not the host's queueing of it."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = fn(*args)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    _ENCODE_SECONDS[0] += time.perf_counter() - t0
    return out


def _clip_bytes(clip_options):
    """A guess at one item's bytes: one clip at the size asked for, else at 1080p (whole: 65 frames)."""
    h, w = clip_options["size"] or (1080, 1920)
    return (65 if clip_options["whole"] else clip_options["frames"]) * h * w * 3


def _shm_room(nbytes):
    """Whether /dev/shm has room for `nbytes` (the items in flight) with a margin."""
    import shutil

    try:
        return shutil.disk_usage("/dev/shm").free >= 2 * nbytes + (256 << 20)
    except OSError:
        return False


def _identity(item):
    return item


def _encode_shard(model, items, shard_videos, path, a, dev, tdtype):
    """Encode the next len(shard_videos) videos from the loader iterator `items` (videos
    `shard_videos`, indices into the input list) into the shard file `path`.
    Returns [videos, clips, frames, failures, 0]."""
    tensors, records, errors = {}, [], []
    for vidx in shard_videos:
        _, vpath, info, clips, err = next(items)
        if err is not None:
            errors.append({"path": vpath, "video": vidx, "reason": err})
            continue
        zs = []
        try:
            if a["whole"]:
                zs.append(_timed_call(dev, _encode_whole, model, clips[0][1], dev, tdtype))
            else:
                for b in range(0, len(clips), a["batch_size"]):
                    x = _to_input([c for _, c in clips[b:b + a["batch_size"]]], dev, tdtype)
                    with torch.no_grad():
                        zs.append(_timed_call(dev, model.encode, x))
        except (ValueError, TypeError) as exc:  # the model refused these frames
            errors.append({"path": vpath, "video": vidx, "reason": f"{vpath}: {exc}"})
            continue
        z = torch.cat(zs).cpu()
        for c, ((first, frames), zc) in enumerate(zip(clips, z)):
            key = f"v{vidx:08d}_c{c:05d}"
            tensors[key] = zc.contiguous()
            records.append({"path": vpath, "video": vidx, "clip": c, "first_frame": int(first),
                            "frames": int(len(frames)), "fps": info["fps"], "size": info["size"],
                            "source_size": info["source_size"], "latent_shape": list(zc.shape),
                            "latent_dtype": str(zc.dtype).replace("torch.", ""),
                            "shard": os.path.basename(path), "key": key})
    _write_shard(path, tensors, _shard_metadata(records, errors))
    return [len(shard_videos), len(records), sum(r["frames"] for r in records), len(errors), 0]


def read_index(out):
    """The clips of an encoded DIR: a list of dicts, one per line of index.jsonl."""
    path = os.path.join(out, "index.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{out} has no index.jsonl: not an encoded dataset, or its run did not finish")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_latent(out, record):
    """The latent tensor of one index record."""
    from safetensors import safe_open

    with safe_open(os.path.join(out, record["shard"]), framework="pt") as f:
        return f.get_tensor(record["key"])


@torch.no_grad()
def decode_dataset(out, videos_dir, checkpoint=None, limit=None, device=None, fused=True, quiet=False):
    """Decode stored latents of DIR `out` back to mp4 files in `videos_dir` (one per clip, named by key).
    Returns the list of written paths."""
    _need("safetensors", "decode")
    from .video import to_frames, write_video

    records = read_index(out)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        records = records[:limit]
    if checkpoint is None:
        with open(os.path.join(out, "meta.json")) as f:
            checkpoint = json.load(f)["checkpoint"]
    from .loading import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)  # a file, a folder, a Hub file or a short name -> a local file
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _load_model(checkpoint, dev, torch.float32, fused, False)
    os.makedirs(videos_dir, exist_ok=True)
    written = []
    for rec in records:
        z = load_latent(out, rec).to(dev, torch.float32).unsqueeze(0)
        x = model.decode(z)
        path = os.path.join(videos_dir, rec["key"] + ".mp4")
        write_video(path, to_frames(x), rec["fps"])
        written.append(path)
        if not quiet:
            print(f"{rec['path']} [{rec['first_frame']}:{rec['first_frame'] + rec['frames']}] -> {path}")
    return written
