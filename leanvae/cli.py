"""Command line: `python -m leanvae {info,check,bench,reconstruct,encode,decode,verify,convert}`."""
import argparse
import os
import platform
import sys


def _version(name):
    try:
        mod = __import__(name)
        return getattr(mod, "__version__", "installed")
    except Exception as exc:  # not installed, or broken
        return f"not available ({exc.__class__.__name__})"


def cmd_info(args):
    import torch

    import leanvae_kernels
    from leanvae_kernels import _backend, _native, _triton

    try:
        setting = _backend.get_backend()
    except ValueError as exc:  # a bad LEANVAE_KERNELS_BACKEND: the message says what is allowed
        print(f"leanvae info: {exc}", file=sys.stderr)
        return 2
    out = []
    out.append("leanvae-kernels " + leanvae_kernels.__version__)
    out.append(f"  python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, numpy {_version('numpy')}")
    out.append(f"  cpu: {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            out.append(f"  cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}), torch CUDA {torch.version.cuda}")
    else:
        out.append("  cuda: no device visible to torch")
    out.append(f"  backend setting: {setting} (set_backend() or {_backend.ENV_VAR})")
    out.append("native modules:")
    for backend in ("cpu", "cuda"):
        built, text = _native.build_info(backend)
        mod, reason = _native.module(backend)
        state = "usable" if mod is not None else f"not usable: {reason}"
        out.append(f"  {backend}: {'built (' + text + ')' if built else 'not built: ' + text}")
        out.append(f"       {state}")
    out.append("triton:")
    for dev in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
        out.append(f"  {dev}: {_triton.status(dev)[1]}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out.append("ops (backends usable now, by device; 'auto' takes the first):")
    ops = [op for op in _backend.ALL_OPS if not op.name.endswith("_backward")]
    width = max((len(op.name) for op in ops), default=0)  # one column for every name, however long
    for op in ops:
        for dev in devices:
            order = [b for b in ("cuda", "triton", "cpu", "reference") if op.status(b, dev)[0]]
            missing = [f"{b}: {op.status(b, dev)[1]}" for b in ("cuda", "triton", "cpu") if b in op.impls and not op.status(b, dev)[0]]
            line = f"  {op.name:<{width}}  {dev:<5} {', '.join(order)}"
            if args.verbose and missing:
                line += "   [" + "; ".join(missing) + "]"
            out.append(line)
    print("\n".join(out))
    return 0


def cmd_check(args):
    """Every op on every fused backend of the device against the reference (leanvae_kernels.check)."""
    import leanvae_kernels
    from leanvae_kernels._selfcheck import format_rows, resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"leanvae check: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"leanvae check on {device}: every op, forward and backward, float32/float16/bfloat16, against the reference")
    rows = leanvae_kernels.check(device)
    print(format_rows(rows, quiet=args.quiet))
    return 0 if all(r.passed for r in rows) else 1


def _size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 256x256 or 1080x1920, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive height and width like 256x256, got {text!r}")
    return h, w


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def cmd_bench(args):
    import json

    import torch
    from leanvae_kernels import BackendUnavailable

    from . import bench
    from .loading import parse_device

    def fail(msg):
        print(f"leanvae bench: {msg}", file=sys.stderr)
        return 2

    height, width = args.size if args.size else (None, None)
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    # Everything is checked before the (long) run: arguments, the device, the backend, the --json file.
    try:
        device = parse_device(args.device, "--device")
        device, _, _, run_dtype = bench.resolve_setup(args.frames, height, width, args.batch, device, dtype)
        bench.check_counts(args.repeats, args.warmup)
    except (ValueError, RuntimeError) as exc:
        return fail(exc)
    if args.json:
        problem = _output_file_problem(args.json, "--json file")
        if problem:
            return fail(problem)
    try:
        bench.check_backend(args.backend, device, run_dtype)
    except BackendUnavailable as exc:
        return fail(f"--backend {args.backend} cannot run on {device} ({str(exc).splitlines()[0]}); "
                    "use --backend auto, or a device it supports")

    def write_json(data):
        try:
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1)
        except OSError as exc:
            fail(f"cannot write --json file {args.json}: {exc.strerror or exc}")
            return False
        return True
    if args.parallel:
        from . import parallel

        try:
            rep = parallel.bench_parallel(frames=args.frames, height=height or 256, width=width or 256,
                                          device=device, dtype=dtype or torch.float32, latent_dim=args.latent_dim,
                                          backend=args.backend, tile=args.tile, repeats=args.repeats,
                                          warmup=args.warmup)
        finally:
            parallel.shutdown()
        if rep is None:  # ranks other than 0 print nothing
            return 0
        print(parallel.format_report(rep))
        if args.json and not write_json(rep):
            return 2
        return 0 if rep["agreement"]["max_rel"] <= 1e-5 else 1
    try:
        report = bench.run(frames=args.frames, height=height, width=width, batch=args.batch, device=device,
                           dtype=dtype, latent_dim=args.latent_dim, backend=args.backend, compile=args.compile,
                           tile=args.tile, repeats=args.repeats, warmup=args.warmup, progress=not args.quiet)
    except torch.OutOfMemoryError:
        return fail(f"out of memory on {device}; try a smaller --size, fewer --frames or a smaller --batch")
    print(bench.format_table(report))
    if args.json:
        if not write_json(report):
            return 2
        print(f"wrote {args.json}")
    return 0 if report["agree"] else 1


