"""The GPU suite's own cases (benchmarks/gpu_suite.sh, stage gpu-tests) and the device guard.

On a GPU (`-m gpu`): large-index inputs (> 2^31 elements) for every op family, non-default streams and a
second device, for the cuda and triton backends. Each large-index check runs the fused op on the whole
tensor and compares, against the reference, slices whose elements sit past 2^31 (the ops are independent
across the sliced dimension, so the reference needs only the slice). The same check functions run on the
CPU at small sizes here, so their slicing logic is tested everywhere.

On any machine: the op library's one device guard (`OpBackends.__call__`) with torch.cuda.device mocked,
and the C++ DeviceGuard compiled by nvcc where it exists.
"""
import os
import shutil
import subprocess

import pytest
import torch
from helpers import ROOT, assert_close

import leanvae_kernels as lk
from leanvae_kernels import _backend

HAS_CUDA = torch.cuda.is_available()
BIG = 2**31 + 4099  # elements: past int32 indexing, odd so that no vector path covers the tail exactly
GPU_BACKENDS = [pytest.param("cuda", id="cuda"), pytest.param("triton", id="triton")]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (run by benchmarks/gpu_suite.sh)")


def _backend_ok(backend):
    ok, reason = _backend.backend_status(backend, "cuda")
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {reason}")


# ------------------------------------------------------------------ large-index checks (shared with CPU)
def check_soft_threshold(numel, device, backend, dtype=torch.bfloat16, m=1 << 16):
    """Forward and the input gradient (elementwise, so sliceable); theta's gradient is a sum over all
    elements and is left to the op's own tests."""
    x = torch.randn(numel, device=device, dtype=dtype, requires_grad=True)
    theta = torch.tensor(0.3, device=device)
    out = lk.soft_threshold(x, theta, backend=backend)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    mid = min(2**31, numel) - m // 2
    for lo in (0, max(0, mid), numel - m):  # the start, around 2^31, the end
        sl = slice(lo, lo + m)
        xs = x[sl].detach().float().requires_grad_()
        ref = lk.soft_threshold_reference(xs, theta)
        (ref_gx,) = torch.autograd.grad(ref, xs, g[sl].float())
        assert_close(out[sl], ref, dtype, msg=f"soft_threshold [{lo}:+{m}]")
        assert_close(gx[sl], ref_gx, dtype, msg=f"soft_threshold grad x [{lo}:+{m}]")


def check_haar_patch(shape, device, backend, dtype=torch.bfloat16):
    """shape (B, C, T odd, H, W): the last channel's samples sit at the highest offsets."""
    x = torch.randn(shape, device=device, dtype=dtype)
    xi, xv = lk.haar_patch(x, backend=backend)
    c = shape[1]
    ri, rv = lk.haar_patch_reference(x[:, -1:].float())
    assert_close(xi[:, c - 1::c], ri, dtype, msg="haar_patch 2D bands of the last channel")
    assert_close(xv[:, c - 1::c], rv, dtype, msg="haar_patch 3D bands of the last channel")


def check_causal_conv(shape, device, backend, dtype=torch.bfloat16, k=16):
    """shape (B, T, H, W, C): depthwise, so the last k channels need only their own slice."""
    x = torch.randn(shape, device=device, dtype=dtype)
    weight = torch.randn(shape[-1], 1, 3, 3, 3, device=device, dtype=dtype) / 9
    bias = torch.randn(shape[-1], device=device, dtype=dtype)
    y, cache = lk.causal_dwconv3d(x, weight, bias, backend=backend)
    ry, rcache = lk.causal_dwconv3d_reference(x[..., -k:].float(), weight[-k:].float(), bias[-k:].float())
    assert_close(y[..., -k:], ry, dtype, msg="causal_dwconv3d, last channels")
    assert torch.equal(cache[..., -k:].float(), rcache.to(dtype).float()), "cache of the last channels"


def check_ista_step(rows, device, backend, dtype=torch.bfloat16, D=512, d=16, m=4096):
    """r (rows, D): rows are independent, so the last m rows need only their own slice."""
    r = torch.randn(rows, D, device=device, dtype=dtype)
    y = torch.randn(rows, d, device=device, dtype=dtype)
    phi = (torch.randn(d, D, device=device) / D**0.5).to(dtype)
    w = torch.tensor(0.5, device=device)
    out = lk.ista_step(r, y, phi, w, backend=backend)
    m = min(m, rows)
    ref = lk.ista_step_reference(r[-m:].float(), y[-m:].float(), phi.float(), w)
    assert_close(out[-m:], ref, dtype, msg="ista_step, last rows")


def test_large_index_checks_on_cpu_small():
    """The checks above, at small sizes on the CPU backend: their slicing and references are right."""
    check_soft_threshold(3 * (1 << 16) + 5, "cpu", "cpu", m=1 << 12)
    check_haar_patch((1, 3, 3, 10, 12), "cpu", "cpu")
    check_causal_conv((1, 3, 5, 6, 24), "cpu", "cpu", k=4)
    check_ista_step(300, "cpu", "cpu", D=64, d=4, m=100)


def test_large_index_checks_can_fail():
    """A wrong fused result is caught: the check compares against the reference, not against itself."""
    real = lk.soft_threshold

    def off_by_one_percent(x, theta, *, backend=None):
        return real(x, theta, backend=backend) * 1.01  # differentiable: the gradient check sees it too

    lk.soft_threshold = off_by_one_percent
    try:
        with pytest.raises(AssertionError):
            check_soft_threshold(1 << 14, "cpu", "cpu", dtype=torch.float32, m=1 << 10)
    finally:
        lk.soft_threshold = real


