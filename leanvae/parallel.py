"""Patch-parallel encode and decode: one clip split into bands of token rows across the ranks of a
`torch.distributed` process group, with a result equal to the single-process one.

    import leanvae.parallel as lp
    rows = lp.split_rows(H // 8, world_size)               # token rows per rank, uneven allowed
    x_band = lp.split_clip(x, rank=rank, world_size=world_size)
    z_band = lp.encode(model, x_band)                       # (B, d, T', rows_r, W/8)
    x_band_rec = lp.decode(model, z_band)                   # (B, 3, T, 8*rows_r, W)
    x_rec = lp.gather_bands(x_band_rec, dim=-2)             # the whole clip, on every rank

What reads across token rows (checked in leanvae/model.py, modules.py, wavelets.py):
- `PEG3D` (a 3x3x3 causal depthwise conv, in every NAF/ResNAF of the encoder, decoder and the ISTA
  bottleneck's `recon`) reads one token row above and below: the ONLY cross-row operation.
- `Patcher` / `UnPatcher`: one-level Haar with stride 2 and no overlap; the band's pixel height is a
  multiple of 8 (even), so no reflect padding is added at a band edge: local to each 2x2x2 block.
- `PatchToTokens` / `TokensToPatch` (4x4 pixels of the Haar bands per token), the patch projections,
  LayerNorm, Linear, GEGLU, Dropout, `std_layer`, the ISTA `sample` / `recon` GEMMs and soft threshold:
  per token. The temporal tiling (chunking along T) is per band unchanged; each PEG3D keeps its causal
  cache (the last 2 frames of the band) per rank.
So each PEG3D call becomes: exchange one row with each neighbour (the edge row of cat(cache or zeros, x)
for every frame), then convolve the band with those rows in place of the zero padding. Everything else
runs the model's own submodules on the band; the model's code is not modified: during a call, each
PEG3D instance's `forward` is replaced by a band forward and restored afterwards.

Paths: `fused=False` (default) convolves with the model's own `ds_conv` (nn.Conv3d) on the band padded
with the halo rows; `fused=True` calls `leanvae_kernels.causal_dwconv3d(..., halo_top=, halo_bottom=)`.
Inference only: with autograd on (grad mode and a band or parameter that requires grad) a call raises
on every rank, because gradients would not flow back through the halo exchange (training unsupported).
"""
import contextlib
import os
import zlib

import torch
import torch.nn.functional as F

from .modules import PEG3D

__all__ = ["split_rows", "split_clip", "gather_bands", "encode", "decode"]

# Modules whose classes may appear in a model run here: the reference model and torch.nn. A model patched
# by `use_fused_kernels` (PEG3D replaced) would silently lose the halo, so it is refused.
_ALLOWED_MODULE_PREFIXES = ("leanvae.modules", "leanvae.wavelets", "leanvae.model", "torch.nn")


def split_rows(n_rows, world_size):
    """[(start, end)] of token rows per rank: as even as possible, the first `n_rows % world_size` ranks
    one row taller. Every rank needs at least one row (the halo is one row deep)."""
    if not isinstance(n_rows, int) or not isinstance(world_size, int):
        raise TypeError(f"split_rows: n_rows and world_size must be ints, got {type(n_rows).__name__}, {type(world_size).__name__}")
    if world_size < 1:
        raise ValueError(f"split_rows: world_size must be >= 1, got {world_size}")
    if n_rows < world_size:
        raise ValueError(
            f"split_rows: {n_rows} token rows cannot be split across {world_size} ranks: every band needs at "
            "least one token row (8 pixel rows) for the one-row halo"
        )
    base, extra = divmod(n_rows, world_size)
    out, start = [], 0
    for r in range(world_size):
        end = start + base + (1 if r < extra else 0)
        out.append((start, end))
        start = end
    return out


