"""The main job: encode and decode a synthetic clip with the reference model and with fused kernels.

Builds the published configuration with seeded random weights, runs each variant (reference, fused, and
optionally torch.compile of each), checks that fused and reference agree, and reports time, peak memory
and error. Used by `python -m leanvae bench` and by the end-to-end benchmark suite.
"""
import copy
import math
import os
import statistics
import sys
import threading
import time

import torch

from .model import LeanVAE

# Agreement required of the fused model. float32: max relative error against the reference.
# float16/bfloat16: judged against the float32 model (DESIGN.md): the fused path's relative RMS error must
# be no larger than LOW_SLACK times the reference's own low-precision error (+ LOW_ABS). In bfloat16 the
# reference itself is about 1% RMS from float32, so fused-vs-reference compares two noisy paths; that
# figure is reported too.
MAX_REL_FP32 = 1e-4
LOW_SLACK, LOW_ABS = 1.25, 1e-3


def synthetic_clip(frames, height, width, batch=1, device="cpu", dtype=torch.float32, seed=0):
    """A smooth moving pattern plus a little noise, in [-0.5, 0.5]: (B, 3, T, H, W)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    y = torch.linspace(0, 1, height).view(1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width)
    chans = []
    for c in range(3):
        fx, fy, ft = (torch.rand(3, generator=g) * 6 + 1).tolist()
        chans.append(0.35 * torch.sin(2 * math.pi * (fx * x + fy * y) + 0.3 * ft * t + c))
    clip = torch.stack(chans, 0).unsqueeze(0).expand(batch, -1, -1, -1, -1)
    clip = clip + 0.05 * torch.randn(clip.shape, generator=g)
    return clip.clamp(-0.5, 0.5).to(device=device, dtype=dtype).contiguous()


def build_model(latent_dim=4, device="cpu", dtype=torch.float32, seed=0):
    """The published configuration with seeded random weights (non-trivial bottleneck thresholds)."""
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)  # ISTA draws phi with numpy, as published
    model = LeanVAE.from_config(latent_dim=latent_dim).eval()
    with torch.no_grad():
        for p in model.latent_bottleneck.threshold:
            p.fill_(0.02)
    return model.to(device=device, dtype=dtype)


class _PeakRSS:
    """Peak resident memory above the starting point, sampled every 2 ms (CPU runs)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return False

    @property
    def used(self):
        return self.peak - self.base


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, output) of one call of fn()."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def peak_memory(fn, device):
    """Peak bytes above the starting allocation during one untimed call of fn().

    CUDA: the caching allocator's peak. CPU: resident memory sampled by a thread (never while timing:
    it preempts the compute threads), after returning glibc's free heap to the system."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with _PeakRSS() as mem:
        fn()
    return mem.used


def errors(actual, expected):
    """Relative errors of `actual` against `expected`: max-abs over max-abs, and RMS over RMS."""
    a, e = actual.double(), expected.double()
    diff = a - e
    return {
        "max_rel": (diff.abs().max() / e.abs().max().clamp_min(1e-30)).item(),
        "rms_rel": (diff.pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-30)).item(),
    }


def resolve_setup(frames=17, height=None, width=None, batch=1, device=None, dtype=None):
    """Defaults and validation of the benchmark's arguments: (device, height, width, dtype).

    Raises ValueError for arguments the model cannot take."""
    from .loading import parse_device

    device = parse_device(device)  # ValueError naming the devices that exist
    if height is None or width is None:
        height, width = (1080, 1920) if device.type == "cuda" else (256, 256)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if frames < 1 or frames % 4 != 1:
        raise ValueError(f"frames must be 1+4k (1, 5, 9, 17, ...), got {frames}")
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return device, height, width, dtype


def check_counts(repeats, warmup):
    """ValueError unless `repeats` >= 1 (the median needs a timing) and `warmup` >= 0."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1 (timed rounds), got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")


