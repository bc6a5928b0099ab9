"""`leanvae encode` throughput: clips/s of the whole pipeline (decode video, encode, write shards).

CPU: 17x256x256 float32, fused vs reference (1 process), and 2 ranks x 1 thread vs 1 rank x 1 thread
under torchrun (gloo). GPU (when CUDA is present): 17x256x256 and 17x512x512 bfloat16, fused vs
reference, with the device busy fraction (seconds in model calls, timed between device synchronisations,
over wall seconds) to show whether the data loader keeps up. `benchmark.extra_info` gets the video reader
(PyAV, or OpenCV where PyAV is missing, as on the GPU image), clips/s, frames/s, busy fraction, peak device
memory, DataLoader workers and, on a GPU, the untimed warm-up run's wall time (CUDA context, cuDNN
heuristics, Triton compiles).

With --benchmark-disable (the default addopts) or in the GPU suite's dry run, each case runs once on a
tiny dataset (5x32x32) as a smoke test. LEANVAE_BENCH_ENCODE_VIDEOS sets the number of videos, one clip
each (default 4 on CPU; on a GPU 64 at 256 and 32 at 512), LEANVAE_BENCH_ENCODE_WORKERS the DataLoader
workers (default 2 on CPU; on a GPU cpu_count - 4, at most 12: 12 on the 16-core H200 machine). In the GPU
suite each case's figures are also appended, as it ends, to $PREFIX-encode-cases.jsonl, so a file cut
off by its timeout still leaves the cases it finished.

GPU time budget. gpu_suite.sh's stage `bench` has T_MAX 150 s split over 4 files: about 37 s for this one.
Estimated without a GPU (none was lent to this task), from parts measured on the 2-core CPU here and
counts: pytest, torch and CUDA start 5-10 s; checkpoint 0.3 s (build 0.25 s, save 0.06 s); writing the
videos with OpenCV (the GPU image has no PyAV) 0.4 s for 64 at 256 and 1.1 s for 32 at 512 (base pattern
included); each encode_dataset call's setup (checkpoint sha256 and loads, model to the device) 0.5-0.8 s,
4 cases x 2 calls (warm-up, timed) = 4-6 s; warm-up model calls (cuDNN heuristics, Triton compiles, cached
on disk after the gpu-tests stage) 1-4 s in all; timed clips: a reference encode is 249 aten ops and a
fused one 165 (counted at 17x64x64), 116 GFLOP at 17x256x256 and 4x that at 512 (torch's FlopCounter),
so 3-10 ms a clip at 256 and 6-25 ms at 512 on an H200 (launch-bound at 256), and 64 + 32 clips take at
most 1.5 s per provider. Sum: 15-25 s, inside the 37 s with room; if it times out, lower
LEANVAE_BENCH_ENCODE_VIDEOS (the cases already done are in the jsonl file).
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from harness import DRY_RUN, ON_GPU

pytest.importorskip("safetensors", reason="safetensors is not installed")
try:  # PyAV, else OpenCV (the GPU image has OpenCV but no PyAV); the bench skips only with neither
    from leanvae.video import video_reader

    READER = video_reader()
except (ImportError, ValueError) as exc:  # VideoError is a ValueError
    pytest.skip(f"no video reader: {exc}", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_N_DEFAULT = {256: 64, 512: 32} if ON_GPU else {256: 4}
N_VIDEOS = {size: int(os.environ.get("LEANVAE_BENCH_ENCODE_VIDEOS", n)) for size, n in _N_DEFAULT.items()}
# decoding runs in the workers: on the 16-core GPU machine most cores decode, a few stay for the main
# process (model launches, shard writes) and the pipes; 2 on the CPU, where the cores run the model
WORKERS = int(os.environ.get("LEANVAE_BENCH_ENCODE_WORKERS",
                             max(2, min(12, (os.cpu_count() or 8) - 4)) if ON_GPU else 2))
# on a GPU machine only the GPU cases (the CPU figures come from CPU runs; keeps the GPU suite short)
CASES = [("cuda", "bfloat16", 256), ("cuda", "bfloat16", 512)] if ON_GPU else [("cpu", "float32", 256)]


def _write_videos(folder, n, frames, size):
    from leanvae.video import write_video

    os.makedirs(folder, exist_ok=True)
    t = np.arange(frames)[:, None, None, None]
    y = np.arange(size)[None, :, None, None]
    c = np.arange(3)[None, None, None, :]
    base = (127 + 100 * np.sin(0.05 * (y + y.transpose(0, 2, 1, 3)) + 0.3 * t + c)).astype(np.uint8)
    for i in range(n):  # each video its own content (a shifted copy: cheap to make, same cost to code)
        write_video(os.path.join(folder, f"v{i:04d}.mp4"), np.roll(base, 7 * i, axis=2), fps=24)
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_encode")
    from leanvae.bench import build_model

    ckpt = str(root / "model.ckpt")
    build_model(4).save_checkpoint(ckpt)  # the published configuration, seeded random weights
    return {"root": root, "ckpt": ckpt, "videos": {}}


def _dataset(workdir, disabled, size):
    # benchmarks disabled (a smoke test) or the GPU suite's CPU dry run (plumbing only): a tiny dataset
    frames, size, n = (5, 32, 2) if disabled or DRY_RUN else (17, size, N_VIDEOS[size])
    key = (frames, size, n)
    if key not in workdir["videos"]:
        workdir["videos"][key] = _write_videos(str(workdir["root"] / f"videos_{frames}_{size}_{n}"), n, frames, size)
    return workdir["videos"][key], frames


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("device,dtype,size", CASES, ids=[f"{d}-{t}-{s}" for d, t, s in CASES])
def test_encode_clips_per_s(benchmark, workdir, device, dtype, size, fused):
    from leanvae.encode import encode_dataset

    videos, frames = _dataset(workdir, benchmark.disabled, size)
    out = str(workdir["root"] / f"out_{device}_{dtype}_{size}_{fused}")
    run = dict(frames=frames, dtype=dtype, device=device, fused=fused, workers=WORKERS, overwrite=True,
               quiet=True, reader=READER)
    warmup_s = None
    if device == "cuda":
        # CUDA context, cuDNN heuristics and Triton compiles happen in the first model calls: a one-video run
        # first, reported apart (warmup_wall_s), so the timed run starts warm
        t0 = time.perf_counter()
        encode_dataset([os.path.join(videos, sorted(os.listdir(videos))[0])], out + "_warmup", workdir["ckpt"],
                       **{**run, "workers": 0})
        warmup_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    summaries = []

    def fn():
        summaries.append(encode_dataset([videos], out, workdir["ckpt"], **run))

    # CPU: 2 rounds (a quiet machine's figure is their median); GPU: 1 warm round, to fit the stage's cap
    rounds = 1 if benchmark.disabled or device == "cuda" else 2
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    s = summaries[-1]
    assert s["failures"] == 0 and s["clips"] == len(os.listdir(videos)) and s["reader"] == READER
    benchmark.extra_info.update(
        shape=f"{frames}x{size}x{size}" if not (benchmark.disabled or DRY_RUN) else f"{frames}x32x32",
        dtype=dtype, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        provider="fused" if fused else "reference", reader=s["reader"], workers=s["workers"], clips=s["clips"],
        clips_per_s=s["clips_per_s"], frames_per_s=s["frames_per_s"], wall_s=s["wall_s"], setup_s=s["setup_s"],
        device_busy_fraction=s["device_busy_fraction"], warmup_wall_s=warmup_s,
        peak_device_mem_mb=torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None)
    if os.environ.get("STAGE_NAME") == "bench" and os.environ.get("PREFIX"):  # inside gpu_suite.sh
        with open(os.environ["PREFIX"] + "-encode-cases.jsonl", "a") as f:
            f.write(json.dumps({"case": f"{device}-{dtype}-{size}-{'fused' if fused else 'reference'}",
                                **benchmark.extra_info}) + "\n")
    print(f"\nencode {benchmark.extra_info['shape']} {dtype} {benchmark.extra_info['provider']}: "
          f"{s['clips_per_s']:.2f} clips/s, {s['frames_per_s']:.1f} frames/s, busy {s['device_busy_fraction']:.2f}, "
          f"reader {s['reader']}, {s['workers']} workers" + (f", warm-up {warmup_s:.1f} s" if warmup_s else ""))


@pytest.mark.skipif(ON_GPU, reason="rank scaling is measured on the CPU (gloo); on GPUs it is one GPU per rank")
@pytest.mark.skipif(DRY_RUN, reason="two torchrun launches do not fit the dry run's per-file budget; "
                                    "tests/tools/test_encode.py runs torchrun")
@pytest.mark.parametrize("ranks", [1, 2])
def test_encode_rank_scaling_cpu(benchmark, workdir, ranks):
    videos, frames = _dataset(workdir, benchmark.disabled, 256)
    out = str(workdir["root"] / f"out_ranks{ranks}")
    summary_path = str(workdir["root"] / f"summary_ranks{ranks}.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "leanvae", "encode", videos, "--out", out, "--checkpoint", workdir["ckpt"], "--frames", str(frames),
           "--videos-per-shard", "1", "--workers", "1", "--overwrite", "-q", "--summary-json", summary_path]

    def fn():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    with open(summary_path) as f:
        s = json.load(f)
    assert s["failures"] == 0 and s["ranks"] == ranks
    # clips/s over the encoding itself (the summary excludes process start, checkpoint hash and model load)
    benchmark.extra_info.update(shape=f"{frames}x256x256", ranks=ranks, threads_per_rank=1,
                                clips_per_s=s["clips_per_s"], device_busy_fraction=s["device_busy_fraction"])
