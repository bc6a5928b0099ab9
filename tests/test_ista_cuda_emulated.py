"""The CUDA ISTA step kernels (csrc/cuda/ista_step.cu), launchers included, compiled for the host and run on
the CPU, against the native CPU backend (issue 13 item 3: the only CUDA kernels never executed anywhere).

These kernels cooperate within a block (shared memory, __syncthreads, warp shuffles), so a block is run
as blockDim.x host threads: `__syncthreads()` is a barrier of the block's threads, `__shfl_xor_sync` an
exchange through a per-warp buffer between two barriers of the warp's threads, and dynamic shared
memory one buffer per block (filled with NaN first, so a read of something never written shows). Blocks
run one after the other; the emulated device has few SMs, so the grid-stride loops take several turns.
What this checks: the indexing, the reduce-scatter and warp-order sums, the shared-memory layout and its
sizing by `plan`, the vector/scalar load paths, the partial blocks of the backward, every mode. What it
cannot: device rounding of the 16-bit conversions (the CPU's are used), FMA contraction, timing, races
that a real GPU would interleave differently. Skipped without a host C++20 compiler.
"""
import ctypes
import os
import re

import pytest
import torch
from cuda_tools import EMU_CUDA_NAMESPACE, build_host_emulation
from helpers import DTYPE_IDS, TOL

from leanvae_kernels import _native
from leanvae_kernels.ops import ista as ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMU_SMS = 3  # streaming multiprocessors of the emulated device: small, so blocks loop over their work
H200_SMS = 132

SHIM = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>
#include "common/kernel_args.h"
#include "cpu/cpu_common.h"
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
using std::min;
using std::isfinite;
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3() {} dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct alignas(16) float4 { float x, y, z, w; };
static thread_local dim3 blockIdx, threadIdx, gridDim, blockDim;
using __half = leanvae::cpu::Half;
using __nv_bfloat16 = leanvae::cpu::BFloat16;
typedef void* cudaStream_t;
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaDevAttrMaxSharedMemoryPerBlockOptin = 1, cudaDevAttrMultiProcessorCount = 2,
       cudaFuncAttributeMaxDynamicSharedMemorySize = 3 };
static int emu_sms = 1;
static size_t emu_smem_requested = 0;
inline cudaError_t cudaDeviceGetAttribute(int* v, int attr, int) {
  *v = attr == cudaDevAttrMultiProcessorCount ? emu_sms : 227 * 1024;  // an H100/H200's opt-in limit
  return cudaSuccess;
}
template <class K> inline cudaError_t cudaFuncSetAttribute(K, int, int bytes) { emu_smem_requested = bytes; return cudaSuccess; }
template <class K> inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }

// One block's shared state: dynamic shared memory, a block barrier, and per warp a barrier and an
// exchange buffer for the shuffles.
struct EmuBlock {
  std::vector<float> smem;
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<float> xchg;
  std::atomic<int> any{0};
  EmuBlock(unsigned threads, size_t smem_bytes) : smem(smem_bytes / sizeof(float) + 4, NAN), block(threads), xchg(threads) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warp.emplace_back(new std::barrier<>(32));
  }
};
static thread_local EmuBlock* emu_block = nullptr;
inline void __syncthreads() { emu_block->block.arrive_and_wait(); }
inline int __syncthreads_or(int pred) {
  if (pred) emu_block->any.store(1);
  emu_block->block.arrive_and_wait();
  const int r = emu_block->any.load();
  emu_block->block.arrive_and_wait();
  if (threadIdx.x == 0) emu_block->any.store(0);
  emu_block->block.arrive_and_wait();
  return r;
}
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = threadIdx.x, base = t & ~31u;
  auto& bar = *emu_block->warp[t >> 5];
  emu_block->xchg[t] = v;
  bar.arrive_and_wait();
  const float r = emu_block->xchg[base + ((t & 31u) ^ static_cast<unsigned>(lane_mask))];
  bar.arrive_and_wait();
  return r;
}