def check_backend(backend, device, dtype):
    """Raise `BackendUnavailable` (saying why) if `backend` cannot run the fused model on `device`/`dtype`.

    The same check `use_fused_kernels` makes, on a tiny model, so a bad choice fails before the benchmark
    builds the full one."""
    from leanvae.fused.switch import use_fused_kernels

    tiny = LeanVAE.from_config(embedding_dim=16, l_dim=8, h_dim=8, sep_num_layer=1, fusion_num_layer=1,
                               ista_iter_num=1, ista_layer_num=1).to(device=device, dtype=dtype)
    use_fused_kernels(tiny, backend=backend).revert()


def run(frames=17, height=None, width=None, batch=1, device=None, dtype=None, latent_dim=4, backend="auto",
        compile=False, tile=False, repeats=3, warmup=1, progress=True):
    """Run the benchmark; returns a dict with the setup, per-variant timings/memory, and errors."""
    device, height, width, dtype = resolve_setup(frames, height, width, batch, device, dtype)
    check_counts(repeats, warmup)

    import leanvae_kernels
    from leanvae.fused.switch import use_fused_kernels

    low = dtype in (torch.float16, torch.bfloat16)
    model32 = build_model(latent_dim, device, torch.float32)
    model = copy.deepcopy(model32).to(dtype) if low else model32
    model.set_tile_inference(tile)
    clip = synthetic_clip(frames, height, width, batch, device, dtype)
    is_image = frames == 1
    x_in = clip[:, :, 0] if is_image else clip

    # Each variant has its own model (the fused one patched for the whole run), so the timed repeats can
    # interleave the variants: this machine's speed drifts, and interleaving spreads the drift over all.
    fused_model = copy.deepcopy(model)
    handle = use_fused_kernels(fused_model, backend=backend)
    torch._dynamo.reset()
    variants = {"reference": (model.encode, model.decode), "fused": (fused_model.encode, fused_model.decode)}
    if compile:
        variants["compile(reference)"] = (torch.compile(model.encode), torch.compile(model.decode))
        variants["compile(fused)"] = (torch.compile(fused_model.encode), torch.compile(fused_model.decode))
    started = time.perf_counter()

    def say(msg):
        if progress:
            print(f"{msg} ... ({time.perf_counter() - started:.0f} s elapsed)", file=sys.stderr, flush=True)

    outputs = {name: {} for name in variants}
    times = {name: {"encode": [], "decode": []} for name in variants}
    peaks = {name: {} for name in variants}
    calls = {}
    with torch.no_grad():
        for name, (enc, dec) in variants.items():
            say(f"{name}: warm-up{' and compilation' if name.startswith('compile') else ''}")
            for _ in range(max(1, warmup)):
                outputs[name]["z"] = enc(x_in)
        z_in = outputs["reference"]["z"]  # every variant decodes the same latent
        for name, (enc, dec) in variants.items():
            for _ in range(max(1, warmup)):
                outputs[name]["x"] = dec(z_in, is_image=is_image)
            calls[name] = {"encode": lambda enc=enc: enc(x_in), "decode": lambda dec=dec: dec(z_in, is_image=is_image)}
        for r in range(repeats):
            say(f"timing round {r + 1}/{repeats}")
            for phase in ("encode", "decode"):
                for name in variants:
                    seconds, out = timed(calls[name][phase], device)
                    times[name][phase].append(seconds)
                    outputs[name]["z" if phase == "encode" else "x"] = out
        say("peak memory")
        for name in variants:
            for phase in ("encode", "decode"):
                peaks[name][phase] = peak_memory(calls[name][phase], device)
    handle.revert()
    results = {}
    for name in variants:
        row = {phase: {"seconds": statistics.median(times[name][phase]), "all_seconds": times[name][phase],
                       "peak_bytes": peaks[name][phase]} for phase in ("encode", "decode")}
        row["total_seconds"] = row["encode"]["seconds"] + row["decode"]["seconds"]
        results[name] = row

    ref = outputs["reference"]
    exact = None
    if low:  # the float32 model on the same inputs, untimed: what low precision is judged against
        if progress:
            print("float32 model for the accuracy check ...", file=sys.stderr, flush=True)
        with torch.no_grad():
            z32 = model32.encode(x_in.float())
            exact = {"z": z32, "x": model32.decode(ref["z"].float(), is_image=is_image)}
        del model32
        results["reference"]["error_vs_float32"] = {
            "encode": errors(ref["z"], exact["z"]), "decode": errors(ref["x"], exact["x"])}
    agree = True
    for name in results:
        if name == "reference":
            continue
        e_z, e_x = errors(outputs[name]["z"], ref["z"]), errors(outputs[name]["x"], ref["x"])
        results[name]["error"] = {"encode": e_z, "decode": e_x}
        if name not in ("fused", "compile(fused)"):
            continue
        if low:
            mine = {"encode": errors(outputs[name]["z"], exact["z"]), "decode": errors(outputs[name]["x"], exact["x"])}
            results[name]["error_vs_float32"] = mine
            theirs = results["reference"]["error_vs_float32"]
            ok = all(mine[p]["rms_rel"] <= LOW_SLACK * theirs[p]["rms_rel"] + LOW_ABS for p in mine)
        else:
            ok = max(e_z["max_rel"], e_x["max_rel"]) < MAX_REL_FP32
        results[name]["agrees"] = ok
        agree &= ok
    ref_t = results["reference"]["total_seconds"]
    for row in results.values():
        row["speedup_vs_reference"] = ref_t / row["total_seconds"]
    return {
        "setup": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
            "dtype": str(dtype).replace("torch.", ""), "frames": frames, "height": height, "width": width,
            "batch": batch, "latent_dim": latent_dim, "backend": backend, "tile": tile, "repeats": repeats,
            "torch": torch.__version__, "leanvae_kernels": leanvae_kernels.__version__,
        },
        "results": results,
        "agree": agree,
        "criterion": (f"rms error vs the float32 model <= {LOW_SLACK} x the reference's + {LOW_ABS}" if low
                      else f"max_rel vs reference < {MAX_REL_FP32}"),
    }