def _output_file_problem(path, what):
    """Why `path` cannot be written as a file (checked before any work), or None."""
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        return f"{what} {path} is a folder; give a file name"
    if not os.path.isdir(folder):
        return f"output folder does not exist: {folder} (create it, or choose another {what})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"output folder is not writable: {folder} (choose another {what})"
    if os.path.exists(full) and not os.access(full, os.W_OK):
        return f"{what} {path} exists and is not writable"
    return None


def _same_file(a, b):
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # b does not exist yet
        return False


def _progress(total, quiet, unit="frame"):
    """A tqdm bar on stderr (rate and ETA), or None when quiet or tqdm is missing."""
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)


def cmd_reconstruct(args):
    import time

    import numpy as np
    import torch

    from .loading import CheckpointError, load_model, parse_device
    from .streaming import StreamingReconstruction, VideoSink, VideoSource
    from .video import VideoError, to_frames, to_model_input

    def fail(msg):
        print(f"leanvae reconstruct: {msg}", file=sys.stderr)
        return 2

    def note(msg):
        if not args.quiet:
            print(f"leanvae reconstruct: {msg}", file=sys.stderr, flush=True)

    # Everything that can be checked without work is checked first, so a mistake costs no time.
    if not os.path.isfile(args.input):
        return fail(f"input video not found: {args.input}")
    problem = _output_file_problem(args.output, "output video")
    if problem:
        return fail(problem)
    if _same_file(args.input, args.output):
        return fail(f"input and output are the same file ({args.input}); choose another output path")
    if args.frames is not None and (args.frames < 1 or args.frames % 4 != 1):
        return fail(f"--frames must be 1+4k (1, 5, 9, 17, ...), got {args.frames}")
    if args.tile_size and args.parallel:
        return fail("--tile-size cannot be combined with --parallel; use one of them")
    if args.chunk_frames < 5 or args.chunk_frames % 4 != 1:
        return fail(f"--chunk-frames must be 1+4k with k >= 1 (5, 9, 13, ...), got {args.chunk_frames}")
    try:
        device = parse_device(args.device, "--device")
    except ValueError as exc:
        return fail(str(exc))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        src = VideoSource(args.input)
    except VideoError as exc:
        return fail(str(exc))
    with src:
        count = src.count
        if args.frames is not None and count and count < args.frames:
            return fail(f"{args.input} has {count} frames, fewer than --frames {args.frames}")
        t = args.frames if args.frames is not None else (1 + 4 * ((count - 1) // 4) if count else None)
        full_h, full_w = src.height, src.width
        h, w = full_h // 8 * 8, full_w // 8 * 8
        if h == 0 or w == 0:
            return fail(f"{args.input}: frames of {full_h}x{full_w} are smaller than 8x8")
        try:
            model = load_model(args.checkpoint, device=device)
        except CheckpointError as exc:
            return fail(str(exc))
        model = model.to(dtype=dtype)
        if args.tile_size:
            try:
                model.enable_tiling(*args.tile_size)
            except (ValueError, TypeError) as exc:
                return fail(f"--tile-size {args.tile_size[0]}x{args.tile_size[1]}: {exc}")
        # Stated before any work: what of the input the output will not contain.
        if (h, w) != (full_h, full_w):
            note(f"frames of {full_h}x{full_w} (HxW) are cropped to {h}x{w}, the model's multiples of 8: "
                 f"{full_h - h} row(s) at the bottom and {full_w - w} column(s) at the right are left out")
        if t is not None and count > t:
            note(f"using the first {t} of the {count} frames (a clip has 1+4k frames); "
                 f"the last {count - t} are left out")
        handle = None
        if args.fused and not args.parallel:
            from leanvae.fused.switch import use_fused_kernels

            handle = use_fused_kernels(model)
        try:
            if args.parallel or args.tile_size:
                return _reconstruct_whole(args, model, src, t, h, w, device, dtype, fail)
            start = time.perf_counter()
            held = []  # input frames (uint8) whose reconstruction has not come out yet: at most a few chunks
            sq_err, n_out = 0.0, 0
            bar = _progress(t if t is not None else count or None, args.quiet)
            rec = StreamingReconstruction(model, chunk_frames=args.chunk_frames)
            try:
                with VideoSink(args.output, src.fps, h, w) as sink:
                    def emit(chunks):
                        nonlocal sq_err, n_out
                        for chunk in chunks:
                            out = to_frames(chunk)
                            ref, held[:] = np.stack(held[:len(out)]), held[len(out):]
                            sq_err += float(np.sum((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
                            sink.write(out)
                            n_out += len(out)
                            if bar is not None:
                                bar.update(len(out))

                    for i, frame in enumerate(src):
                        if t is not None and i >= t:
                            break
                        if frame.shape[:2] != (full_h, full_w):
                            raise VideoError(f"{args.input}: frame size changed from {full_h}x{full_w} to "
                                             f"{frame.shape[0]}x{frame.shape[1]} at frame {i}")
                        frame = np.ascontiguousarray(frame[:h, :w])
                        held.append(frame)
                        emit(rec.feed(to_model_input(frame[None]).to(device=device, dtype=dtype)))
                    emit(rec.finish())
                    if n_out == 0:
                        raise VideoError(f"{args.input}: no frames decoded")
            finally:
                rec.close()
                if bar is not None:
                    bar.close()
        except VideoError as exc:
            return fail(str(exc))
        except torch.OutOfMemoryError:
            return fail(f"out of memory on {device} for {h}x{w} frames; try a smaller video, --dtype bfloat16, or --device cpu")
        finally:
            if handle is not None:
                handle.revert()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if rec.dropped:
        note(f"the video ended after {rec.frames_in} frames (its header said {count}); "
             f"the last {rec.dropped} were left out to keep 1+4k frames")
    mse = sq_err / (n_out * h * w * 3)
    quality = float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)
    print(f"{args.input}: {n_out} frames {h}x{w} -> {args.output}; PSNR {quality:.2f} dB; "
          f"encode+decode {seconds:.2f} s on {device} ({args.dtype}{', fused' if args.fused else ''}, streamed "
          f"in chunks of {args.chunk_frames} frames)")
    return 0


def _reconstruct_whole(args, model, src, t, h, w, device, dtype, fail):
    """The whole clip at once: under torchrun (--parallel) each rank encodes and decodes its band of rows and
    rank 0 writes the clip; with --tile-size the model's spatial tiling runs on it."""
    import itertools
    import time

    import numpy as np
    import torch

    from .video import VideoError, psnr, to_frames, to_model_input, write_video

    frames = np.stack([f[:h, :w] for f in itertools.islice(iter(src), t)])
    t = 1 + 4 * ((len(frames) - 1) // 4)
    frames = frames[:t]
    if args.tile:
        model.set_tile_inference(True)
    x = to_model_input(frames).to(device=device, dtype=dtype)
    start = time.perf_counter()
    xin = x if t > 1 else x[:, :, 0]
    if args.parallel:
        from . import parallel

        parallel.init_from_env(device)
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        try:
            with torch.no_grad():
                zb = parallel.encode(model, parallel.split_clip(xin, rank, world), fused=args.fused)
                rec = parallel.gather_bands(parallel.decode(model, zb, is_image=t == 1, fused=args.fused), dim=-2)
        finally:
            parallel.shutdown()
        if rank != 0:
            return 0
    else:  # --tile-size: the model's exact spatial tiling, on the whole clip
        _, rec = model.inference(xin)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if t == 1:
        rec = rec.unsqueeze(2)
    out_frames = to_frames(rec)
    try:
        write_video(args.output, out_frames, src.fps)
    except VideoError as exc:
        return fail(str(exc))
    print(f"{args.input}: {t} frames {h}x{w} -> {args.output}; PSNR {psnr(frames, out_frames):.2f} dB; "
          f"encode+decode {seconds:.2f} s on {device} ({args.dtype}{', fused' if args.fused else ''}"
          f"{', tiled' if args.tile else ''}{', tile-size %dx%d' % args.tile_size if args.tile_size else ''}"
          f"{', parallel' if args.parallel else ''})")
    return 0


def cmd_encode(args):
    from .encode import EncodeError, encode_dataset

    try:
        summary = encode_dataset(
            args.inputs, args.out, args.checkpoint, frames=args.frames, stride=args.stride,
            max_clips_per_video=args.max_clips_per_video, whole=args.whole, size=args.size, fps=args.fps,
            dtype=_DTYPES[args.dtype], device=args.device, batch_size=args.batch_size, fused=args.fused,
            tile=args.tile, tile_size=args.tile_size, videos_per_shard=args.videos_per_shard, workers=args.workers,
            overwrite=args.overwrite, quiet=args.quiet)
    except (ValueError, EncodeError) as exc:
        print(f"leanvae encode: {exc}", file=sys.stderr)
        return 2
    if args.summary_json and int(os.environ.get("RANK", "0")) == 0:
        import json

        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        print(f"encoded {summary['clips']} clips ({summary['frames']} frames) from {summary['videos']} videos "
              f"into {summary['shards']} shards ({summary['resumed_shards']} already complete) on "
              f"{summary['ranks']} rank(s) in {summary['wall_s']:.1f} s: {summary['clips_per_s']:.2f} clips/s, "
              f"{summary['frames_per_s']:.1f} frames/s; {summary['failures']} failed"
              + (f" (see {os.path.join(args.out, 'errors.jsonl')})" if summary["failures"] else ""))
    return 1 if (args.strict and summary["failures"]) else 0


def cmd_decode(args):
    from .encode import EncodeError, decode_dataset

    try:
        paths = decode_dataset(args.dir, args.out, checkpoint=args.checkpoint, limit=args.limit,
                               device=args.device, fused=args.fused, quiet=args.quiet)
    except (ValueError, EncodeError) as exc:
        print(f"leanvae decode: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {len(paths)} videos to {args.out}")
    return 0


def cmd_verify(args):
    from .shards import verify_dataset

    try:
        rep = verify_dataset(args.dir, checksum=args.checksum)
    except ValueError as exc:
        print(f"leanvae verify: {exc}", file=sys.stderr)
        return 2
    for note in rep["notes"]:
        print(f"note: {note}")
    n = rep["bytes"]
    size = f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
    what = (f"{rep['shards']} shard(s) ({size}{', SHA-256 checked' if args.checksum else ', sizes only'}), "
            f"{rep['clips']} clip(s), {rep['errors']} skipped input(s)")
    if rep["problems"]:
        for p in rep["problems"]:
            print(f"DAMAGED: {p}")
        print(f"{args.dir}: {len(rep['problems'])} problem(s); intact: {what}. Rerun the encode command to "
              f"re-encode damaged shards and rewrite the index")
        return 1
    print(f"{args.dir}: OK: {what}")
    return 0


def cmd_convert(args):
    """Write a diffusers folder (config.json + safetensors) for a published checkpoint."""
    try:
        from .diffusers import convert_checkpoint
    except ImportError as exc:
        print(f"leanvae convert: needs diffusers ({exc}); pip install 'leanvae-kernels[diffusers]'", file=sys.stderr)
        return 2
    out = args.out_dir
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not args.overwrite):
        print(f"leanvae convert: {out!r} exists and is not an empty folder; pass --overwrite to write into it", file=sys.stderr)
        return 2
    try:
        vae = convert_checkpoint(args.checkpoint, out, model_variant=args.variant)
    except (ValueError, TypeError, OSError) as exc:
        # One line: torch's unpickling errors, quoted inside some messages, span several.
        print("leanvae convert: " + "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()), file=sys.stderr)
        return 2
    c = vae.config
    print(f"wrote {out}: AutoencoderLeanVAE, variant {c.model_variant}, z_dim {c.z_dim}, "
          f"{sum(t.numel() for t in vae.parameters()) / 1e6:.1f}M parameters; "
          "load it with leanvae.diffusers.AutoencoderLeanVAE.from_pretrained")
    return 0


def _add_convert_parser(sub):
    c = sub.add_parser("convert", help="write a diffusers AutoencoderLeanVAE folder from a published checkpoint "
                                       "(needs the diffusers extra)")
    c.add_argument("checkpoint", help="published checkpoint: a file, a folder holding one, owner/repo/file.ckpt "
                                      "or a short name")
    c.add_argument("out_dir", help="folder to write config.json and diffusion_pytorch_model.safetensors into")
    c.add_argument("--variant", choices=["original", "wan2.1", "wan2.2"], default=None,
                   help="the published branch the checkpoint comes from (default: recorded in it, else original)")
    c.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    c.set_defaults(func=cmd_convert)


_CHECKPOINT_HELP = ("a checkpoint file or a folder holding one, a Hugging Face Hub file owner/repo/file.ckpt, or a "
                    "short name: leanvae-4ch or leanvae-16ch (the published weights, downloaded once)")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser():
    p = _ArgumentParser(prog="python -m leanvae", description="LeanVAE with fused kernels")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, built native modules, and which backend serves each op")
    info.add_argument("-v", "--verbose", action="store_true", help="say why each missing backend is missing")
    info.set_defaults(func=cmd_info)

    c = sub.add_parser("check", help="run every op on every backend of the device against the reference "
                                     "(forward and backward, three dtypes); exit 1 on any failure")
    c.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU when there is one, else cpu)")
    c.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", help="encode+decode a synthetic clip with the reference and fused kernels; "
                                     "check they agree; print time, peak memory and error")
    b.add_argument("--frames", type=int, default=17, help="frames, 1+4k (default 17)")
    b.add_argument("--size", type=_size, default=None, help="HxW (default 256x256 on CPU, 1080x1920 on GPU)")
    b.add_argument("--batch", type=_int_at_least(1), default=1)
    b.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    b.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default float32 on CPU, bfloat16 on GPU")
    b.add_argument("--latent-dim", type=int, default=4, choices=[4, 16])
    b.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "cpu", "reference"])
    b.add_argument("--compile", action="store_true", help="also time torch.compile of the reference and fused models")
    b.add_argument("--tile", action="store_true", help="use the model's temporal tiled inference")
    b.add_argument("--repeats", type=_int_at_least(1), default=3, help="timed rounds (default 3)")
    b.add_argument("--warmup", type=_int_at_least(0), default=1)
    b.add_argument("--json", default=None, help="write the figures to this JSON file")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.add_argument("--parallel", action="store_true", help="under torchrun: split the clip's rows across the ranks; "
                   "per-rank time and peak memory, and agreement with one process on rank 0")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("reconstruct", help="encode and decode a video file with a checkpoint, chunk by chunk "
                                           "(memory does not grow with the video's length); print PSNR")
    r.add_argument("input", help="input video (anything FFmpeg reads)")
    r.add_argument("output", help="output video (.mp4)")
    r.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    r.add_argument("--fused", action="store_true", help="run with the fused kernels")
    r.add_argument("--tile", action="store_true", help="with --parallel or --tile-size: temporal tiled inference "
                   "(otherwise the video always streams through the model's chunks)")
    r.add_argument("--tile-size", type=_size, default=None, metavar="HxW", help="exact spatial tiling: frames in "
                   "tiles of at most HxW pixels (multiples of 8), each with a halo of the receptive field "
                   "(reads the whole clip into memory: no streaming)")
    r.add_argument("--frames", type=int, default=None, help="frames to use, 1+4k (default: as many as fit)")
    r.add_argument("--chunk-frames", type=int, default=5, help="frames encoded and decoded at a time, 1+4k "
                   "(default 5; peak memory grows with it, not with the video's length)")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    r.add_argument("--parallel", action="store_true", help="under torchrun: split each frame's rows across the ranks "
                   "(holds the whole clip in memory)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notes; only the result line")
    r.set_defaults(func=cmd_reconstruct)

    e = sub.add_parser("encode", help="encode a video dataset to latents (safetensors shards + index.jsonl); "
                                      "resumable; run under torchrun to use several processes/GPUs/nodes")
    e.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, folders (searched recursively) or manifests (.txt: one path a line; .csv: a path column)")
    e.add_argument("--out", required=True, help="output DIR")
    e.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    e.add_argument("--frames", type=int, default=17, help="frames per clip, 1+4k (default 17)")
    e.add_argument("--stride", type=int, default=None, help="frames between clip starts (default: --frames)")
    e.add_argument("--max-clips-per-video", type=int, default=None)
    e.add_argument("--whole", action="store_true", help="one clip of every frame (1+4k), encoded chunk by chunk")
    e.add_argument("--size", type=_size, default=None, help="HxW: resize and centre-crop every video to this size")
    e.add_argument("--fps", type=float, default=None, help="resample to this frame rate")
    e.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    e.add_argument("--batch-size", type=int, default=1, help="clips per model call (clips of one video)")
    e.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True, help="fused kernels (default on)")
    e.add_argument("--tile", action="store_true", help="temporal tiled encode (the model's chunk size)")
    e.add_argument("--tile-size", type=_size, default=None, metavar="HxW", help="exact spatial tiling: frames in "
                   "tiles of at most HxW pixels (multiples of 8), each with a halo of the receptive field")
    e.add_argument("--videos-per-shard", type=int, default=16)
    e.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding video (0: in process)")
    e.add_argument("--overwrite", action="store_true", help="delete what DIR holds and start over")
    e.add_argument("--strict", action="store_true", help="exit 1 if any input was skipped")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    e.add_argument("--summary-json", default=None, help="also write the final summary (counts, wall time, "
                                                         "clips/s, device busy fraction) to this JSON file")
    e.set_defaults(func=cmd_encode)

    d = sub.add_parser("decode", help="decode latents stored by `encode` back to mp4 files for inspection")
    d.add_argument("dir", help="a DIR written by `leanvae encode`")
    d.add_argument("--out", required=True, help="folder for the mp4 files")
    d.add_argument("--limit", type=int, default=None, help="decode only the first N clips")
    d.add_argument("--checkpoint", default=None, help="default: the checkpoint recorded in DIR/meta.json; else "
                   + _CHECKPOINT_HELP)
    d.add_argument("--device", default=None)
    d.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_decode)

    v = sub.add_parser("verify", help="check a DIR written by `encode`: shards against shards.jsonl (size, SHA-256, "
                                      "tensors), index and errors against the shards and meta.json; exit 1 on damage")
    v.add_argument("dir", help="a DIR written by `leanvae encode`")
    v.add_argument("--checksum", action=argparse.BooleanOptionalAction, default=True,
                   help="hash every shard (default; --no-checksum: sizes and headers only)")
    v.set_defaults(func=cmd_verify)
    _add_convert_parser(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