""" + EMU_CUDA_NAMESPACE + r"""struct DeviceScalar {
  const void* ptr;
  int dtype;
  float get() const {
    switch (dtype) {
      case kFloat16: return to_float(*static_cast<const __half*>(ptr));
      case kBFloat16: return to_float(*static_cast<const __nv_bfloat16*>(ptr));
      case kFloat64: return static_cast<float>(*static_cast<const double*>(ptr));
      default: return *static_cast<const float*>(ptr);
    }
  }
};
inline void set_device(const KernelArgs&) {}
inline cudaStream_t stream_of(const KernelArgs&) { return nullptr; }
// Every block in turn; a block's threads run concurrently (they meet at barriers).
inline void emu_launch(int grid, int threads, size_t smem, const std::function<void()>& body) {
  if (smem > emu_smem_requested) throw std::runtime_error("launch asks for more shared memory than was opted in");
  for (int b = 0; b < grid; ++b) {
    EmuBlock blk(threads, smem);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, b, t] {
        emu_block = &blk;
        gridDim = dim3(grid); blockDim = dim3(threads); blockIdx = dim3(b); threadIdx = dim3(t);
        body();
      });
    for (auto& th : pool) th.join();
  }
}
}  // namespace cuda
}  // namespace leanvae
#define LEANVAE_CUDA_CHECK(expr) ((void)(expr))
#define LEANVAE_CUDA_CHECK_LAUNCH(args) ((void)0)
#undef LEANVAE_REGISTER_KERNEL
#define LEANVAE_REGISTER_KERNEL(name, fn) static const bool emu_registered_##fn = (emu_register(name, fn), true)
static leanvae::KernelFn emu_kernels[2];
static void emu_register(const char* name, leanvae::KernelFn fn) { emu_kernels[std::string(name) == "ista_step_bwd"] = fn; }
"""

DRIVER = r"""
extern "C" const char* emu_call(int which, int sms, int n, const void* const* ptrs, const int* dtypes, const int* ndims,
                                const int64_t* shapes, const int64_t* strides, const int64_t* ints, int nints) {
  static std::string error;
  emu_sms = sms;
  leanvae::KernelArgs a;
  a.name = which ? "ista_step_bwd" : "ista_step_fwd";
  for (int k = 0; k < n; ++k) {
    leanvae::TensorView v;
    v.data = const_cast<void*>(ptrs[k]);
    v.dtype = dtypes[k];
    v.ndim = ndims[k];
    for (int d = 0; d < v.ndim; ++d) { v.shape[d] = shapes[8 * k + d]; v.stride[d] = strides[8 * k + d]; }
    a.tensors.push_back(v);
  }
  a.ints.assign(ints, ints + nints);
  try { emu_kernels[which](a); } catch (const std::exception& e) { error = e.what(); return error.c_str(); }
  return nullptr;
}
"""


def _emulated_source():
    src = open(os.path.join(CSRC, "cuda", "ista_step.cu")).read()
    src = src.replace('#include "cuda_common.cuh"', "")
    src, n = re.subn(r"extern __shared__ float smem\[\];", "float* smem = emu_block->smem.data();", src)
    assert n == 2, "expected the two kernels' dynamic shared memory"
    # kernel<<<grid, threads, smem, stream>>>(p);  ->  emu_launch(grid, threads, smem, [&] { kernel(p); });
    src, n = re.subn(r"(\w+)<<<([^,]+), ([^,]+), ([^,]+), [^>]*>>>\((.*?)\);", r"emu_launch(\2, \3, \4, [&] { \1(\5); });", src)
    assert n == 1, "expected the one kernel launch of csrc/cuda/ista_step.cu"
    return SHIM + src + DRIVER


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    try:
        lib, why = build_host_emulation(str(tmp_path_factory.mktemp("cuda_emu")), "ista_emu", _emulated_source(),
                                        std="c++20", flags=("-pthread",))
    except RuntimeError as exc:
        if "barrier" in str(exc) and "No such file" in str(exc):
            pytest.skip("the host C++ compiler has no C++20 <barrier>")
        raise
    if lib is None:
        pytest.skip(why)
    lib.emu_call.restype = ctypes.c_char_p
    return lib


def _call(lib, which, tensors, ints, sms=EMU_SMS):
    n, i64 = len(tensors), ctypes.c_int64
    shapes, strides = [0] * (8 * n), [0] * (8 * n)
    for k, t in enumerate(tensors):
        shapes[8 * k:8 * k + t.ndim] = list(t.shape)
        strides[8 * k:8 * k + t.ndim] = list(t.stride())
    err = lib.emu_call(which, sms, n, (ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors]),
                       (ctypes.c_int * n)(*[_native._DTYPE_CODES[t.dtype] for t in tensors]),
                       (ctypes.c_int * n)(*[t.ndim for t in tensors]), (i64 * (8 * n))(*shapes), (i64 * (8 * n))(*strides),
                       (i64 * len(ints))(*ints), len(ints))
    if err:
        raise RuntimeError(err.decode())


def emu_fwd(lib, mode, src, u, y, phi, w):
    """The CUDA launcher's forward, as ops/ista.py calls it (same tensors, same ints)."""
    out = torch.full((y.shape[0], phi.shape[1]), float("nan"), dtype=y.dtype)
    _call(lib, 0, [src, y, phi, w, out] + ([u] if mode == 1 else []), [mode])
    return out