# The report's table: one row per variant. `python -m leanvae bench` prints it as text and
# benchmarks/report.py writes it as Markdown, both from these cells.
REPORT_COLUMNS = ("variant", "encode s", "decode s", "total s", "vs reference", "enc peak MB", "dec peak MB",
                  "err z", "err x")
_TEXT_WIDTHS = (20, 10, 10, 10, 14, 13, 13, 11, 11)


def error_note(report):
    """What the table's error columns hold: max relative error for float32, relative RMS otherwise."""
    if report["setup"]["dtype"] == "float32":
        return "err: max relative error vs the reference"
    return "err: relative RMS vs the reference"


def report_rows(report):
    """The table's cells, one list of strings per variant, in REPORT_COLUMNS order."""
    key = "max_rel" if report["setup"]["dtype"] == "float32" else "rms_rel"
    rows = []
    for name, r in report["results"].items():
        err = r.get("error")
        rows.append([
            name, f"{r['encode']['seconds']:.3f}", f"{r['decode']['seconds']:.3f}", f"{r['total_seconds']:.3f}",
            f"{r['speedup_vs_reference']:.2f}x", f"{r['encode']['peak_bytes'] / 2**20:.0f}",
            f"{r['decode']['peak_bytes'] / 2**20:.0f}",
            f"{err['encode'][key]:.1e}" if err else "-", f"{err['decode'][key]:.1e}" if err else "-",
        ])
    return rows


def format_table(report):
    """The report as plain text (what `python -m leanvae bench` prints)."""
    s = report["setup"]

    def line(cells):
        return "".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, _TEXT_WIDTHS)))

    lines = [
        f"LeanVAE encode+decode: {s['batch']}x{s['frames']}x{s['height']}x{s['width']} {s['dtype']} on {s['device']} "
        f"(latent {s['latent_dim']}, backend {s['backend']}, tile {s['tile']}, median of {s['repeats']})",
        line(REPORT_COLUMNS),
    ]
    lines += [line(cells) for cells in report_rows(report)]
    lines.append(error_note(report) + ("; vs the float32 model:" if s["dtype"] != "float32" else ""))
    if s["dtype"] != "float32":
        for name, r in report["results"].items():
            e = r.get("error_vs_float32")
            if e:
                lines.append(f"  {name:<18} encode {e['encode']['rms_rel']:.2e}  decode {e['decode']['rms_rel']:.2e}")
    lines.append(f"fused agrees ({report['criterion']}): {'yes' if report['agree'] else 'NO'}")
    return "\n".join(lines)
