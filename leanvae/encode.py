"""Encode a video dataset to latents: `python -m leanvae encode` and `encode_dataset()` behind it.

Layout of the output DIR:
  meta.json              checkpoint sha256, model config, package version, the options that shape latents
  shard-00000.safetensors ...  latents, one tensor per clip (latent_dim, 1+k, H/8, W/8); the shard's index
                         lines and errors ride in its safetensors metadata (key "leanvae"). Written as *.tmp and
                         renamed when complete, after its description (byte size, SHA-256, tensor table; see
                         `leanvae.shards`) is written to shard-00000.json
  shards.jsonl           one description per shard (merged from the shard-*.json files at the end)
  index.jsonl            one line per clip (merged from the shards at the end)
  errors.jsonl           one line per skipped input, with the reason
  encode.lock            while a run writes the DIR (one writer per DIR; every rank of one torchrun job is one)

A resume keeps a shard only when its size, SHA-256 and tensor table match its description and the
description is of this run; any other shard is said and encoded again.

Shards are groups of `videos_per_shard` consecutive videos of the sorted input list, independent of the
number of ranks: rank r of N writes shards r, r+N, ...; so 1 process and N ranks write the same bytes,
and a rerun (with any N) skips the shards already complete.
"""
import hashlib
import json
import math
import os
import sys
import time

import torch

from . import shards as sh
from .shards import EncodeError

__all__ = ["encode_dataset", "decode_dataset", "EncodeError", "read_index", "load_latent"]

# 2: shards are described (size, SHA-256, tensors) in shard-K.json / shards.jsonl; DIRs of 1 had no descriptions
FORMAT_VERSION = 2
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_FPS = 1000.0  # high-speed cameras record up to about 1000 fps; more is a typo
_MAX_SIDE = 16384  # pixels: twice 8K; a larger frame does not fit a GPU's memory in this model anyway


def _need(module, extra="encode"):
    try:
        return __import__(module)
    except ImportError:
        raise EncodeError(f"`leanvae {extra}` needs the {module} package: pip install {module}") from None


_sha256 = sh.file_sha256


def shard_name(k):
    return f"shard-{k:05d}.safetensors"


def _desc_name(k):
    return f"shard-{k:05d}.json"


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


def _is_ours(name):
    """Files of an encoded DIR that --overwrite deletes (the lock is not one: it is the run's own)."""
    return (name.startswith("shard-") or name in ("index.jsonl", "errors.jsonl", "meta.json", sh.SHARDS_INDEX)
            or name.endswith(".tmp"))


def _descriptions(out):
    """{shard name: description} known in DIR: shards.jsonl's lines, overridden by shard-K.json files (the
    newer: written by a run after the merge). An unreadable description counts as none."""
    descs = {}
    try:
        for d in sh.read_jsonl(os.path.join(out, sh.SHARDS_INDEX)):
            if isinstance(d.get("shard"), str):
                descs[d["shard"]] = d
    except (OSError, ValueError):
        pass
    for name in os.listdir(out):
        if name.startswith("shard-") and name.endswith(".json"):
            try:
                d = sh.read_json_file(os.path.join(out, name))
            except ValueError:
                continue
            if d.get("shard") == name[:-len(".json")] + ".safetensors":
                descs[d["shard"]] = d
    return descs