def emu_bwd(lib, mode, grad, src, u, y, phi, w):
    grad_x = torch.full_like(grad, float("nan"))
    grad_y = torch.full(y.shape, float("nan"), dtype=torch.float32)
    rows = ops.ista_partial_rows(grad.shape[0], EMU_SMS)  # what the cuda backend passes on this device
    part_phi, part_w = ops._partials(grad.shape[0], phi.shape[0], phi.shape[1], grad.device, grad.dtype, rows)
    part_phi.fill_(float("nan"))
    part_w.fill_(float("nan"))
    _call(lib, 1, [grad, src, y, phi, w, grad_x, grad_y, part_phi, part_w] + ([u] if mode == 1 else []),
          [mode, rows])
    return (grad_x, grad_y) + ops._finish_grads(part_phi, part_w, phi, w)


def _inputs(mode, n, big_d, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn((big_d, d) if mode == 2 else (n, big_d), generator=g).to(dtype)
    u = torch.randn(n, big_d, generator=g).to(dtype) if mode == 1 else None
    y = torch.randn(n, d, generator=g).to(dtype)
    phi = (torch.randn(d, big_d, generator=g) / big_d ** 0.5).to(dtype)
    w = torch.tensor(0.7)
    grad = torch.randn(n, big_d, generator=g).to(dtype)
    return src, u, y, phi, w, grad


def _close(actual, expected, dtype, what):
    tol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{what}: {m}")


# (N, D, d): d = 4 and 16 (the two register specialisations of the backward, DMAX 4 and 16), one d in
# 17..64 (DMAX 64) and odd ones (padded DP); D not a multiple of 4 (the scalar path), more than one warp,
# N past one 256-row partial block and not a multiple of the row groups.
CASES = [(21, 24, 4), (37, 40, 16), (11, 36, 33), (300, 20, 3), (9, 130, 16), (13, 18, 5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}_D{c[1]}_d{c[2]}")
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["step", "residual", "init"])
def test_emulated_cuda_matches_cpu(emu, mode, case, dtype):
    n, big_d, d = case
    src, u, y, phi, w, grad = _inputs(mode, n, big_d, d, dtype, seed=n + d)
    out = emu_fwd(emu, mode, src, u, y, phi, w)
    ref = ops._step_fwd("cpu", y.device, dtype, mode, src, u, y, phi, w)
    # The kernels sum the d dot products in different orders (CUDA: warp reduce-scatter, CPU: vector
    # lanes): equal up to float32 rounding, then one rounding to the dtype (the table's tolerance).
    _close(out, ref, dtype, "forward")
    got = emu_bwd(emu, mode, grad, src, u, y, phi, w)
    exp = ops._step_bwd("cpu", y.device, dtype, mode, grad, src, u, y, phi, w)
    for name, a, e in zip(("grad_x", "grad_y", "grad_phi"), got, exp):
        assert not a.isnan().any(), f"{name}: an element was never written"
        _close(a, e, dtype if name != "grad_y" else torch.float32, name)
    # grad_w sums N*D products: compare relative to the sum of their magnitudes (test_ista_ops: check_grad_w)
    x = ops._x_of(mode, src, u, y).float()
    e_ = x @ phi.float().T - y.float()
    terms = ((e_ @ phi.float()).abs() * grad.float().abs()).sum().clamp_min(1.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got[3].float() - exp[3].float()).abs() / terms).item() < tol


