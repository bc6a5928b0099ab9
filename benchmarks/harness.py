"""The one benchmark harness: providers, timing through pytest-benchmark, peak memory, bandwidth.

Each op's suite (benchmarks/test_bench_<op>.py) parametrises over providers and modes and calls
`run(benchmark, provider, fn, bytes_moved=..., device=...)`. Providers:

    reference   the model's own module / expression (pure PyTorch, eager)
    compile     torch.compile of the reference
    cpu         native C++ kernels       (CPU tensors)
    triton      Triton kernels           (CUDA tensors; on CPU only with TRITON_INTERPRET=1, never timed)
    cuda        CUDA C++ kernels         (CUDA tensors)

`extra_info` of each result: provider, device, dtype, mode, peak memory (CUDA), bytes moved, achieved
GB/s and its fraction of the measured copy bandwidth (each input read once, each output written once).
"""
import functools
import os
import time

import pytest
import torch

PROVIDERS = ("reference", "compile", "cpu", "triton", "cuda")
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# benchmarks/gpu_suite.sh's CPU dry run: tiny shapes, the plumbing only (no figure from it means anything).
DRY_RUN = os.environ.get("GPU_SUITE_DRY_RUN") == "1"


def target(gpu, cpu, dry):
    """The shape for this run: the GPU target shape, the CPU benchmark shape, or the dry run's tiny one."""
    return gpu if ON_GPU else (dry if DRY_RUN else cpu)


def provider_status(provider):
    """(ok, reason) for timing `provider` on this machine."""
    from leanvae_kernels import _native, _triton

    if provider in ("reference", "compile"):
        return True, ""
    if provider == "cpu":
        if ON_GPU:
            return False, "the cpu provider is benchmarked on CPU-only runs"
        mod, reason = _native.module("cpu")
        return mod is not None, reason
    if provider == "cuda":
        if not ON_GPU:
            return False, "no CUDA device"
        mod, reason = _native.module("cuda")
        return mod is not None, reason
    if provider == "triton":
        if not ON_GPU:
            return False, "Triton is benchmarked on GPUs only (the CPU interpreter is for tests)"
        return _triton.status("cuda")
    return False, f"unknown provider {provider}"


def providers(*names):
    """pytest params for `names`, skipping (with the reason) those that cannot run here."""
    params = []
    for name in names or PROVIDERS:
        ok, reason = provider_status(name)
        params.append(pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=reason)))
    return params


def backend_of(provider):
    """The leanvae_kernels backend name for a kernel provider."""
    return {"cpu": "cpu", "triton": "triton", "cuda": "cuda"}[provider]


def synchronize():
    if ON_GPU:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(device_type=None):
    """Measured device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    device = torch.device(device_type or DEVICE.type)
    n = (1 << 28) if device.type == "cuda" else (1 << 20 if DRY_RUN else 1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize()
    reps = 20 if device.type == "cuda" else 10
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * src.numel() * src.element_size() / times[len(times) // 2] / 1e9


def compiled(fn):
    """torch.compile of `fn`, cached per function object so compilation happens once per case."""
    return torch.compile(fn)


def run(benchmark, provider, fn, *, bytes_moved=None, dtype=None, mode="forward", rounds=None, warmup=2):
    """Time `fn()` with pytest-benchmark and record memory and bandwidth in `benchmark.extra_info`."""
    for _ in range(warmup):  # compile, autotune and allocator warm-up stay out of the numbers
        fn()
    synchronize()
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    event_seconds = []  # on a GPU: CUDA-event time of each timed round (host overhead excluded)

    def timed():
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            event_seconds.append(start.elapsed_time(end) / 1e3)
        else:
            fn()

    if rounds is None:
        rounds = int(os.environ.get("LEANVAE_BENCH_ROUNDS", "20" if ON_GPU else "5"))
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    info = benchmark.extra_info
    info.update(provider=provider, device=torch.cuda.get_device_name() if ON_GPU else "cpu", mode=mode)
    if dtype is not None:
        info["dtype"] = str(dtype).replace("torch.", "")
    if ON_GPU:
        info["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    stats = getattr(benchmark, "stats", None)
    median = None
    if event_seconds:
        median = sorted(event_seconds)[len(event_seconds) // 2]
        info["cuda_event_median_s"] = median
    elif stats is not None and getattr(stats, "stats", None) is not None:
        median = stats.stats.median
    if bytes_moved and median:
        gbps = bytes_moved / median / 1e9
        info.update(bytes_moved=int(bytes_moved), gbps=round(gbps, 2),
                    copy_gbps=round(copy_bandwidth_gbps(), 1),
                    frac_copy_bw=round(gbps / copy_bandwidth_gbps(), 3))