def split_clip(x, rank, world_size, rows=None, latent=False):
    """The band of `x` (..., H, W) that `rank` holds. Pixels (default): 8 pixel rows per token row;
    `latent=True`: z (B, d, T, h, w), one row per token row. `rows`: [(start, end)] token rows per rank
    (default `split_rows`)."""
    scale = 1 if latent else 8
    h = x.shape[-2]
    if h % scale:
        raise ValueError(f"split_clip: H must be a multiple of {scale}, got {h}")
    if rows is None:
        rows = split_rows(h // scale, world_size)
    if len(rows) != world_size:
        raise ValueError(f"split_clip: rows must have one (start, end) per rank ({world_size}), got {len(rows)}")
    start, end = rows[rank]
    return x[..., start * scale:end * scale, :]


def _group_info(group):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("leanvae.parallel: torch.distributed is not initialised; call init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def gather_bands(band, dim=-2, group=None):
    """All-gather bands of possibly different heights along `dim`; every rank gets the whole tensor."""
    import torch.distributed as dist

    rank, world = _group_info(group)
    if world == 1:
        return band
    dim = dim % band.ndim
    sizes = torch.tensor([band.shape[dim]], dtype=torch.int64, device=band.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    all_sizes = [int(s.item()) for s in all_sizes]
    top = max(all_sizes)
    pad = list(band.shape)
    pad[dim] = top - band.shape[dim]
    padded = torch.cat([band, band.new_zeros(pad)], dim=dim).contiguous()
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return torch.cat([b.narrow(dim, 0, s) for b, s in zip(bufs, all_sizes)], dim=dim)


class _Ctx:
    def __init__(self, group, rank, world, fused, backend):
        import torch.distributed as dist

        self.group, self.rank, self.world, self.fused, self.backend = group, rank, world, fused, backend
        self.up = dist.get_global_rank(group, rank - 1) if group is not None and rank > 0 else (rank - 1 if rank > 0 else None)
        self.down = (
            (dist.get_global_rank(group, rank + 1) if group is not None else rank + 1) if rank < world - 1 else None
        )
        self.cache = {}

    def exchange(self, full):
        """full: (B, 2+T, Hb, W, C). Returns (halo_top, halo_bottom), each (B, 2+T, W, C) or None."""
        import torch.distributed as dist

        ops, top, bottom = [], None, None
        if self.up is not None:
            top = torch.empty_like(full[:, :, 0])
            ops += [dist.P2POp(dist.isend, full[:, :, 0].contiguous(), self.up, self.group),
                    dist.P2POp(dist.irecv, top, self.up, self.group)]
        if self.down is not None:
            bottom = torch.empty_like(full[:, :, -1])
            ops += [dist.P2POp(dist.isend, full[:, :, -1].contiguous(), self.down, self.group),
                    dist.P2POp(dist.irecv, bottom, self.down, self.group)]
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return top, bottom

    def peg_forward(self, peg, x):
        """PEG3D on a band: x (B, T, Hb, W, C) -> (B, T, Hb, W, C), equal to those rows of the whole frame."""
        b, t, hb, w, c = x.shape
        cache = self.cache.get(id(peg)) if (peg.tile_inference and not peg.is_first_chunk) else None
        if peg.tile_inference and not peg.is_first_chunk and cache is None:
            raise RuntimeError("leanvae.parallel: a later chunk ran before the first one (no causal cache)")
        past = cache if cache is not None else x.new_zeros(b, 2, hb, w, c)
        full = torch.cat([past, x], dim=1)
        if peg.tile_inference:
            self.cache[id(peg)] = full[:, -2:].clone()
        top, bottom = self.exchange(full)
        conv = peg.ds_conv
        if self.fused:
            import leanvae_kernels

            y, _ = leanvae_kernels.causal_dwconv3d(
                x.contiguous(), conv.weight, conv.bias, cache, residual=False,
                halo_top=top, halo_bottom=bottom, backend=self.backend,
            )
            return y
        zeros = x.new_zeros(b, 2 + t, 1, w, c)
        rows = [zeros if top is None else top.unsqueeze(2), full, zeros if bottom is None else bottom.unsqueeze(2)]
        padded = torch.cat(rows, dim=2).permute(0, 4, 1, 2, 3)      # (B, C, 2+T, Hb+2, W)
        padded = F.pad(padded, (1, 1, 0, 0, 0, 0), value=0.0)     # zeros left and right, as PEG3D
        return conv(padded.contiguous()).permute(0, 2, 3, 4, 1)


@contextlib.contextmanager
def _band_pegs(model, ctx):
    pegs = [m for m in model.modules() if isinstance(m, PEG3D)]
    for m in pegs:
        m.forward = (lambda mod: (lambda x: ctx.peg_forward(mod, x)))(m)
    try:
        yield
    finally:
        for m in pegs:
            del m.forward


def _check_model(model, what):
    """Refuse a model whose modules or methods are not the reference ones (e.g. `use_fused_kernels`, which
    replaces forwards per instance or per class): its convs would pad band edges with zeros, silently."""
    for name, m in model.named_modules():
        where = name or "model"
        bad = None
        if not type(m).__module__.startswith(_ALLOWED_MODULE_PREFIXES):
            bad = f"is a {type(m).__module__}.{type(m).__name__}"
        for attr, val in vars(m).items():
            if callable(val) and not isinstance(val, (torch.nn.Module, torch.Tensor)) and not attr.startswith("_"):
                bad = f"has its method {attr!r} replaced on the instance"
        for cls in type(m).__mro__:
            if cls is torch.nn.Module or not cls.__module__.startswith(("leanvae.",)):
                continue
            for attr, val in vars(cls).items():
                mod = getattr(val, "__module__", None)
                if callable(val) and mod is not None and not mod.startswith(_ALLOWED_MODULE_PREFIXES):
                    bad = f"has {cls.__name__}.{attr} replaced by {mod}"
        if bad:
            raise TypeError(
                f"leanvae.parallel.{what}: module {where} {bad}; only the unpatched reference LeanVAE is supported "
                "(revert use_fused_kernels and pass fused=True to use the fused conv)"
            )


def _check_device(x, group, what):
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if backend == "gloo" and x.device.type != "cpu":
        raise ValueError(
            f"leanvae.parallel.{what}: the process group uses gloo, which here exchanges CPU tensors only, "
            f"but the band is on {x.device}; use an nccl group for CUDA tensors"
        )
    if backend == "nccl" and x.device.type != "cuda":
        raise ValueError(
            f"leanvae.parallel.{what}: the process group uses nccl, which needs CUDA tensors, but the band is on "
            f"{x.device}; use a gloo group for CPU tensors"
        )


def _agree(x, group, world, what, extra, scale):
    """All ranks gather (ndim, every dim but H, dtype, flags) and the band height, and check them together:
    every rank raises the same error, so none is left waiting in a later exchange."""
    import torch.distributed as dist

    shape = list(x.shape) + [0] * (5 - x.ndim)
    h = x.shape[-2] if x.ndim >= 2 else -1
    meta = [x.ndim] + shape[: x.ndim - 2] + shape[x.ndim - 1:] + [zlib.crc32(str(x.dtype).encode())] + list(extra)
    t = torch.tensor([h] + meta, dtype=torch.int64, device=x.device if x.device.type == "cuda" else "cpu")
    outs = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(outs, t, group=group)
    outs = [o.tolist() for o in outs]
    heights, keys = [o[0] for o in outs], [o[1:] for o in outs]
    if any(k != keys[0] for k in keys):
        raise ValueError(
            f"leanvae.parallel.{what}: ranks disagree on the band's shape/dtype/settings (every dim but H must "
            f"match): per rank (ndim, dims but H..., dtype id, flags) = {keys}"
        )
    if min(heights) < scale or any(hh % scale for hh in heights):
        raise ValueError(
            f"leanvae.parallel.{what}: every band needs a positive whole number of token rows (one row of halo "
            f"each side; a multiple of {scale} {'pixel ' if scale > 1 else ''}rows, at least {scale}), got band "
            f"heights per rank {heights}"
        )


def _run(model, band, group, fused, backend, what, fn, scale, flags=()):
    _check_model(model, what)
    rank, world = _group_info(group)
    if world == 1:
        return fn(band)  # a group of one: the plain path
    _check_device(band, group, what)
    needs_grad = torch.is_grad_enabled() and (band.requires_grad or any(p.requires_grad for p in model.parameters()))
    _agree(band, group, world, what, [int(bool(fused)), int(bool(model.tile_inference)), int(needs_grad), *flags], scale)
    if needs_grad:  # same decision on every rank (checked by _agree), so every rank raises
        raise RuntimeError(
            f"leanvae.parallel.{what}: gradients would be wrong (they do not flow back through the halo "
            "exchange); run inference under torch.no_grad() or torch.inference_mode(): training is not supported"
        )
    ctx = _Ctx(group, rank, world, fused, backend)
    with _band_pegs(model, ctx):
        return fn(band)


def encode(model, x_band, group=None, fused=False, backend=None):
    """Encode this rank's band x_band (B, 3, T, 8*rows, W) (or an image band (B, 3, 8*rows, W)) of a clip
    split along H across `group` (default: the world). Returns z_band (B, d, T', rows, W/8). Collective:
    every rank of the group must call it with bands of the same clip, in rank order from the top."""
    if not isinstance(x_band, torch.Tensor):
        raise TypeError(f"leanvae.parallel.encode: x_band must be a torch.Tensor, got {type(x_band).__name__}")
    return _run(model, x_band, group, fused, backend, "encode", model.encode, 8)


def decode(model, z_band, group=None, is_image=False, fused=False, backend=None):
    """Decode this rank's latent band z_band (B, d, T', rows, w) -> (B, 3, T, 8*rows, 8w). Collective."""
    if not isinstance(z_band, torch.Tensor):
        raise TypeError(f"leanvae.parallel.decode: z_band must be a torch.Tensor, got {type(z_band).__name__}")
    return _run(model, z_band, group, fused, backend, "decode", lambda z: model.decode(z, is_image=is_image), 1,
                (int(bool(is_image)),))


# ------------------------------------------------------------------------------------- command line
def init_from_env(device, timeout_s=300):
    """Initialise the default process group from torchrun's environment: gloo for CPU, nccl for CUDA."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"--parallel runs under torchrun (e.g. torchrun --nproc_per_node=2 -m leanvae ...); {var} is not set")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))


def shutdown():
    """Destroy the default process group, if one is initialised, once this rank has no collective left.

    Every command that initialised it calls this before returning: a rank that exits with the group alive
    leaves gloo's worker threads holding finished send/receive work (with tensor references) until the
    interpreter is torn down, and freeing them then can abort the process (SIGABRT, seen here on rank 1 of
    `reconstruct --parallel`, which returns right after the gather while rank 0 writes the video)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def bench_parallel(frames=17, height=256, width=256, device=None, dtype=torch.float32, latent_dim=4,
                   backend="reference", tile=False, repeats=1, warmup=1, single=True):
    """Per-rank time and peak activation memory of parallel encode+decode of one synthetic clip, and (on
    rank 0, `single`) the same for one process and the agreement of the gathered result with it.
    `backend` cpu/cuda/triton: the band convs run the fused op; auto/reference: the model's own conv."""
    import torch.distributed as dist

    from . import bench

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    init_from_env(device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world = dist.get_rank(), dist.get_world_size()
    fused = backend in ("cpu", "cuda", "triton")  # "auto"/"reference": the model's own conv on both sides

    model = bench.build_model(latent_dim, device, dtype)
    model.set_tile_inference(tile)
    x = bench.synthetic_clip(frames, height, width, device=device, dtype=dtype)
    rows = split_rows(height // 8, world)
    xb = split_clip(x, rank, world, rows)
    kb = None if backend in ("auto", "reference") else backend

    def par():
        with torch.no_grad():
            model.set_tile_inference(tile)
            z = encode(model, xb, fused=fused, backend=kb)
            model.set_tile_inference(tile)
            return decode(model, z, fused=fused, backend=kb)

    for _ in range(warmup):
        par()
    dist.barrier()
    times = []
    for _ in range(repeats):
        dist.barrier()
        sec, band = bench.timed(par, device)
        times.append(sec)
    dist.barrier()
    mem = bench.peak_memory(par, device)
    stats = torch.tensor([min(times), float(mem), float(rows[rank][1] - rows[rank][0])], dtype=torch.float64,
                         device=device if device.type == "cuda" else "cpu")
    all_stats = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(all_stats, stats)
    full = gather_bands(band, dim=-2)
    report = {"world": world, "frames": frames, "height": height, "width": width, "device": str(device),
              "dtype": str(dtype), "path": "fused conv" if fused else "reference", "tile": tile,
              "threads_per_rank": torch.get_num_threads(),
              "ranks": [{"rank": r, "token_rows": int(s[2]), "seconds": float(s[0]), "peak_bytes": int(s[1])}
                        for r, s in enumerate(t.tolist() for t in all_stats)]}
    if rank == 0 and single:
        def one():
            with torch.no_grad():
                model.set_tile_inference(tile)
                z = model.encode(x)
                model.set_tile_inference(tile)
                return model.decode(z)

        for _ in range(warmup):
            one()
        t1 = []
        for _ in range(repeats):
            sec, ref = bench.timed(one, device)
            t1.append(sec)
        report["single"] = {"seconds": min(t1), "peak_bytes": int(bench.peak_memory(one, device))}
        report["agreement"] = bench.errors(full, ref)
        report["speedup"] = report["single"]["seconds"] / max(r["seconds"] for r in report["ranks"])
        report["max_rank_peak_over_single"] = max(r["peak_bytes"] for r in report["ranks"]) / max(1, report["single"]["peak_bytes"])
    dist.barrier()
    return report if rank == 0 else None


def format_report(rep):
    lines = [f"parallel encode+decode: {rep['world']} ranks x {rep['threads_per_rank']} thread(s), "
             f"{rep['frames']}x{rep['height']}x{rep['width']} on {rep['device']} {rep['dtype']}, {rep['path']}"
             f"{', tiled' if rep['tile'] else ''}"]
    for r in rep["ranks"]:
        lines.append(f"  rank {r['rank']}: {r['token_rows']:4d} token rows  {r['seconds']:8.3f} s  "
                     f"peak {r['peak_bytes'] / 2**20:9.1f} MiB")
    if "single" in rep:
        s = rep["single"]
        lines.append(f"  1 process:              {s['seconds']:8.3f} s  peak {s['peak_bytes'] / 2**20:9.1f} MiB")
        lines.append(f"  speedup {rep['speedup']:.2f}x; largest rank peak / 1-process peak = "
                     f"{rep['max_rank_peak_over_single']:.3f}; gathered vs 1 process: max rel "
                     f"{rep['agreement']['max_rel']:.2e}, rms rel {rep['agreement']['rms_rel']:.2e}")
    return "\n".join(lines)
