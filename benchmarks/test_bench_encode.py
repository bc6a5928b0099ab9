"""`leanvae encode` throughput: clips/s of the whole pipeline (decode video, encode, write shards).

CPU: 17x256x256 float32, fused vs reference (1 process), and 2 ranks x 1 thread vs 1 rank x 1 thread
under torchrun (gloo). GPU (when CUDA is present): 17x256x256 and 17x512x512 bfloat16, fused vs
reference, with the device busy fraction (time in model calls / wall time) to show whether the data
loader keeps up. Figures go to `benchmark.extra_info` (clips_per_s, device_busy_fraction).

With --benchmark-disable (the default addopts) each case runs once on a tiny dataset (5x32x32) as a smoke
test. LEANVAE_BENCH_ENCODE_VIDEOS sets the number of videos (default 4 on CPU, 24 on GPU).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from harness import DRY_RUN, ON_GPU

pytest.importorskip("av", reason="PyAV is not installed")
pytest.importorskip("safetensors", reason="safetensors is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_VIDEOS = int(os.environ.get("LEANVAE_BENCH_ENCODE_VIDEOS", "24" if ON_GPU else "4"))
# on a GPU machine only the GPU cases (the CPU figures come from CPU runs; keeps the GPU suite short)
CASES = [("cuda", "bfloat16", 256), ("cuda", "bfloat16", 512)] if ON_GPU else [("cpu", "float32", 256)]


def _write_videos(folder, n, frames, size):
    from leanvae.video import write_video

    os.makedirs(folder, exist_ok=True)
    t = np.arange(frames)[:, None, None, None]
    y = np.arange(size)[None, :, None, None]
    c = np.arange(3)[None, None, None, :]
    for i in range(n):
        clip = (127 + 100 * np.sin(0.05 * (y + y.transpose(0, 2, 1, 3)) + 0.3 * t + c + i)).astype(np.uint8)
        write_video(os.path.join(folder, f"v{i:04d}.mp4"), clip, fps=24)
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
    frames, size, n = (5, 32, 2) if disabled or DRY_RUN else (17, size, N_VIDEOS)
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
    summaries = []

    def fn():
        summaries.append(encode_dataset([videos], out, workdir["ckpt"], frames=frames, dtype=dtype, device=device,
                                        fused=fused, workers=2, overwrite=True, quiet=True))

    benchmark.pedantic(fn, rounds=1 if benchmark.disabled else 2, iterations=1, warmup_rounds=0)
    s = summaries[-1]
    assert s["failures"] == 0 and s["clips"] == len(os.listdir(videos))
    benchmark.extra_info.update(shape=f"{frames}x{size}x{size}", dtype=dtype, device=device,
                                provider="fused" if fused else "reference", clips_per_s=s["clips_per_s"],
                                device_busy_fraction=s["device_busy_fraction"])


@pytest.mark.skipif(ON_GPU, reason="rank scaling is measured on the CPU (gloo); on GPUs it is one GPU per rank")
@pytest.mark.skipif(DRY_RUN, reason="two torchrun launches do not fit the dry run's per-file budget; "
                                    "tests/test_encode.py runs torchrun")
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
