// Causal depthwise 3x3x3 conv on channels-last tokens (the model's PEG3D) on CUDA: forward (with the new
// cache and the optional fused residual), grad input (cache and residual paths included), and grad
// weight/bias as fixed per-block partial sums reduced in a fixed order (deterministic).
//
// The kernels' bodies (phase loops, barriers, the weight grad's block reduction) live in causal_conv_body.cuh,
// which the test suite also compiles for the host to run them under a race-checking emulation. Here:
// storage access (16-byte loads where the layout allows, shared memory, cp.async), the __global__
// wrappers and the launches.
#include <cstdint>

#include "causal_conv_body.cuh"
#include "cuda_common.cuh"

namespace leanvae {
namespace cuda {
namespace {

namespace cc = ::leanvae::causal_conv;
constexpr int kThreads = 256;

template <class S, int V>
struct alignas(sizeof(S) * V) Pack {
  S v[V];
};

// Storage access for the thread bodies. VEC: channel stride 1, V-aligned (checked on the host by
// conv_vec_ok / vec_ok), and C % V == 0 so that cn == V.
template <class S, bool VEC>
struct DevIO {
  using storage = S;
  template <int V>
  static __device__ __forceinline__ void load(const S* p, int64_t sc, int cn, float* f) {
    if (VEC) {
      const Pack<S, V> pk = *reinterpret_cast<const Pack<S, V>*>(p);
#pragma unroll
      for (int v = 0; v < V; ++v) f[v] = to_float(pk.v[v]);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) f[v] = v < cn ? to_float(p[v * sc]) : 0.f;
    }
  }
  template <int V>
  static __device__ __forceinline__ void store(S* p, int cn, const float* f) {
    if (VEC) {
      Pack<S, V> pk;
#pragma unroll
      for (int v = 0; v < V; ++v) pk.v[v] = from_float<S>(f[v]);
      *reinterpret_cast<Pack<S, V>*>(p) = pk;
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        if (v < cn) p[v] = from_float<S>(f[v]);
    }
  }
  // Staging of N channels (zeros when g is null) into shared memory, as storage. VEC: one asynchronous
  // 16-byte copy (cp.async, sm_80 and later; zeros by a plain 16-byte store), completed by wait<>; else
  // plain loads and stores.
  template <int N>
  static __device__ __forceinline__ void stage(S* smem, const S* g, int64_t sc, int cn) {
    if (VEC) {
      static_assert(N * sizeof(S) == 16, "16-byte chunks");
      const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
      const void* src = g != nullptr ? static_cast<const void*>(g) : static_cast<const void*>(smem);
#if __CUDA_ARCH__ >= 800
      if (g != nullptr)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, 16;\n" ::"r"(dst), "l"(src) : "memory");
      else
        *reinterpret_cast<uint4*>(smem) = make_uint4(0, 0, 0, 0);
#else
      // Before sm_80 there is no cp.async: a synchronous 16-byte load and store (the barrier before the
      // step's compute makes it visible), so that builds for older GPUs (e.g. TORCH_CUDA_ARCH_LIST with 7.5)
      // still compile and run.
      (void)dst, (void)src;
      *reinterpret_cast<uint4*>(smem) = g != nullptr ? *reinterpret_cast<const uint4*>(g) : make_uint4(0, 0, 0, 0);
#endif
    } else {
#pragma unroll
      for (int v = 0; v < N; ++v) smem[v] = (g != nullptr && v < cn) ? g[v * sc] : from_float<S>(0.f);
    }
  }
  static __device__ __forceinline__ void commit() {
#if __CUDA_ARCH__ >= 800
    if (VEC) asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
  }
  template <int N>
  static __device__ __forceinline__ void wait() {
#if __CUDA_ARCH__ >= 800
    if (VEC) asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
  }
  template <int N>
  static __device__ __forceinline__ void lds(const S* p, float* f) {
#pragma unroll
    for (int v = 0; v < N; ++v) f[v] = to_float(p[v]);
  }
  // Bit-exact copy of cn channels (zeros when s is null); the destination has channel stride 1.
  template <int V>
  static __device__ __forceinline__ void copy(S* d, const S* s, int64_t sc, int cn) {
    if (VEC && s != nullptr) {
      *reinterpret_cast<Pack<S, V>*>(d) = *reinterpret_cast<const Pack<S, V>*>(s);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        if (v < cn) d[v] = s != nullptr ? s[v * sc] : from_float<S>(0.f);
    }
  }
};

// Forward / grad input: one block per output tile (cc::conv_kernel_body).
template <class S, bool VEC, bool BWD>
__global__ void __launch_bounds__(cc::kConvThreads, 2) _causal_dwconv3d_kernel(const cc::ConvParams p, int64_t s_lo,
                                                                              int64_t s_a, int64_t s_b, int64_t s_hi) {
  constexpr int kE = cc::ConvTile<BWD>::kElems, kS = cc::kConvStages;
  __shared__ __align__(16) unsigned char ring_raw[kS * kE * sizeof(S)];
  cc::conv_kernel_body<DevIO<S, VEC>, VEC, BWD>(p, blockIdx.x, threadIdx.x, s_lo, s_a, s_b, s_hi,
                                                reinterpret_cast<S*>(ring_raw));
}

// Block (32 channel groups) x (kWY pixel groups), cc::wgrad_kernel_body. One 512-thread block per SM at 128
// registers (the occupancy of two 256-thread blocks); 2 pixels per thread, so that it does not spill.
template <class S, bool VEC>
__global__ void __launch_bounds__(32 * cc::kWY, 1) _causal_dwconv3d_wgrad_kernel(const cc::WgradParams p, int64_t ncvb,
                                                                              int64_t nwb, int64_t nhb) {
  __shared__ float red[28 * 32 * cc::kV];
  cc::wgrad_kernel_body<DevIO<S, VEC>, VEC>(p, ncvb, nwb, nhb, red);
}

__global__ void _sum_partials_kernel(const float* __restrict__ part, float* __restrict__ gw27, float* __restrict__ gb,
                                     int64_t n_parts, int64_t C) {
  cc::sum_partials_body(part, gw27, gb, n_parts, C, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
}

unsigned blocks_for(int64_t threads, int per_block, const KernelArgs& a) {
  const int64_t blocks = (threads + per_block - 1) / per_block;
  if (blocks > 0x7fffffffLL) throw std::invalid_argument(a.name + ": input too large for one launch");
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

template <bool BWD>
void launch_conv(const KernelArgs& a) {
  const cc::ConvParams p = cc::make_conv_params(a, BWD);
  if (p.B * p.H * p.W * p.C == 0) return;
  int64_t ncb, nwb, nhb, blocks, s_lo, s_a, s_b, s_hi;
  cc::conv_grid<BWD>(p, ncb, nwb, nhb, blocks);
  cc::conv_steps(p, BWD, s_lo, s_a, s_b, s_hi);
  const unsigned grid = blocks_for(blocks, 1, a);
  dispatch_float(a.t(0).dtype, a.name, [&](auto tag) {
    using S = decltype(tag);
    if (cc::conv_vec_ok(p, sizeof(S)))
      _causal_dwconv3d_kernel<S, true, BWD><<<grid, cc::kConvThreads, 0, stream_of(a)>>>(p, s_lo, s_a, s_b, s_hi);
    else
      _causal_dwconv3d_kernel<S, false, BWD><<<grid, cc::kConvThreads, 0, stream_of(a)>>>(p, s_lo, s_a, s_b, s_hi);
    LEANVAE_CUDA_CHECK_LAUNCH(a);
  });
}

void causal_dwconv3d_fwd_cuda(const KernelArgs& a) { launch_conv<false>(a); }
void causal_dwconv3d_bwd_input_cuda(const KernelArgs& a) { launch_conv<true>(a); }

void causal_dwconv3d_bwd_weight_cuda(const KernelArgs& a) {
  int64_t n_parts = 0;
  const cc::WgradParams p = cc::make_wgrad_params(a, &n_parts);
  const TensorView &gw = a.t(3), &gb = a.t(4);
  if (!gw.is_contiguous() || !gb.is_contiguous()) throw std::invalid_argument(a.name + ": gw27 and gb must be contiguous");
  const int64_t ncvb = ((p.C + cc::kV - 1) / cc::kV + 31) / 32;
  const int64_t nwb = (p.W + cc::kWY * cc::kWPW - 1) / (cc::kWY * cc::kWPW), nhb = (p.H + p.rows - 1) / p.rows;
  dispatch_float(a.t(0).dtype, a.name, [&](auto tag) {
    using S = decltype(tag);
    const unsigned grid = blocks_for(p.B * nhb * nwb * ncvb, 1, a);
    const dim3 block(32, cc::kWY);
    const bool vec = cc::vec_ok(p.x, p.C, cc::kV, sizeof(S)) && cc::vec_ok(p.cache, p.C, cc::kV, sizeof(S)) &&
                     cc::vec_ok(p.gy, p.C, cc::kV, sizeof(S)) && cc::wgrad_off32_ok(p);
    if (vec)
      _causal_dwconv3d_wgrad_kernel<S, true><<<grid, block, 0, stream_of(a)>>>(p, ncvb, nwb, nhb);
    else
      _causal_dwconv3d_wgrad_kernel<S, false><<<grid, block, 0, stream_of(a)>>>(p, ncvb, nwb, nhb);
    LEANVAE_CUDA_CHECK_LAUNCH(a);
  });
  _sum_partials_kernel<<<blocks_for(28 * p.C, kThreads, a), kThreads, 0, stream_of(a)>>>(
      p.part, gw.ptr<float>(), gb.ptr<float>(), n_parts, p.C);
  LEANVAE_CUDA_CHECK_LAUNCH(a);
}

}  // namespace

LEANVAE_REGISTER_KERNEL("causal_dwconv3d_fwd", causal_dwconv3d_fwd_cuda);
LEANVAE_REGISTER_KERNEL("causal_dwconv3d_bwd_input", causal_dwconv3d_bwd_input_cuda);
LEANVAE_REGISTER_KERNEL("causal_dwconv3d_bwd_weight", causal_dwconv3d_bwd_weight_cuda);

}  // namespace cuda
}  // namespace leanvae
