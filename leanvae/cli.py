"""Command line: `python -m leanvae {info,bench,reconstruct,encode,decode}`."""
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
    for op in _backend.ALL_OPS:
        if op.name.endswith("_backward"):
            continue
        for dev in devices:
            order = [b for b in ("cuda", "triton", "cpu", "reference") if op.status(b, dev)[0]]
            missing = [f"{b}: {op.status(b, dev)[1]}" for b in ("cuda", "triton", "cpu") if b in op.impls and not op.status(b, dev)[0]]
            line = f"  {op.name:<18} {dev:<5} {', '.join(order)}"
            if args.verbose and missing:
                line += "   [" + "; ".join(missing) + "]"
            out.append(line)
    print("\n".join(out))
    return 0


def _size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 256x256 or 1080x1920, got {text!r}") from None
    return h, w


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def cmd_bench(args):
    import json

    import torch

    from . import bench

    height, width = args.size if args.size else (None, None)
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    try:
        bench.resolve_setup(args.frames, height, width, args.batch, args.device, dtype)
    except (ValueError, RuntimeError) as exc:
        print(f"leanvae bench: {exc}", file=sys.stderr)
        return 2
    if args.parallel:
        from . import parallel

        rep = parallel.bench_parallel(frames=args.frames, height=height or 256, width=width or 256, device=args.device,
                                      dtype=dtype or torch.float32, latent_dim=args.latent_dim, backend=args.backend,
                                      tile=args.tile, repeats=args.repeats, warmup=args.warmup)
        if rep is None:  # ranks other than 0 print nothing
            return 0
        print(parallel.format_report(rep))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rep, f, indent=1)
        return 0 if rep["agreement"]["max_rel"] <= 1e-5 else 1
    report = bench.run(frames=args.frames, height=height, width=width, batch=args.batch, device=args.device,
                       dtype=dtype, latent_dim=args.latent_dim, backend=args.backend, compile=args.compile,
                       tile=args.tile, repeats=args.repeats, warmup=args.warmup, progress=not args.quiet)
    print(bench.format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if report["agree"] else 1


def cmd_reconstruct(args):
    import os
    import time

    import torch

    from .model import LeanVAE
    from .video import VideoError, psnr, read_video, to_frames, to_model_input, write_video

    def fail(msg):
        print(f"leanvae reconstruct: {msg}", file=sys.stderr)
        return 2

    for label, path in (("input video", args.input), ("checkpoint", args.checkpoint)):
        if not os.path.isfile(path):
            return fail(f"{label} not found: {path}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        return fail(f"output folder does not exist: {out_dir}")
    if args.frames is not None and (args.frames < 1 or args.frames % 4 != 1):
        return fail(f"--frames must be 1+4k (1, 5, 9, 17, ...), got {args.frames}")
    try:
        frames, fps = read_video(args.input, args.frames)
    except VideoError as exc:
        return fail(str(exc))
    t = args.frames or 1 + 4 * ((len(frames) - 1) // 4)
    if len(frames) < t:
        return fail(f"{args.input} has {len(frames)} frames, fewer than --frames {t}")
    h, w = frames.shape[1] // 8 * 8, frames.shape[2] // 8 * 8
    if h == 0 or w == 0:
        return fail(f"{args.input}: frames of {frames.shape[1]}x{frames.shape[2]} are smaller than 8x8")
    frames = frames[:t, :h, :w]
    try:
        model = LeanVAE.load_from_checkpoint(args.checkpoint, device="cpu").eval()
    except (ValueError, RuntimeError, KeyError) as exc:
        cause = exc.__cause__
        if cause is not None:  # torch.load's own error: its advice runs to many lines; one is enough here
            return fail(f"cannot load checkpoint {args.checkpoint}: not a readable torch checkpoint "
                        f"({cause.__class__.__name__})")
        return fail(f"cannot load checkpoint {args.checkpoint}: {str(exc).splitlines()[0]}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = model.to(device=device, dtype=dtype)
    handle = None
    if args.fused and not args.parallel:
        from leanvae.fused.switch import use_fused_kernels

        handle = use_fused_kernels(model)
    if args.tile:
        model.set_tile_inference(True)
    x = to_model_input(frames).to(device=device, dtype=dtype)
    start = time.perf_counter()
    if args.parallel:  # each rank encodes and decodes its band of rows; every rank gathers the clip
        from . import parallel

        parallel.init_from_env(device)
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        xin = x if t > 1 else x[:, :, 0]
        with torch.no_grad():
            zb = parallel.encode(model, parallel.split_clip(xin, rank, world), fused=args.fused)
            rec = parallel.gather_bands(parallel.decode(model, zb, is_image=t == 1, fused=args.fused), dim=-2)
        if rank != 0:
            return 0
    else:
        _, rec = model.inference(x if t > 1 else x[:, :, 0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if t == 1:
        rec = rec.unsqueeze(2)
    out_frames = to_frames(rec)
    try:
        write_video(args.output, out_frames, fps)
    except VideoError as exc:
        return fail(str(exc))
    if handle is not None:
        handle.revert()
    print(f"{args.input}: {t} frames {h}x{w} -> {args.output}; PSNR {psnr(frames, out_frames):.2f} dB; "
          f"encode+decode {seconds:.2f} s on {device} ({args.dtype}{', fused' if args.fused else ''}{', tiled' if args.tile else ''}{', parallel' if args.parallel else ''})")
    return 0


def cmd_encode(args):
    from .encode import EncodeError, encode_dataset

    try:
        summary = encode_dataset(
            args.inputs, args.out, args.checkpoint, frames=args.frames, stride=args.stride,
            max_clips_per_video=args.max_clips_per_video, whole=args.whole, size=args.size, fps=args.fps,
            dtype=_DTYPES[args.dtype], device=args.device, batch_size=args.batch_size, fused=args.fused,
            tile=args.tile, videos_per_shard=args.videos_per_shard, workers=args.workers,
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


def build_parser():
    p = argparse.ArgumentParser(prog="python -m leanvae", description="LeanVAE with fused kernels")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, built native modules, and which backend serves each op")
    info.add_argument("-v", "--verbose", action="store_true", help="say why each missing backend is missing")
    info.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="encode+decode a synthetic clip with the reference and fused kernels; "
                                     "check they agree; print time, peak memory and error")
    b.add_argument("--frames", type=int, default=17, help="frames, 1+4k (default 17)")
    b.add_argument("--size", type=_size, default=None, help="HxW (default 256x256 on CPU, 1080x1920 on GPU)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default float32 on CPU, bfloat16 on GPU")
    b.add_argument("--latent-dim", type=int, default=4, choices=[4, 16])
    b.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "cpu", "reference"])
    b.add_argument("--compile", action="store_true", help="also time torch.compile of the reference and fused models")
    b.add_argument("--tile", action="store_true", help="use the model's temporal tiled inference")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--json", default=None, help="write the figures to this JSON file")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.add_argument("--parallel", action="store_true", help="under torchrun: split the clip's rows across the ranks; "
                   "per-rank time and peak memory, and agreement with one process on rank 0")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("reconstruct", help="encode and decode a video file with a checkpoint; print PSNR")
    r.add_argument("input", help="input video (anything FFmpeg reads)")
    r.add_argument("output", help="output video (.mp4)")
    r.add_argument("--checkpoint", required=True, help="a LeanVAE checkpoint {'args': ..., 'state_dict': ...}")
    r.add_argument("--fused", action="store_true", help="run with the fused kernels")
    r.add_argument("--tile", action="store_true", help="temporal tiled inference (the model's chunk sizes)")
    r.add_argument("--frames", type=int, default=None, help="frames to use, 1+4k (default: as many as fit)")
    r.add_argument("--device", default=None)
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    r.add_argument("--parallel", action="store_true", help="under torchrun: split each frame's rows across the ranks")
    r.set_defaults(func=cmd_reconstruct)

    e = sub.add_parser("encode", help="encode a video dataset to latents (safetensors shards + index.jsonl); "
                                      "resumable; run under torchrun to use several processes/GPUs/nodes")
    e.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, folders (searched recursively) or manifests (.txt: one path a line; .csv: a path column)")
    e.add_argument("--out", required=True, help="output DIR")
    e.add_argument("--checkpoint", required=True, help="a LeanVAE checkpoint {'args': ..., 'state_dict': ...}")
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
    d.add_argument("--checkpoint", default=None, help="default: the checkpoint recorded in DIR/meta.json")
    d.add_argument("--device", default=None)
    d.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_decode)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
