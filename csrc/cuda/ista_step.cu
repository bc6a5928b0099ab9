// ISTA-Net+ gradient step on CUDA, forward and backward (see csrc/cpu/ista_step.cpp for the math, the
// three input modes and the tensor layout; this file follows the same calling convention).
//
// Layout: a CTA of NT = ceil(D / 4) threads (rounded up to a warp) covers a token row; thread t owns
// columns 4t..4t+3 of every row, so a row is read and written once with 8- or 16-byte accesses. phi
// (and in the init mode Q^T) sits in shared memory as float, zero-padded to (DP, D4). A CTA works on
// R rows at a time: each thread forms its share of the R x d dot products, a warp reduce-scatter leaves
// one sum per lane, and the warps' sums are added in warp order through shared memory. The rank-d
// update then reads e from shared memory. Every sum has a fixed order, so results are deterministic.
// The backward keeps its grad_phi partial in registers (up to 16 x 4 per thread; for d > 16 one pass
// over the rows per 16 phi rows) over a block of `rows_per_partial` rows and writes one partial per
// block, as the CPU kernel does.
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_common.cuh"
#include "ista_step_plan.h"

namespace leanvae {
namespace cuda {
namespace {

namespace is = ista;
using namespace ista;  // Mode, StepParams, kCols, kBwdRows, kMaxThreads

template <class T, int MODE, int R>
__global__ void _ista_step_fwd_kernel(StepParams p) {
  extern __shared__ float smem[];
  is::fwd_body<T, MODE, R>(p, smem);
}

template <class T, int MODE, int DMAX>
__global__ void _ista_step_bwd_kernel(StepParams p) {
  extern __shared__ float smem[];
  is::bwd_body<T, MODE, DMAX>(p, smem);
}

// ---------------------------------------------------------------------------------------- launch
// What a launch needs from the device, asked once per device and per (kernel, block shape) and kept for the
// process: the opt-in shared memory limit and SM count do not change, and a kernel's occupancy at a given
// block size and shared memory is fixed. The dynamic shared memory limit of a kernel is raised to the
// largest size it has been launched with on that device (never lowered: a cached larger launch must
// still fit).
struct DeviceLimits {
  int max_optin = 0;
  int sms = 0;
};

std::mutex& plan_mutex() {
  static std::mutex m;
  return m;
}

DeviceLimits device_limits(int device) {
  static std::map<int, DeviceLimits> cache;
  std::lock_guard<std::mutex> lock(plan_mutex());
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceLimits l;
  LEANVAE_CUDA_CHECK(cudaDeviceGetAttribute(&l.max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  LEANVAE_CUDA_CHECK(cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, device));
  cache.emplace(device, l);
  return l;
}

template <class Kernel>
int resident_per_sm(Kernel kernel, int device, int threads, size_t smem) {
  static std::map<std::pair<const void*, int>, size_t> smem_set;
  static std::map<std::tuple<const void*, int, int, size_t>, int> occupancy;
  const void* fn = reinterpret_cast<const void*>(kernel);
  std::lock_guard<std::mutex> lock(plan_mutex());
  const auto key = std::make_tuple(fn, device, threads, smem);
  auto it = occupancy.find(key);
  if (it != occupancy.end()) return it->second;
  size_t& raised = smem_set[{fn, device}];
  if (smem > raised) {
    LEANVAE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    raised = smem;
  }
  int per_sm = 0;
  LEANVAE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  occupancy.emplace(key, per_sm);
  return per_sm;
}

// The module's entry point (bindings.cpp) has made a.device current (DeviceGuard).
template <class Kernel>
void launch(const KernelArgs& a, Kernel kernel, const Launch& l, int64_t work_items, const StepParams& p) {
  const DeviceLimits dev = device_limits(a.device);
  if (l.threads > kMaxThreads || l.smem > static_cast<size_t>(dev.max_optin))
    throw std::invalid_argument(a.name + ": D = " + std::to_string(p.D) + ", d = " + std::to_string(p.d) +
                                " needs " + std::to_string(l.threads) + " threads and " + std::to_string(l.smem) +
                                " bytes of shared memory per block; this kernel supports D <= 4096 and " +
                                std::to_string(dev.max_optin) + " bytes");
  const int per_sm = resident_per_sm(kernel, a.device, l.threads, l.smem);
  const int64_t resident = static_cast<int64_t>(dev.sms) * (per_sm > 0 ? per_sm : 1);
  const int grid = static_cast<int>(work_items < resident ? work_items : resident);
  kernel<<<grid, l.threads, l.smem, stream_of(a)>>>(p);
  LEANVAE_CUDA_CHECK_LAUNCH(a);
}

void ista_step_fwd_cuda(const KernelArgs& a) {
  const TensorView &src = a.t(0), &y = a.t(1), &phi = a.t(2), &w = a.t(3), &out = a.t(4);
  const int mode = static_cast<int>(a.i(0));
  const TensorView* u = mode == kResidual ? &a.t(5) : nullptr;
  StepParams p = common_params(a, mode, src, y, phi, w, out, u);
  if (p.n == 0) return;
  p.out = out.data;
  dispatch_float(out.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    p.vec = fwd_vec(p, mode, src, u, out, sizeof(T));
    with_mode(mode, a.name, [&](auto m) {
      constexpr int M = decltype(m)::value;
      p.DP = fwd_dp(p.d);
      if (fwd_rows(p.d) == 8) launch(a, _ista_step_fwd_kernel<T, M, 8>, plan(p, mode, 8), (p.n + 7) / 8, p);
      else launch(a, _ista_step_fwd_kernel<T, M, 4>, plan(p, mode, 4), (p.n + 3) / 4, p);
    });
  });
}

void ista_step_bwd_cuda(const KernelArgs& a) {
  const TensorView &grad = a.t(0), &src = a.t(1), &y = a.t(2), &phi = a.t(3), &w = a.t(4);
  const TensorView &grad_x = a.t(5), &grad_y = a.t(6), &part_phi = a.t(7), &part_w = a.t(8);
  const int mode = static_cast<int>(a.i(0));
  const TensorView* u = mode == kResidual ? &a.t(9) : nullptr;
  StepParams p = common_params(a, mode, src, y, phi, w, grad, u);
  p.rows_per_partial = a.i(1);
  if (p.rows_per_partial <= 0 || p.rows_per_partial % kBwdRows != 0)
    throw std::invalid_argument(a.name + ": rows_per_partial must be a positive multiple of 4");
  if (p.n == 0) {
    LEANVAE_CUDA_CHECK(cudaMemsetAsync(part_phi.data, 0, part_phi.numel() * sizeof(float), stream_of(a)));
    LEANVAE_CUDA_CHECK(cudaMemsetAsync(part_w.data, 0, part_w.numel() * sizeof(float), stream_of(a)));
    return;
  }
  p.grad = grad.data;
  p.grad_rs = grad.st(0);
  p.out = grad_x.data;
  p.grad_y = grad_y.ptr<float>();
  p.part_phi = part_phi.ptr<float>();
  p.part_w = part_w.ptr<float>();
  p.DP = bwd_dp(p.d);
  const int64_t blocks = (p.n + p.rows_per_partial - 1) / p.rows_per_partial;
  dispatch_float(grad.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    p.vec = bwd_vec(p, mode, grad, src, u, grad_x, sizeof(T));
    with_mode(mode, a.name, [&](auto m) {
      constexpr int M = decltype(m)::value;
      const Launch l = plan(p, mode, 2 * kBwdRows);
      const int dmax = bwd_dmax(p.d);
      if (dmax == 4) launch(a, _ista_step_bwd_kernel<T, M, 4>, l, blocks, p);
      else if (dmax == 16) launch(a, _ista_step_bwd_kernel<T, M, 16>, l, blocks, p);
      else launch(a, _ista_step_bwd_kernel<T, M, 64>, l, blocks, p);
    });
  });
}

}  // namespace

LEANVAE_REGISTER_KERNEL("ista_step_fwd", ista_step_fwd_cuda);
LEANVAE_REGISTER_KERNEL("ista_step_bwd", ista_step_bwd_cuda);

}  // namespace cuda
}  // namespace leanvae
