// Emulated launches of the CUDA soft-threshold kernels (csrc/cuda/soft_threshold.cu's launchers: same grid,
// block and arguments), running the bodies of csrc/cuda/soft_threshold_body.cuh.
#pragma once
#include "cuda/soft_threshold_body.cuh"
#include "emu_common.h"

namespace lvemu {
namespace soft_threshold {

namespace st = ::leanvae::cuda::soft_threshold;
using leanvae::KernelArgs;
using leanvae::cuda::DeviceScalar;

inline int grid_for(int64_t work_items) {
  const int64_t blocks = (work_items + st::kThreads - 1) / st::kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

inline void fwd(const KernelArgs& a) {
  const leanvae::TensorView &x = a.t(0), &theta = a.t(1), &out = a.t(2);
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_gpu_float(x.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    const bool aligned = (reinterpret_cast<uintptr_t>(x.data) % 16 == 0) && (reinterpret_cast<uintptr_t>(out.data) % 16 == 0);
    const int64_t packs = (n + st::Pack<T>::kVec - 1) / st::Pack<T>::kVec;
    const DeviceScalar th{theta.data, theta.dtype};
    std::function<void()> body = [&] { st::fwd_body<T>(x.ptr<const T>(), out.ptr<T>(), n, th.get(), aligned); };
    launch("_soft_threshold_fwd_kernel", dim3(grid_for(packs)), dim3(st::kThreads), 0, body);
  });
}

inline void bwd(const KernelArgs& a) {
  const leanvae::TensorView &grad = a.t(0), &x = a.t(1), &theta = a.t(2), &grad_x = a.t(3), &partials = a.t(4);
  const int64_t block = a.i(0), n = x.numel();
  if (n == 0) {
    *partials.ptr<float>() = 0.f;
    return;
  }
  const int64_t blocks = (n + block - 1) / block;
  dispatch_gpu_float(x.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    const DeviceScalar th{theta.data, theta.dtype};
    std::function<void()> body = [&] {
      auto warp_sums = shared_array<float>("warp_sums", st::kThreads / 32);
      st::bwd_body<T>(grad.ptr<const T>(), x.ptr<const T>(), grad_x.ptr<T>(), partials.ptr<float>(), n, block, th.get(),
                      warp_sums);
    };
    launch("_soft_threshold_bwd_kernel", dim3(static_cast<unsigned>(blocks)), dim3(st::kThreads), 0, body);
  });
}

}  // namespace soft_threshold
}  // namespace lvemu
