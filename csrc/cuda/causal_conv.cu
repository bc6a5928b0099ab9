// Causal depthwise 3x3x3 conv on channels-last tokens (the model's PEG3D) on CUDA: forward (with the new
// cache and the optional fused residual), grad input (cache and residual paths included), and grad
// weight/bias as fixed per-block partial sums reduced in a fixed order (deterministic).
//
// The per-thread work lives in causal_conv_body.cuh, shared with a host build that the tests run on the
// CPU (csrc/cpu/causal_conv_cuda_emu.cpp). Here: storage access (vector loads where the layout allows),
// launches, and the block reduction of the weight grad.
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

template <class S, bool VEC, bool BWD>
__global__ void __launch_bounds__(kThreads, 2) _causal_dwconv3d_kernel(const cc::ConvParams p, int64_t total) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= total) return;
  cc::conv_thread<DevIO<S, VEC>, cc::kV, cc::conv_pw(VEC, BWD), BWD>(p, tid);
}

// Block (32 channel groups) x (kWY pixel groups): each thread's sums over its rows and frames are added
// over threadIdx.y in order 0..kWY-1 and stored as the block's partial. One 512-thread block per SM at 128
// registers (the occupancy of two 256-thread blocks); 2 pixels per thread, so that it does not spill.
template <class S, bool VEC>
__global__ void __launch_bounds__(32 * cc::kWY, 1) _causal_dwconv3d_wgrad_kernel(const cc::WgradParams p, int64_t ncvb,
                                                                              int64_t nwb, int64_t nhb) {
  int64_t cvb, wb, hb, b;
  cc::split_index(blockIdx.x, ncvb, nwb, nhb, cvb, wb, hb, b);
  const int64_t cv = cvb * 32 + threadIdx.x;
  float acc[28][cc::kV];
  cc::wgrad_thread<DevIO<S, VEC>, cc::kV, cc::kWPW>(p, b, hb, wb * cc::kWY + threadIdx.y, cv, acc);
  __shared__ float red[28][32 * cc::kV];
  for (int y = 0; y < cc::kWY; ++y) {
    if (threadIdx.y == y) {
#pragma unroll
      for (int tap = 0; tap < 28; ++tap)
#pragma unroll
        for (int v = 0; v < cc::kV; ++v) {
          float& r = red[tap][threadIdx.x * cc::kV + v];
          r = (y == 0 ? 0.f : r) + acc[tap][v];
        }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0) {
    float* part = p.part + ((b * nhb + hb) * nwb + wb) * 28 * p.C;
    for (int tap = 0; tap < 28; ++tap)
#pragma unroll
      for (int v = 0; v < cc::kV; ++v) {
        const int64_t c = cv * cc::kV + v;
        if (c < p.C) part[tap * p.C + c] = red[tap][threadIdx.x * cc::kV + v];
      }
  }
}

// gw27[tap][c] (tap < 27) and gb[c] (tap 27) = sum over partials, in partial order.
__global__ void _sum_partials_kernel(const float* __restrict__ part, float* __restrict__ gw27, float* __restrict__ gb,
                                     int64_t n_parts, int64_t C) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (m >= 28 * C) return;
  float s = 0.f;
  for (int64_t k = 0; k < n_parts; ++k) s += part[k * 28 * C + m];
  if (m < 27 * C) gw27[m] = s;
  else gb[m - 27 * C] = s;
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
  set_device(a);
  dispatch_float(a.t(0).dtype, a.name, [&](auto tag) {
    using S = decltype(tag);
    const bool vec = cc::conv_vec_ok(p, cc::kV, sizeof(S));
    const int pw = vec ? cc::conv_pw(true, BWD) : cc::conv_pw(false, BWD);
    const int64_t total = p.B * p.H * ((p.W + pw - 1) / pw) * ((p.C + cc::kV - 1) / cc::kV);
    const unsigned grid = blocks_for(total, kThreads, a);
    if (vec)
      _causal_dwconv3d_kernel<S, true, BWD><<<grid, kThreads, 0, stream_of(a)>>>(p, total);
    else
      _causal_dwconv3d_kernel<S, false, BWD><<<grid, kThreads, 0, stream_of(a)>>>(p, total);
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
  set_device(a);
  const int64_t ncvb = ((p.C + cc::kV - 1) / cc::kV + 31) / 32;
  const int64_t nwb = (p.W + cc::kWY * cc::kWPW - 1) / (cc::kWY * cc::kWPW), nhb = (p.H + p.rows - 1) / p.rows;
  dispatch_float(a.t(0).dtype, a.name, [&](auto tag) {
    using S = decltype(tag);
    const unsigned grid = blocks_for(p.B * nhb * nwb * ncvb, 1, a);
    const dim3 block(32, cc::kWY);
    const bool vec = cc::vec_ok(p.x, p.C, cc::kV, sizeof(S)) && cc::vec_ok(p.cache, p.C, cc::kV, sizeof(S)) &&
                     cc::vec_ok(p.gy, p.C, cc::kV, sizeof(S));
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
