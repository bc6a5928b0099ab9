// Emulated launches of the CUDA causal conv kernels (csrc/cuda/causal_conv.cu): the same bodies
// (csrc/cuda/causal_conv_body.cuh), grid and paths as its launchers, run by tests/emulation/lv_emu.h.
#pragma once
#include "cuda/causal_conv_body.cuh"
#include "emu_common.h"

namespace lvemu {
namespace conv {

namespace cc = ::leanvae::causal_conv;
using leanvae::KernelArgs;

// Storage access of the emulated kernels. Global memory element by element; VEC: the vector path's
// preconditions (channel stride 1, all N channels present, the address aligned to N elements), on which the
// CUDA kernel's wide accesses rely, are checked at every access (a violation fails the call). Shared
// memory through the race checker; VEC staging by cp.async, as on sm_80 and later.
template <class S, bool VEC = false>
struct EmuIO {
  using storage = S;
  template <int N>
  static void check(const S* p, int64_t sc, int cn) {
    if (VEC && (sc != 1 || cn != N || reinterpret_cast<uintptr_t>(p) % (N * sizeof(S)) != 0)) ++vec_violations();
  }
  template <int N>
  static void load(const S* p, int64_t sc, int cn, float* f) {
    check<N>(p, sc, cn);
    for (int v = 0; v < N; ++v) f[v] = v < cn ? to_f(p[v * sc]) : 0.f;
  }
  template <int N>
  static void store(S* p, int cn, const float* f) {
    check<N>(p, 1, cn);
    for (int v = 0; v < N; ++v)
      if (v < cn) p[v] = from_f<S>(f[v]);
  }
  template <int N>
  static void copy(S* d, const S* s, int64_t sc, int cn) {
    check<N>(d, 1, cn);
    if (s != nullptr) check<N>(s, sc, cn);
    for (int v = 0; v < N; ++v)
      if (v < cn) d[v] = s != nullptr ? s[v * sc] : from_f<S>(0.f);
  }
  template <int N>
  static void stage(S* smem, const S* g, int64_t sc, int cn) {
    if (VEC) {
      static_assert(N * sizeof(S) == 16, "16-byte chunks");
      if (g != nullptr) {
        check<N>(g, sc, cn);
        cp_async(smem, g, 16);
      } else {
        const float4 zero{0.f, 0.f, 0.f, 0.f};
        lvemu::store(reinterpret_cast<float4*>(smem), zero);
      }
    } else {
      for (int v = 0; v < N; ++v) lvemu::store(smem + v, (g != nullptr && v < cn) ? g[v * sc] : from_f<S>(0.f));
    }
  }
  template <int N>
  static void lds(const S* p, float* f) {
    for (int v = 0; v < N; ++v) f[v] = to_f(lvemu::load(p + v));
  }
};

// mode: 0 the scalar path, 1 the vector path (refusing inputs that the CUDA launcher sends to the scalar
// path, so that a test knows which path it ran), 2 the launcher's own choice (cc::conv_vec_ok).
template <bool BWD>
void conv(const KernelArgs& a, int mode) {
  const cc::ConvParams p = cc::make_conv_params(a, BWD);
  if (p.B * p.H * p.W * p.C == 0) return;
  int64_t ncb, nwb, nhb, blocks, s_lo, s_a, s_b, s_hi;
  cc::conv_grid<BWD>(p, ncb, nwb, nhb, blocks);
  cc::conv_steps(p, BWD, s_lo, s_a, s_b, s_hi);
  dispatch_gpu_float(a.t(0).dtype, a.name, [&](auto tag) {
    using S = decltype(tag);
    const bool ok = cc::conv_vec_ok(p, sizeof(S));
    if (mode == 1 && !ok)
      throw std::invalid_argument(a.name + ": the vector path needs channel stride 1, C and strides multiples of " +
                                  std::to_string(16 / sizeof(S)) + ", 16-byte aligned tensors");
    const int64_t before = vec_violations();
    auto run = [&](auto vec) {
      constexpr bool VEC = decltype(vec)::value;
      constexpr size_t kBytes = cc::kConvStages * cc::ConvTile<BWD>::kElems * sizeof(S);
      std::function<void()> body = [&] {
        S* ring = reinterpret_cast<S*>(shared_bytes("ring", kBytes));
        cc::conv_kernel_body<EmuIO<S, VEC>, VEC, BWD>(p, blockIdx.x, threadIdx.x, s_lo, s_a, s_b, s_hi, ring);
      };
      launch(BWD ? "causal_dwconv3d_bwd_input" : "causal_dwconv3d_fwd", dim3(static_cast<unsigned>(blocks)),
             dim3(cc::kConvThreads), 0, body);
    };
    if (mode == 1 || (mode == 2 && ok)) run(cc::Bool<true>());
    else run(cc::Bool<false>());
    if (vec_violations() != before)
      throw std::logic_error(a.name + ": a vector-path access broke its alignment preconditions");
  });
}

// The grad weight: vec_if_ok: the launcher's choice of path (vector loads and 32-bit offsets where cc::vec_ok
// and cc::wgrad_off32_ok hold), else always the scalar path.
inline void wgrad(const KernelArgs& a, bool vec_if_ok) {
  int64_t n_parts = 0;
  const cc::WgradParams p = cc::make_wgrad_params(a, &n_parts);
  const leanvae::TensorView &gw = a.t(3), &gb = a.t(4);
  if (!gw.is_contiguous() || !gb.is_contiguous()) throw std::invalid_argument(a.name + ": gw27 and gb must be contiguous");
  const int64_t ncvb = ((p.C + cc::kV - 1) / cc::kV + 31) / 32;
  const int64_t nwb = (p.W + cc::kWY * cc::kWPW - 1) / (cc::kWY * cc::kWPW), nhb = (p.H + p.rows - 1) / p.rows;
  dispatch_gpu_float(a.t(0).dtype, a.name, [&](auto tag) {
    using S = decltype(tag);
    const bool vec = vec_if_ok && cc::vec_ok(p.x, p.C, cc::kV, sizeof(S)) && cc::vec_ok(p.cache, p.C, cc::kV, sizeof(S)) &&
                     cc::vec_ok(p.gy, p.C, cc::kV, sizeof(S)) && cc::wgrad_off32_ok(p);
    const int64_t before = vec_violations();
    auto run = [&](auto vtag) {
      constexpr bool VEC = decltype(vtag)::value;
      std::function<void()> body = [&] {
        auto red = shared_array<float>("red", 28 * 32 * cc::kV);
        cc::wgrad_kernel_body<EmuIO<S, VEC>, VEC>(p, ncvb, nwb, nhb, red);
      };
      launch("causal_dwconv3d_wgrad", dim3(static_cast<unsigned>(p.B * nhb * nwb * ncvb)), dim3(32, cc::kWY), 0, body);
    };
    if (vec) run(cc::Bool<true>());
    else run(cc::Bool<false>());
    if (vec_violations() != before)
      throw std::logic_error(a.name + ": a vector-path access broke its alignment preconditions");
  });
  const unsigned threads = 256;
  std::function<void()> body = [&] {
    cc::sum_partials_body(p.part, gw.ptr<float>(), gb.ptr<float>(), n_parts, p.C,
                          static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  };
  launch("_sum_partials", dim3(static_cast<unsigned>((28 * p.C + threads - 1) / threads)), dim3(threads), 0, body);
}

}  // namespace conv
}  // namespace lvemu
