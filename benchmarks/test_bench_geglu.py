"""Benchmarks: the feed-forward's GEGLU (value * gelu(gate) over u = [value | gate]), forward and backward.

    python -m pytest benchmarks/test_bench_geglu.py --benchmark-enable -q \
        --benchmark-json=benchmarks/results/geglu_<device>.json

Shapes: u (N, 2p) with p = 1376 (D = 512's inner width 1365 padded to 32, as leanvae/fused/ffd.py runs it);
on the CPU 20,000 tokens in float32 and bfloat16, on a GPU 162,000 (a 17-frame 1080p clip's token grid).
Providers: reference (the model's expression `F.gelu(gate) * value` on the halves of u, eager, in u's
dtype), compile (torch.compile of it), cpu, triton (the geglu op).
bytes_moved: forward, u read once and the (N, p) result written once (3p elements a row); backward, grad and
u read and grad_u written (5p a row). The model's expression moves 5p forward (gate read, gelu written, gelu
and value read, product written); its bandwidth fraction is against the fused minimum, so it shows the cost
of that round trip.

test_alternating_ratio times the op and the expression alternately in one loop (the CPU is shared and
noisy; back-to-back pytest-benchmark cases can fall in different minutes) and records the median ratio.
"""
import time

import pytest
import torch
import torch._functorch.config  # noqa: F401  (as the other suites: not loaded by `import torch` alone)
import torch.nn.functional as F
from harness import DEVICE, ON_GPU, backend_of, compiled, providers, run, synchronize, target

import leanvae_kernels as lk

N, P = target((162_000, 1376), (20_000, 1376), dry=(64, 40))
DTYPES = [torch.bfloat16, torch.float32]
PROVIDERS = providers("reference", "compile", "cpu", "triton")
DTYPE_IDS = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def model_geglu(u):
    """The published GEGLU on u = [value | gate]."""
    x, gate = u.chunk(2, dim=-1)
    return F.gelu(gate) * x


def _fn(provider):
    if provider == "reference":
        return model_geglu
    if provider == "compile":
        return compiled(model_geglu)
    backend = backend_of(provider)
    return lambda u: lk.geglu(u, backend=backend)


def _bytes(dtype, mode):
    elems = {"forward": 3 * P, "backward": 5 * P}[mode] * N
    return elems * torch.tensor([], dtype=dtype).element_size()


def _u(dtype, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, 2 * P, generator=g) * 2).to(DEVICE, dtype).requires_grad_(requires_grad)


def _group(benchmark, dtype, mode):
    benchmark.group = f"geglu {N}x{2 * P} {DTYPE_IDS[dtype]} {mode}"
    benchmark.extra_info.update(tokens=N, p=P)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward(benchmark, provider, dtype):
    _group(benchmark, dtype, "forward")
    fn, u = _fn(provider), _u(dtype)
    with torch.no_grad():
        run(benchmark, provider, lambda: fn(u), bytes_moved=_bytes(dtype, "forward"), dtype=dtype, mode="forward")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_backward(benchmark, provider, dtype):
    _group(benchmark, dtype, "backward")
    fn, u = _fn(provider), _u(dtype, requires_grad=True)
    with torch._functorch.config.patch(donated_buffer=False):
        out = fn(u)
        grad = torch.randn_like(out)
        run(benchmark, provider, lambda: torch.autograd.grad(out, [u], grad, retain_graph=True),
            bytes_moved=_bytes(dtype, "backward"), dtype=dtype, mode="backward")


def _alternate(fns, reps):
    """Median seconds of each fn, timed in turn (A, B, A, B, ...) so drifts of a shared machine hit both."""
    times = [[] for _ in fns]
    for f in fns:  # warm-up (allocator, first-call costs)
        f()
    for _ in range(reps):
        for i, f in enumerate(fns):
            synchronize()
            t0 = time.perf_counter()
            f()
            synchronize()
            times[i].append(time.perf_counter() - t0)
    return [sorted(t)[len(t) // 2] for t in times]


@pytest.mark.parametrize("mode", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_alternating_ratio(benchmark, dtype, mode):
    """Fused op vs the model's expression, alternated in one loop; extra_info holds both medians and the ratio."""
    fused_provider = "triton" if ON_GPU else "cpu"
    fused, ref = _fn(fused_provider), model_geglu
    if mode == "forward":
        u = _u(dtype)
        with torch.no_grad():
            fns = [lambda: fused(u), lambda: ref(u)]
            t_fused, t_ref = _alternate(fns, reps=15)
            bench_fn = fns[0]
    else:
        u = _u(dtype, requires_grad=True)
        outs = [fused(u), ref(u)]
        grad = torch.randn_like(outs[0])
        fns = [lambda o=o: torch.autograd.grad(o, [u], grad, retain_graph=True) for o in outs]
        t_fused, t_ref = _alternate(fns, reps=15)
        bench_fn = fns[0]
    benchmark.group = f"geglu alternating {N}x{2 * P} {DTYPE_IDS[dtype]} {mode}"
    benchmark.extra_info.update(
        fused_provider=fused_provider, fused_median_s=t_fused, reference_median_s=t_ref,
        speedup_vs_reference=round(t_ref / t_fused, 3),
    )
    run(benchmark, fused_provider, bench_fn, bytes_moved=_bytes(dtype, mode), dtype=dtype, mode=mode)
