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
#include <string>
#include <type_traits>

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
template <class Kernel>
void launch(const KernelArgs& a, Kernel kernel, const Launch& l, int64_t work_items, const StepParams& p) {
  int max_optin = 0, sms = 0;
  LEANVAE_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, a.device));
  LEANVAE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device));
  if (l.threads > kMaxThreads || l.smem > static_cast<size_t>(max_optin))
    throw std::invalid_argument(a.name + ": D = " + std::to_string(p.D) + ", d = " + std::to_string(p.d) +
                                " needs " + std::to_string(l.threads) + " threads and " + std::to_string(l.smem) +
                                " bytes of shared memory per block; this kernel supports D <= 4096 and " +
                                std::to_string(max_optin) + " bytes");
  LEANVAE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.smem)));
  int per_sm = 0;
  LEANVAE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, l.threads, l.smem));
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
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
  set_device(a);
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
  set_device(a);
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