@pytest.mark.gpu
@pytest.mark.xdist_group("large_index")  # ~20 GB each: one at a time under the suite's pytest -n
@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", ["soft_threshold", "haar_patch", "causal_conv", "ista_step"])
def test_large_index(op, backend):
    _backend_ok(backend)
    free = torch.cuda.mem_get_info()[0]
    if free < 24 * 2**30:
        pytest.skip(f"needs ~24 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    if op == "soft_threshold":
        check_soft_threshold(BIG, "cuda", backend)
    elif op == "haar_patch":
        check_haar_patch((1, 64, 3, 3458, 3458), "cuda", backend)  # 2.30e9 elements
    elif op == "causal_conv":
        check_causal_conv((1, 5, 540, 962, 1040), "cuda", backend)  # 2.70e9 elements
    else:
        check_ista_step(BIG // 512 + 7, "cuda", backend)  # 2.15e9 elements
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ streams and devices
def _small_cases(device):
    """(name, fused(x, backend), reference(x), x) for one op of each family, small shapes."""
    g = torch.Generator(device="cpu").manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    theta = torch.tensor(0.2, device=device)
    w3 = rnd(24, 1, 3, 3, 3) / 9
    phi, y, w = rnd(16, 128) / 11, rnd(300, 16), torch.tensor(0.5, device=device)
    return [
        ("soft_threshold", lambda x, b: lk.soft_threshold(x, theta, backend=b),
         lambda x: lk.soft_threshold_reference(x, theta), rnd(5000)),
        ("haar_patch", lambda x, b: lk.haar_patch(x, backend=b)[1],
         lambda x: lk.haar_patch_reference(x)[1], rnd(1, 3, 5, 18, 22)),
        ("causal_conv", lambda x, b: lk.causal_dwconv3d(x, w3, backend=b)[0],
         lambda x: lk.causal_dwconv3d_reference(x, w3)[0], rnd(1, 4, 9, 11, 24)),
        ("ista_step", lambda x, b: lk.ista_step(x, y, phi, w, backend=b),
         lambda x: lk.ista_step_reference(x, y, phi, w), rnd(300, 128)),
    ]


def test_small_cases_on_cpu():
    """The stream and device tests' cases, on the CPU backend: the fused calls and references match."""
    for name, fused, reference, x in _small_cases("cpu"):
        assert_close(fused(x, "cpu"), reference(x), torch.float32, msg=name)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_default_stream(backend):
    """Kernels launch on the caller's current stream: on a side stream held back by a sleep, the input is
    written after the launch is queued; a kernel on another stream would read the NaN poison instead."""
    _backend_ok(backend)
    side = torch.cuda.Stream()
    for name, fused, reference, src in _small_cases("cuda"):
        x = torch.full_like(src, float("nan"))
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)  # ~25 ms of the side stream before x is written
            x.copy_(src)
            out = fused(x, backend)
        side.synchronize()
        assert_close(out, reference(src), torch.float32, msg=f"{name} on a side stream")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: right results on cuda:1, cuda:0 still current after."""
    _backend_ok(backend)
    dev = torch.device("cuda", 1)
    for name, fused, reference, x in _small_cases(dev):
        with torch.cuda.device(0):
            out = fused(x, backend)
            assert torch.cuda.current_device() == 0, f"{name} left another device current"
        assert out.device == dev
        assert_close(out, reference(x), torch.float32, msg=f"{name} on cuda:1")


# ------------------------------------------------------------------------------- device guard, no GPU
class _RecordingDevice:
    """Stands in for torch.cuda.device: records entering and leaving, touches no GPU."""

    log = []

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        self.log.append(("enter", self.device))

    def __exit__(self, *exc):
        self.log.append(("exit", self.device))
        return False


@pytest.fixture
def probe_op(monkeypatch):
    _RecordingDevice.log = []
    monkeypatch.setattr(torch.cuda, "device", _RecordingDevice)
    op = _backend.OpBackends("device_guard_probe")

    @op.register("reference", dtypes=[torch.float32])
    def _(x, fail=False):
        _RecordingDevice.log.append(("run",))
        if fail:
            raise RuntimeError("launch failed")
        return x

    try:
        yield op
    finally:
        _backend.ALL_OPS.remove(op)


def test_dispatch_runs_cuda_ops_under_their_device(probe_op):
    x = torch.zeros(2)
    probe_op("reference", torch.device("cuda", 1), torch.float32, x)
    cuda1 = torch.device("cuda", 1)
    assert _RecordingDevice.log == [("enter", cuda1), ("run",), ("exit", cuda1)]


def test_dispatch_restores_device_when_the_kernel_raises(probe_op):
    with pytest.raises(RuntimeError, match="launch failed"):
        probe_op("reference", torch.device("cuda", 3), torch.float32, torch.zeros(2), True)
    cuda3 = torch.device("cuda", 3)
    assert _RecordingDevice.log == [("enter", cuda3), ("run",), ("exit", cuda3)]


def test_dispatch_leaves_cpu_ops_alone(probe_op):
    probe_op("reference", torch.device("cpu"), torch.float32, torch.zeros(2))
    assert _RecordingDevice.log == [("run",)]


@pytest.mark.toolchain
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_device_guard_compiles(tmp_path):
    """The C++ DeviceGuard (csrc/cuda/cuda_common.cuh) and the module's guarded entry point compile for sm_90."""
    root = ROOT
    src = os.path.join(root, "csrc", "cuda", "runtime_info.cu")
    with open(src) as f:
        assert "cuda::DeviceGuard guard(args.device)" in f.read(), "the entry point no longer holds the guard"
    out = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_90", "-I", os.path.join(root, "csrc"), "-c", src, "-o", str(tmp_path / "ri.o")],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
