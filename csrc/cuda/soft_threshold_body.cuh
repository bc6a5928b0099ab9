// Bodies of the CUDA soft-threshold kernels (csrc/cuda/soft_threshold.cu): out = sign(x) * relu(|x| - theta)
// and its backward. Compiled by nvcc and, for the test suite's race-checking emulation, by a host compiler
// (sync points and shared memory through lv_sync.cuh).
#pragma once
#include <cstdint>

#include "lv_sync.cuh"
#ifdef __CUDACC__
#include "cuda_common.cuh"
#endif

namespace leanvae {
namespace cuda {
namespace soft_threshold {

constexpr int kThreads = 256;

LV_DEV float sign_of(float v) { return v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f); }
LV_DEV float relu_nan(float v) { return v > 0.f ? v : (v != v ? v : 0.f); }

template <class T>
struct Pack {
  static constexpr int kVec = 16 / sizeof(T);
  T v[kVec];
};

// Grid-stride loop over packs of kVec elements, 16-byte accesses where `aligned`.
template <class T>
LV_DEV void fwd_body(const T* __restrict__ x, T* __restrict__ out, int64_t n, float th, bool aligned) {
  constexpr int kVec = Pack<T>::kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; base < n; base += stride) {
    if (aligned && base + kVec <= n) {
      Pack<T> p = *reinterpret_cast<const Pack<T>*>(x + base);
      LV_UNROLL
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

// One block per `block` elements: grad_x, and the block's partial sum of grad * sign(x) over |x| > theta
// (grad_theta = -sum(partials), reduced in a fixed order by the caller): warp sums by shuffles, then the
// warps' sums in warp order through shared memory (`warp_sums`: kThreads / 32 floats).
template <class T>
LV_DEV void bwd_body(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ grad_x,
                     float* __restrict__ partials, int64_t n, int64_t block, float th, LV_SPTR(float) warp_sums) {
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
  LV_UNROLL
  for (int off = 16; off > 0; off >>= 1) sum += LV_SHFL_DOWN("soft_threshold.warp_sum", 0xffffffffu, sum, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sum;
  LV_SYNC("soft_threshold.block_sum");  // every warp's sum is in warp_sums
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    partials[blockIdx.x] = total;
  }
}

}  // namespace soft_threshold
}  // namespace cuda
}  // namespace leanvae
