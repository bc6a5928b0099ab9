"""Peak memory and agreement of tiled vs untiled decode (and encode), each run in a fresh process.

    python benchmarks/tiling_memory.py                       # decode 17x512x512, tiles 128x128, float32
    python benchmarks/tiling_memory.py --what encode --fused

Every run is a fresh Python process that builds the published-default model with random weights (seed 0),
makes its input (seeded), warms up (one tiny call, and the receptive-field probe, in every mode, so all
modes start from the same state), then resets the kernel's resident-set high-water mark
(`/proc/self/clear_refs` <- 5, Linux) and reads `VmHWM - VmRSS` around the one measured call: the peak of
resident memory above the start of the call, i.e. everything the call allocated and touched (activations,
the output, allocator slack), measured by the kernel, not sampled. glibc keeps freed heap resident unless
told otherwise, which would make the figure depend on the allocation history instead of on live tensors, so
the children run with MALLOC_MMAP_THRESHOLD_=65536 (large buffers get their own mappings, returned on free);
pass --glibc-defaults to measure without it. Outputs are saved and compared in the parent: max|a-b| /
max|untiled|. Linux only.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def child(a):
    import time

    import numpy as np
    import torch

    import leanvae
    import leanvae.tiling

    torch.manual_seed(0)
    np.random.seed(0)
    model = leanvae.LeanVAE().eval()
    if a.fused:
        leanvae.use_fused_kernels(model)
    h, w = a.size
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        leanvae.tiling.receptive_field(model)  # every mode: same warm state
        if a.what == "decode":
            inp = torch.randn(1, model.latent_bottleneck.phi.shape[0], (a.frames - 1) // 4 + 1, h // 8, w // 8, generator=g)
            warm = inp[..., :2, :2]
        else:
            inp = torch.rand(1, 3, a.frames, h, w, generator=g) - 0.5
            warm = inp[..., :16, :16]
        call = model.decode if a.what == "decode" else model.encode
        call(warm.contiguous())
        mode, _, chunk = a.mode.partition("-chunk")
        if chunk:
            a.chunk = int(chunk)
        if mode == "tiled":
            model.enable_tiling(*a.tile)
        elif mode == "chunked":
            model.set_tile_inference(True)
        if a.chunk is not None:
            if a.what == "decode":
                model.chunksize_dec = a.chunk
            else:
                model.chunksize_enc = a.chunk
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status()["VmRSS"]
        t = time.perf_counter()
        out = call(inp)
        seconds = time.perf_counter() - t
        peak = _status()["VmHWM"] - base
    torch.save(out, a.save)
    print(json.dumps({"mode": a.mode, "peak_bytes": peak, "seconds": seconds}))


def _size(text):
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=["decode", "encode"], default="decode")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=_size, default=(512, 512))
    p.add_argument("--tile", type=_size, default=(128, 128))
    p.add_argument("--chunk", type=int, default=None, help="chunksize_dec / chunksize_enc for the chunked modes "
                   "(default: the model's, 5 latent frames / 9 frames)")
    p.add_argument("--modes", default="untiled,tiled", help="comma-separated: untiled, chunked (temporal only), "
                   "tiled; a suffix -chunkN sets that mode's chunk size (e.g. tiled-chunk2)")
    p.add_argument("--concurrent", action="store_true", help="run the modes' processes at the same time")
    p.add_argument("--fused", action="store_true")
    p.add_argument("--glibc-defaults", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.mode = a.child
        return child(a)
    import torch

    env = dict(os.environ)
    if not a.glibc_defaults:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    results, outs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for mode in a.modes.split(","):
            save = os.path.join(tmp, mode + ".pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--save", save, "--what", a.what,
                   "--frames", str(a.frames), "--size", "%dx%d" % a.size, "--tile", "%dx%d" % a.tile]
            cmd += ["--fused"] if a.fused else []
            cmd += ["--chunk", str(a.chunk)] if a.chunk is not None else []
            procs[mode] = (save, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  text=True, cwd=root))
            if not a.concurrent:
                procs[mode][1].wait()
        for mode, (save, proc) in procs.items():
            stdout, stderr = proc.communicate()
            if proc.returncode:
                sys.exit(f"{mode} run failed:\n{stderr}")
            results[mode] = json.loads(stdout.strip().splitlines()[-1])
            outs[mode] = torch.load(save)
    ref = outs.get("untiled")
    report = {"what": a.what, "frames": a.frames, "size": list(a.size), "tile": list(a.tile), "fused": a.fused,
              "chunk": a.chunk, "malloc_mmap_threshold": None if a.glibc_defaults else 65536, "runs": results}
    for mode, r in results.items():
        line = f"{a.what} {mode:>8}: peak {r['peak_bytes'] / 2**20:8.1f} MiB, {r['seconds']:7.2f} s"
        if ref is not None and mode != "untiled":
            rel = ((outs[mode] - ref).abs().max() / ref.abs().max()).item()
            r["max_rel_vs_untiled"] = rel
            r["peak_over_untiled"] = r["peak_bytes"] / results["untiled"]["peak_bytes"]
            line += f", peak/untiled {r['peak_over_untiled']:.3f}, max rel diff {rel:.2e}"
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
