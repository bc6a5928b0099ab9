// Soft threshold on CUDA: out = sign(x) * relu(|x| - theta), and its backward.
// Contiguous tensors of one dtype; theta is read on the device (no host sync).
// Memory-bound: each thread handles kVec consecutive elements with 16-byte loads where aligned. The kernel
// bodies live in soft_threshold_body.cuh (also compiled for the test suite's emulation).
#include <cstdint>

#include "cuda_common.cuh"
#include "soft_threshold_body.cuh"

namespace leanvae {
namespace cuda {
namespace {

namespace st = soft_threshold;
using st::kThreads;

template <class T>
__global__ void _soft_threshold_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t n, DeviceScalar theta,
                                           bool aligned) {
  st::fwd_body<T>(x, out, n, theta.get(), aligned);
}

template <class T>
__global__ void _soft_threshold_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ grad_x,
                                           float* __restrict__ partials, int64_t n, int64_t block, DeviceScalar theta) {
  __shared__ float warp_sums[kThreads / 32];
  st::bwd_body<T>(grad, x, grad_x, partials, n, block, theta.get(), warp_sums);
}

int grid_for(int64_t work_items) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

void soft_threshold_fwd_cuda(const KernelArgs& a) {
  const TensorView &x = a.t(0), &theta = a.t(1), &out = a.t(2);
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(x.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    const bool aligned = (reinterpret_cast<uintptr_t>(x.data) % 16 == 0) && (reinterpret_cast<uintptr_t>(out.data) % 16 == 0);
    const int64_t packs = (n + st::Pack<T>::kVec - 1) / st::Pack<T>::kVec;
    _soft_threshold_fwd_kernel<T><<<grid_for(packs), kThreads, 0, stream_of(a)>>>(
        x.ptr<const T>(), out.ptr<T>(), n, DeviceScalar{theta.data, theta.dtype}, aligned);
    LEANVAE_CUDA_CHECK_LAUNCH(a);
  });
}

void soft_threshold_bwd_cuda(const KernelArgs& a) {
  const TensorView &grad = a.t(0), &x = a.t(1), &theta = a.t(2), &grad_x = a.t(3), &partials = a.t(4);
  const int64_t block = a.i(0), n = x.numel();
  if (n == 0) {
    LEANVAE_CUDA_CHECK(cudaMemsetAsync(partials.data, 0, sizeof(float), stream_of(a)));
    return;
  }
  const int64_t blocks = (n + block - 1) / block;
  if (blocks > 0x7fffffffLL) throw std::invalid_argument(a.name + ": too many partial blocks");
  dispatch_float(x.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    _soft_threshold_bwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream_of(a)>>>(
        grad.ptr<const T>(), x.ptr<const T>(), grad_x.ptr<T>(), partials.ptr<float>(), n, block,
        DeviceScalar{theta.data, theta.dtype});
    LEANVAE_CUDA_CHECK_LAUNCH(a);
  });
}

}  // namespace

LEANVAE_REGISTER_KERNEL("soft_threshold_fwd", soft_threshold_fwd_cuda);
LEANVAE_REGISTER_KERNEL("soft_threshold_bwd", soft_threshold_bwd_cuda);

}  // namespace cuda
}  // namespace leanvae