def _prepare_dir(out, meta, overwrite, run):
    """Rank 0, holding the lock: make DIR, refuse a DIR made with another checkpoint or options, write
    meta.json. Returns None, or the message of the refusal."""
    meta_path = os.path.join(out, "meta.json")
    if overwrite:
        for name in os.listdir(out):
            if _is_ours(name):
                os.remove(os.path.join(out, name))
    elif os.path.exists(meta_path):
        try:
            old = sh.read_json_file(meta_path)
        except ValueError as exc:
            # meta.json says what the shards were made with. Each shard's description carries the same as a
            # fingerprint, so when every shard there is described as this run's, meta.json can be rewritten
            descs = _descriptions(out)
            shard_files = [n for n in os.listdir(out) if n.startswith("shard-") and n.endswith(".safetensors")]
            if any(descs.get(n, {}).get("run") != run for n in shard_files):
                return (f"{exc}; it records what the shards in {out} were made with and they are not all described "
                        f"as made by this run: restore meta.json (e.g. from a copy), or use a new --out DIR, or "
                        f"--overwrite to start over")
            print(f"leanvae encode: {exc}; rewritten (the {len(shard_files)} shard(s) there are described as made "
                  f"by this same run)", file=sys.stderr)
            old = dict(meta)
        # DIRs written before the reader was recorded were decoded with PyAV, the only reader then
        old.setdefault("options", {})
        if isinstance(old["options"], dict):
            old["options"].setdefault("video_reader", "pyav")
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
                if key == "options" and isinstance(old[key], dict):
                    diff = sorted(k for k in set(old[key]) | set(meta[key]) if old[key].get(k) != meta[key].get(k))
                    detail = "; differing: " + ", ".join(f"{k} was {old[key].get(k)!r}, now {meta[key].get(k)!r}" for k in diff)
                elif key == "format_version":
                    detail = f" (format {old.get(key)!r}; this version writes {meta[key]})"
                return (f"{out} holds latents made with {what}{detail}. Use a new --out DIR, or --overwrite to "
                        f"delete them and start over")
    elif any(n.startswith("shard-") and n.endswith(".safetensors") for n in os.listdir(out)):
        return f"{out} has shard files but no meta.json; use a new --out DIR, or --overwrite to start over"
    for name in os.listdir(out):  # leftovers of an interrupted write never count as complete
        if name.endswith(".tmp"):
            os.remove(os.path.join(out, name))
    sh.write_file(meta_path, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return None


def _load_model(checkpoint, device, dtype, fused, tile_or_whole, model=None, tile_size=None):
    """The model of the checkpoint file `checkpoint` (or `model`, already read from it) ready to encode or
    decode on `device`. Strict: a checkpoint without weights, or whose tensors do not fit its 'args', is a
    one-line CheckpointError (a ValueError) from `leanvae.loading`."""
    from .loading import model_from_checkpoint

    if model is None:
        model = model_from_checkpoint(checkpoint)
    model = model.eval().to(device=device, dtype=dtype)
    if fused:
        import leanvae

        leanvae.use_fused_kernels(model)
    if tile_or_whole:
        model.set_tile_inference(True)
    if tile_size:
        model.enable_tiling(*tile_size)
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
    try:
        return sh.read_shard_metadata(path)
    except ValueError as exc:
        raise EncodeError(str(exc)) from None


def _write_shard(path, tensors, metadata, run, videos, n_errors):
    """Serialise the shard, write its description (shard-K.json), then the shard itself: a shard file
    exists only once its description does. Both are written atomically; a failure is one line."""
    from safetensors.torch import save

    name = os.path.basename(path)
    data = save(tensors, metadata=metadata)  # bytes: our own write, so a full disk is an OSError we can word
    desc = sh.describe_shard(name, data, tensors, run, videos, n_errors)
    desc_path = path[:-len(".safetensors")] + ".json"
    sh.write_file(desc_path, sh.description_line(desc) + "\n")
    try:
        sh.write_file(path, data)
    except EncodeError:
        try:  # harmless if left (a description without its shard is an unfinished one), but tidier gone
            os.remove(desc_path)
        except OSError:
            pass
        raise


def encode_dataset(inputs, out, checkpoint, *, frames=17, stride=None, max_clips_per_video=None, whole=False,
                   size=None, fps=None, dtype="float32", device=None, batch_size=1, fused=True, tile=False,
                   tile_size=None, videos_per_shard=16, workers=2, overwrite=False, quiet=False, reader=None):
    """Encode the videos in `inputs` (files, folders, manifests) to latents in `out` with `checkpoint`.

    Run by one process, or by each rank under torchrun. Bad inputs are skipped and listed in
    errors.jsonl (`summary["failures"]`; the CLI's --strict turns them into exit 1). Returns the summary
    dict (all ranks' totals) on every rank; raises ValueError for bad arguments and EncodeError for a run
    that cannot go on. `reader`: the video reader ('auto', 'pyav', 'opencv'; default $LEANVAE_VIDEO_READER,
    else auto: PyAV when installed, else OpenCV), recorded in meta.json: a DIR is only resumed with the same.
    """
    _need("safetensors")
    from . import __version__
    from .loading import parse_device, resolve_checkpoint
    from .data import VideoClipDataset, list_videos
    from .video import VideoError, video_reader

    # ---- arguments
    if not whole and (not isinstance(frames, int) or frames < 1 or frames % 4 != 1):
        raise ValueError(f"frames must be 1+4k (1, 5, 9, 17, ...), got {frames!r}")
    for name, v in (("stride", stride), ("max_clips_per_video", max_clips_per_video)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if fps is not None:
        # a frame rate beyond any camera's would resample every video to a huge, mostly repeated, frame list
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or not 0 < fps <= _MAX_FPS:
            raise ValueError(f"fps must be a finite number in (0, {_MAX_FPS}], got {fps!r}")
    if size is not None:
        size = tuple(int(v) for v in size)
        if len(size) != 2 or size[0] <= 0 or size[1] <= 0 or size[0] % 8 or size[1] % 8 or max(size) > _MAX_SIDE:
            raise ValueError(f"size must be (H, W), positive multiples of 8 up to {_MAX_SIDE}, got {size!r}")
    if tile_size is not None:  # exact spatial tiling (LeanVAE.enable_tiling): (H, W) pixels, multiples of 8
        tile_size = tuple(tile_size) if isinstance(tile_size, (tuple, list)) else (tile_size,)
        if len(tile_size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 8 or v % 8
                                      for v in tile_size):
            raise ValueError(f"tile_size must be (H, W), multiples of 8 pixels; the smallest allowed is (8, 8), "
                             f"got {tile_size!r}")
        if whole:
            raise ValueError("tile_size cannot be combined with whole (whole-video encoding reads frames chunk "
                             "by chunk and bypasses LeanVAE.encode)")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(videos_per_shard, int) or videos_per_shard < 1:
        raise ValueError(f"videos_per_shard must be a positive int, got {videos_per_shard!r}")
    checkpoint = resolve_checkpoint(checkpoint)  # CheckpointError (ValueError) of one line when not found
    try:  # once, here: every video of the run (and every DataLoader worker) decodes with the same reader
        reader = video_reader(reader)
    except VideoError as exc:
        raise EncodeError(f"cannot read videos: {exc}") from None
    videos = list_videos(inputs)
    if not videos:
        raise ValueError(f"no videos found in {list(inputs) if not isinstance(inputs, str) else inputs!r} "
                         f"(looked for {', '.join(e for e in __import__('leanvae.data').data.VIDEO_EXTENSIONS)})")

    dev = parse_device(device)  # one-line ValueError for an unknown device or one this machine lacks
    if dev.type == "cuda":  # each rank on its own GPU (cuda:LOCAL_RANK unless an index is given), before nccl starts
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    dist = _Dist(dev.type)
    tdtype = _DTYPES[dtype]
    try:
        return _run(videos, out, checkpoint, dist, dev, tdtype, locals(), __version__, VideoClipDataset)
    finally:
        dist.close()


def _run(videos, out, checkpoint, dist, dev, tdtype, a, version, VideoClipDataset):
    start_time = time.perf_counter()
    rank = dist.rank
    options = {k: a[k] for k in ("frames", "stride", "max_clips_per_video", "whole", "size", "fps", "dtype",
                                 "fused", "tile", "videos_per_shard", "reader")}
    if a["tile_size"]:  # recorded only when set, so DIRs written without it still resume
        options["tile_size"] = list(a["tile_size"])
    options["video_reader"] = options.pop("reader")
    options["size"] = list(options["size"]) if options["size"] else None
    if options["whole"]:
        options["frames"] = options["stride"] = options["max_clips_per_video"] = None
    n_shards = (len(videos) + a["videos_per_shard"] - 1) // a["videos_per_shard"]

    # ---- rank 0 takes the lock (one writer per DIR: the whole torchrun job is that one), checks and prepares
    # DIR, then every rank learns the verdict and the run's fingerprint
    msg, run, lock = None, None, None
    model = None
    if rank == 0:
        try:
            from .loading import CheckpointError, model_from_checkpoint, read_checkpoint

            ckpt_hash = _sha256(checkpoint)
            config, _ = read_checkpoint(checkpoint)
            # read (and refused: no weights, tensors that do not fit) before the DIR is touched
            model = model_from_checkpoint(checkpoint)
            meta = {"format_version": FORMAT_VERSION, "checkpoint": os.path.abspath(checkpoint),
                    "checkpoint_sha256": ckpt_hash, "model_config": json.loads(json.dumps(config, default=str)),
                    "leanvae_version": version, "torch_version": torch.__version__, "options": options,
                    "inputs_sha256": hashlib.sha256("\n".join(videos).encode()).hexdigest(),
                    "num_videos": len(videos), "num_shards": n_shards}
        except CheckpointError as exc:  # already one line, naming the file
            msg = str(exc)
        except OSError as exc:
            msg = f"cannot read checkpoint {checkpoint}: {sh.os_reason(exc)}"
        except Exception as exc:  # anything else the model build raised: said in one line, on every rank
            msg = f"cannot load checkpoint {checkpoint}: {exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0]}"
        if msg is None:
            try:
                os.makedirs(out, exist_ok=True)
                lock = sh.DirLock(out).acquire()
                run = sh.run_fingerprint(meta)
                msg = _prepare_dir(out, meta, a["overwrite"], run)
            except EncodeError as exc:
                msg = str(exc)
            except OSError as exc:
                msg = f"cannot prepare {out}: {sh.os_reason(exc)}" + (f" ({exc.filename})" if exc.filename else "")
        if msg and lock is not None:
            lock.release()
    msg, run = dist.broadcast((msg, run))
    if msg:
        raise EncodeError(msg)
    try:
        return _run_locked(videos, out, checkpoint, dist, dev, tdtype, a, options, n_shards, run, start_time,
                           VideoClipDataset, model)
    finally:
        if lock is not None:
            lock.release()


def _check_kept_shards(out, ks, run):
    """This rank's shards `ks` already in DIR: a shard is kept only when it is the one its description
    describes (size, SHA-256, tensor table) and the description is of this run; any other is said, removed
    with its description and encoded again. Returns (the shards to keep, how many were removed)."""
    descs = _descriptions(out)
    keep, redo = set(), 0
    for k in ks:
        path = os.path.join(out, shard_name(k))
        if not os.path.exists(path):
            continue
        try:
            why = sh.shard_problem(out, shard_name(k), descs.get(shard_name(k)), run)
        except OSError as exc:
            raise EncodeError(f"cannot read {path}: {sh.os_reason(exc)}; fix its permissions, or delete it so "
                              f"that a rerun encodes it again") from None
        if why is None:
            keep.add(k)
            continue
        redo += 1
        print(f"leanvae encode: {path}: {why}; encoding it again", file=sys.stderr)
        for p in (path, os.path.join(out, _desc_name(k))):
            try:
                if os.path.exists(p):
                    os.remove(p)
            except OSError as exc:
                raise EncodeError(f"cannot remove the damaged {p}: {sh.os_reason(exc)}; delete it by hand and "
                                  f"rerun") from None
    return keep, redo


def _run_locked(videos, out, checkpoint, dist, dev, tdtype, a, options, n_shards, run, start_time, VideoClipDataset,
                model):
    rank, world = dist.rank, dist.world
    # rank 0 read the model before preparing DIR; the other ranks read it now that it was found good
    model = _load_model(checkpoint, dev, tdtype, a["fused"], a["tile"] or a["whole"], model, a["tile_size"])

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
    mine = list(range(rank, n_shards, world))
    kept, n_redo = _check_kept_shards(out, mine, run)
    todo = [k for k in mine if k not in kept]
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
            if k in kept:
                records, errors = _read_shard_metadata(path)
                counts = [len(shard_videos), len(records), sum(rec["frames"] for rec in records), len(errors), 1]
            else:
                counts = _encode_shard(model, items, shard_videos, path, a, dev, tdtype, run)
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
    busy, n_redo = dist.sum([_ENCODE_SECONDS[0] / max(wall, 1e-9), n_redo])
    busy /= world

    # ---- rank 0 merges the index, the errors and the descriptions of all shards, in input order; then the
    # per-shard descriptions go (shards.jsonl holds them; a resume prefers a shard-K.json left by a later run)
    summary = None
    if rank == 0:
        index, errors, descs = [], [], []
        known = _descriptions(out)
        for k in range(n_shards):
            recs, errs = _read_shard_metadata(os.path.join(out, shard_name(k)))
            index += recs
            errors += errs
            descs.append(known[shard_name(k)])  # every shard was kept (described) or written with one
        sh.write_file(os.path.join(out, "index.jsonl"), "".join(json.dumps(r) + "\n" for r in index))
        sh.write_file(os.path.join(out, "errors.jsonl"), "".join(json.dumps(e) + "\n" for e in errors))
        sh.write_file(os.path.join(out, sh.SHARDS_INDEX), "".join(sh.description_line(d) + "\n" for d in descs))
        for k in range(n_shards):
            try:
                os.remove(os.path.join(out, _desc_name(k)))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise EncodeError(f"cannot remove {os.path.join(out, _desc_name(k))}: {sh.os_reason(exc)}") from None
        summary = {"device_busy_fraction": busy, "videos": len(videos), "clips": len(index), "frames": sum(r["frames"] for r in index),
                   "failures": len(errors), "shards": n_shards, "resumed_shards": int(totals[4]),
                   "reencoded_shards": int(n_redo),
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


def _encode_shard(model, items, shard_videos, path, a, dev, tdtype, run):
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
    _write_shard(path, tensors, _shard_metadata(records, errors), run,
                 (shard_videos[0], shard_videos[-1] + 1), len(errors))
    return [len(shard_videos), len(records), sum(r["frames"] for r in records), len(errors), 0]


def read_index(out):
    """The clips of an encoded DIR: a list of dicts, one per line of index.jsonl."""
    path = os.path.join(out, "index.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{out} has no index.jsonl: not an encoded dataset, or its run did not finish")
    return sh.read_jsonl(path)


def load_latent(out, record):
    """The latent tensor of one index record (unchecked: `decode_dataset` checks shards before reading)."""
    from safetensors import safe_open

    with safe_open(os.path.join(out, record["shard"]), framework="pt") as f:
        return f.get_tensor(record["key"])


class _CheckedReader:
    """Latents of DIR read against what the folder says they are: each shard once against its description
    (size, SHA-256, tensor table, made by the run meta.json records), each clip's index line against the
    shard's tensor table and the run's dtype and model config. Errors are one line naming clip and shard."""

    def __init__(self, out, meta):
        self.out, self.meta = out, meta
        self.run = sh.run_fingerprint(meta)
        self.descs = _descriptions(out)
        self.checked = {}
        self.dtype = (meta.get("options") or {}).get("dtype")
        self.latent_dim = (meta.get("model_config") or {}).get("latent_dim", 4)

    def load(self, rec):
        name, key = rec.get("shard"), rec.get("key")
        if not isinstance(name, str) or not isinstance(key, str):
            raise EncodeError(f"{self.out}/index.jsonl: a line without shard/key: {json.dumps(rec)[:120]}")
        path = os.path.join(self.out, name)
        if name not in self.checked:
            try:
                why = sh.shard_problem(self.out, name, self.descs.get(name), self.run)
            except OSError as exc:
                why = f"cannot read it: {sh.os_reason(exc)}"
            self.checked[name] = why
        why = self.checked[name]
        if why:
            raise EncodeError(f"{path} (clip {key}): {why}; `python -m leanvae verify {self.out}` lists all "
                              f"damage, and rerunning the encode command re-encodes damaged shards")
        bad = sh.record_problem(rec, self.descs[name], self.dtype, self.latent_dim)
        if bad:
            raise EncodeError(f"clip {key} in {path}: {bad}; the index does not describe this shard "
                              f"(`python -m leanvae verify {self.out}`)")
        z = load_latent(self.out, rec)
        if list(z.shape) != rec["latent_shape"] or str(z.dtype).replace("torch.", "") != rec["latent_dtype"]:
            raise EncodeError(f"clip {key} in {path}: read {z.dtype} {list(z.shape)}, the index says "
                              f"{rec['latent_dtype']} {rec['latent_shape']}")
        return z


@torch.no_grad()
def decode_dataset(out, videos_dir, checkpoint=None, limit=None, device=None, fused=True, quiet=False):
    """Decode stored latents of DIR `out` back to mp4 files in `videos_dir` (one per clip, named by key).
    Every latent is checked before it is decoded (see `_CheckedReader`). Returns the list of written paths."""
    _need("safetensors", "decode")
    from .loading import parse_device, resolve_checkpoint
    from .video import to_frames, write_video

    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be an int >= 0, got {limit!r}")
    records = read_index(out)
    if limit is not None:
        records = records[:limit]
    meta = sh.read_json_file(os.path.join(out, "meta.json"))  # every encoded DIR has one: it says what to expect
    if meta.get("format_version") != FORMAT_VERSION:
        raise EncodeError(f"{out}/meta.json: format_version {meta.get('format_version')!r}, this version reads "
                          f"{FORMAT_VERSION}: re-encode the folder with this version")
    if checkpoint is None:
        checkpoint = meta.get("checkpoint")
        if not isinstance(checkpoint, str):
            raise ValueError(f"{out}/meta.json records no checkpoint path: pass --checkpoint")
    dev = parse_device(device)
    checkpoint = resolve_checkpoint(checkpoint)
    if _sha256(checkpoint) != meta.get("checkpoint_sha256"):
        raise ValueError(f"{checkpoint} is not the checkpoint these latents were made with (its SHA-256 differs from "
                         f"the one in {out}/meta.json): decoding with it would give wrong videos; pass the checkpoint "
                         f"of the encode run with --checkpoint")
    reader = _CheckedReader(out, meta)
    model = _load_model(checkpoint, dev, torch.float32, fused, False)
    os.makedirs(videos_dir, exist_ok=True)
    written = []
    for rec in records:
        z = reader.load(rec).to(dev, torch.float32).unsqueeze(0)
        x = model.decode(z)
        path = os.path.join(videos_dir, rec["key"] + ".mp4")
        write_video(path, to_frames(x), rec["fps"])
        written.append(path)
        if not quiet:
            print(f"{rec['path']} [{rec['first_frame']}:{rec['first_frame'] + rec['frames']}] -> {path}")
    return written