def test_emulated_cuda_strided_rows_and_misaligned_views(emu):
    # Row strides > D and a view starting one element in: the launchers fall back from the 4-element
    # vector path; results must not change.
    n, big_d, d = 10, 32, 4
    src, u, y, phi, w, grad = _inputs(1, n, big_d, d, torch.float32, seed=5)
    wide = torch.randn(n, big_d + 5)
    wide[:, 1:big_d + 1] = src
    src_view = wide[:, 1:big_d + 1]
    out = emu_fwd(emu, 1, src_view, u, y, phi, w)
    _close(out, ops._step_fwd("cpu", y.device, torch.float32, 1, src, u, y, phi, w), torch.float32, "strided forward")
    got = emu_bwd(emu, 1, grad, src_view, u, y, phi, w)
    exp = ops._step_bwd("cpu", y.device, torch.float32, 1, grad, src, u, y, phi, w)
    for a, e in zip(got[:3], exp[:3]):
        _close(a, e, torch.float32, "strided backward")


def test_emulated_grid_covers_the_work_whatever_the_sm_count(emu):
    # The same call on 1, 3 and 64 emulated SMs (grid-stride loops of different trip counts) gives the
    # same bits: every block's work is a fixed function of its index.
    src, u, y, phi, w, grad = _inputs(0, 70, 24, 4, torch.float32, seed=9)
    outs = []
    for sms in (1, 3, 64):
        out = torch.full((70, 24), float("nan"))
        _call(emu, 0, [src, y, phi, w, out], [0], sms=sms)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_backward_grid_fills_the_gpu():
    # Issue 13: at 20,000 rows the backward launched 79 blocks (one per 256-row partial) for the 132 SMs
    # of an H100/H200. The partials are sized from the SM count: every SM gets work, at most
    # ISTA_PARTIALS_PER_SM blocks each, at that size and others.
    rows = ops.ista_partial_rows(20000, H200_SMS)
    blocks = -(-20000 // rows)
    assert H200_SMS <= blocks <= ops.ISTA_PARTIALS_PER_SM * H200_SMS
    part_phi, _ = ops._partials(20000, 4, 16, torch.device("cpu"), torch.float32, rows)
    assert part_phi.shape[0] == blocks


def test_emulated_partials_one_per_cuda_block(emu):
    # The partial rows the launcher is given decide the partial layout: 300 rows -> 5 partials of 64 rows,
    # each equal to the sum over its own rows (the emulated kernel against per-block CPU sums).
    n, big_d, d = 300, 20, 4
    src, u, y, phi, w, grad = _inputs(0, n, big_d, d, torch.float32, seed=2)
    part_phi, part_w = ops._partials(n, d, big_d, y.device, y.dtype, 64)
    _call(emu, 1, [grad, src, y, phi, w, torch.empty_like(grad), torch.empty(n, d), part_phi, part_w], [0, 64])
    assert part_phi.shape[0] == 5
    e = src @ phi.T - y
    h = grad @ phi.T
    for b in range(5):
        rows = slice(64 * b, min(n, 64 * (b + 1)))
        expected = e[rows].T @ grad[rows] + h[rows].T @ src[rows]
        torch.testing.assert_close(part_phi[b], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(part_w[b], (e[rows] * h[rows]).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("d", [1, 4, 16])
@pytest.mark.parametrize("mode,arg", [(0, "src"), (0, "y"), (1, "u"), (2, "y"), (2, "src"), (0, "phi"), (2, "phi")],
                         ids=["step-r", "step-y", "residual-u", "init-y", "init-Q", "step-phi", "init-phi"])
def test_emulated_cuda_nonfinite_data_like_reference(emu, mode, arg, d, value):
    # Issue 10 item 10 on the CUDA kernels: +Inf, -Inf and NaN in the data or phi give the reference's NaN/Inf
    # pattern in the output and every gradient (grad_w included: rows in the reference's order).
    from test_ieee_ops import assert_same_ieee, poke

    n, big_d = 70, 24
    src, u, y, phi, w, grad = _inputs(mode, n, big_d, d, torch.float32, seed=d)
    named = {"src": src, "u": u, "y": y, "phi": phi}
    named[arg] = poke(named[arg], [value])  # alone: grad_w sums everything, another NaN would hide it
    src, u, y, phi = named["src"], named["u"], named["y"], named["phi"]
    out = emu_fwd(emu, mode, src, u, y, phi, w)
    ref = ops._step_fwd("reference", y.device, torch.float32, mode, src, u, y, phi, w)
    assert_same_ieee(out, ref, "forward")
    got = emu_bwd(emu, mode, grad, src, u, y, phi, w)
    exp = ops._step_bwd("reference", y.device, torch.float32, mode, grad, src, u, y, phi, w)
    for name, a, e in zip(("grad_x", "grad_y", "grad_phi", "grad_w"), got, exp):
        assert_same_ieee(a, e.float(), name)
