// Soft threshold on CUDA: out = sign(x) * relu(|x| - theta), and its backward.
// Contiguous tensors of one dtype; theta is read on the device (no host sync).
// Memory-bound: each thread handles kVec consecutive elements with 16-byte loads where aligned.
#include <cstdint>

#include "cuda_common.cuh"

namespace leanvae {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sign_of(float v) { return v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f); }
__device__ __forceinline__ float relu_nan(float v) { return v > 0.f ? v : (v != v ? v : 0.f); }

template <class T>
struct Pack {
  static constexpr int kVec = 16 / sizeof(T);
  T v[kVec];
};

template <class T>
__global__ void _soft_threshold_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t n, DeviceScalar theta,
                                           bool aligned) {
  constexpr int kVec = Pack<T>::kVec;
  const float th = theta.get();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; base < n; base += stride) {
    if (aligned && base + kVec <= n) {
      Pack<T> p = *reinterpret_cast<const Pack<T>*>(x + base);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float v = to_float(p.v[k]);
        p.v[k] = from_float<T>(sign_of(v) * relu_nan(fabsf(v) - th));
      }
      *reinterpret_cast<Pack<T>*>(out + base) = p;
    } else {
      for (int64_t i = base; i < n && i < base + kVec; ++i) {
        const float v = to_float(x[i]);
        out[i] = from_float<T>(sign_of(v) * relu_nan(fabsf(v) - th));
      }
    }
  }
}

// One block per `block` elements: grad_x, and the block's partial sum of grad * sign(x) over
// |x| > theta (grad_theta = -sum(partials), reduced in a fixed order by the caller).
template <class T>
__global__ void _soft_threshold_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ grad_x,
                                           float* __restrict__ partials, int64_t n, int64_t block, DeviceScalar theta) {
  const float th = theta.get();
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * block;
  const int64_t hi = min(n, lo + block);
  float sum = 0.f;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const float v = to_float(x[i]), s = sign_of(v);
    // NaN passes (|x| - theta NaN: the comparison is false), as in torch's relu backward.
    const float gs = (fabsf(v) - th <= 0.f) ? 0.f : to_float(grad[i]) * s;
    grad_x[i] = from_float<T>(gs * s);
    sum += gs;
  }
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    partials[blockIdx.x] = total;
  }
}

int grid_for(int64_t work_items) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

void soft_threshold_fwd_cuda(const KernelArgs& a) {
  const TensorView &x = a.t(0), &theta = a.t(1), &out = a.t(2);
  const int64_t n = x.numel();
  if (n == 0) return;
  set_device(a);
  dispatch_float(x.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    const bool aligned = (reinterpret_cast<uintptr_t>(x.data) % 16 == 0) && (reinterpret_cast<uintptr_t>(out.data) % 16 == 0);
    const int64_t packs = (n + Pack<T>::kVec - 1) / Pack<T>::kVec;
    _soft_threshold_fwd_kernel<T><<<grid_for(packs), kThreads, 0, stream_of(a)>>>(
        x.ptr<const T>(), out.ptr<T>(), n, DeviceScalar{theta.data, theta.dtype}, aligned);
    LEANVAE_CUDA_CHECK_LAUNCH(a);
  });
}

void soft_threshold_bwd_cuda(const KernelArgs& a) {
  const TensorView &grad = a.t(0), &x = a.t(1), &theta = a.t(2), &grad_x = a.t(3), &partials = a.t(4);
  const int64_t block = a.i(0), n = x.numel();
  set_device(a);
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
