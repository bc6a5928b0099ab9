// Test support: the CUDA causal conv's per-thread bodies (csrc/cuda/causal_conv_body.cuh) compiled for the
// host and run thread by thread on the CPU, with the same arguments as the CUDA kernels. Registered as
// "<kernel>_cudaemu" in the CPU module; used only by the test suite, so that the index logic of the CUDA
// kernels (launched on machines without a GPU nowhere else) is checked against the reference everywhere.
// The forward / grad-input kernels cooperate through shared memory: their blocks run phase by phase here.
// Not a fast path: plain loops, one emulated thread at a time per OpenMP worker.
#include <omp.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "cuda/causal_conv_body.cuh"

namespace leanvae {
namespace cpu {
namespace {

namespace cc = ::leanvae::causal_conv;

// Storage access of the emulated kernels, element by element. VEC: the vector path's preconditions, which
// the CUDA kernel relies on for its wide loads and stores (channel stride 1, all N channels present, the
// address aligned to N elements), are checked at every access; a violation is counted and the call raises.
std::atomic<int64_t> g_vec_violations{0};

template <class S, bool VEC = false>
struct HostIO {
  using storage = S;
  template <int N>
  static void check(const S* p, int64_t sc, int cn) {
    if (VEC && (sc != 1 || cn != N || reinterpret_cast<uintptr_t>(p) % (N * sizeof(S)) != 0)) ++g_vec_violations;
  }
  template <int N>
  static void load(const S* p, int64_t sc, int cn, float* f) {
    check<N>(p, sc, cn);
    for (int v = 0; v < N; ++v) f[v] = v < cn ? to_float(p[v * sc]) : 0.f;
  }
  template <int N>
  static void store(S* p, int cn, const float* f) {
    check<N>(p, 1, cn);
    for (int v = 0; v < N; ++v)
      if (v < cn) p[v] = from_float<S>(f[v]);
  }
  template <int N>
  static void copy(S* d, const S* s, int64_t sc, int cn) {
    check<N>(d, 1, cn);
    if (s != nullptr) check<N>(s, sc, cn);
    for (int v = 0; v < N; ++v)
      if (v < cn) d[v] = s != nullptr ? s[v * sc] : from_float<S>(0.f);
  }
  template <int N>
  static void stage(S* smem, const S* g, int64_t sc, int cn) {
    if (g != nullptr) check<N>(g, sc, cn);
    for (int v = 0; v < N; ++v) smem[v] = (g != nullptr && v < cn) ? g[v * sc] : from_float<S>(0.f);
  }
  template <int N>
  static void lds(const S* p, float* f) {
    for (int v = 0; v < N; ++v) f[v] = to_float(p[v]);
  }
};

template <class F>
void dispatch_gpu_float(int dtype, const std::string& name, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(Half{}); break;
    case kBFloat16: f(BFloat16{}); break;
    default: throw std::invalid_argument(name + ": the cuda kernels do not support dtype " + dtype_name(dtype));
  }
}

// The CUDA forward / grad-input kernel, block by block, in the kernel's phases: staging of the first
// kConvStages - 1 steps, then per step the compute phase of every thread, then the staging of step
// s + kConvStages - 1 into the slot of step s - 1 by every thread (between steps: the kernel's barrier). VEC: the vector path, whose
// preconditions (cc::conv_vec_ok) the CUDA launcher checks before taking it; here a call that fails them
// raises instead of falling back, so that a test knows which path it ran.
template <bool BWD, bool VEC>
void emulate_conv(const KernelArgs& a) {
  const cc::ConvParams p = cc::make_conv_params(a, BWD);
  int64_t ncb, nwb, nhb, blocks, s_lo, s_a, s_b, s_hi;
  cc::conv_grid<BWD>(p, ncb, nwb, nhb, blocks);
  cc::conv_steps(p, BWD, s_lo, s_a, s_b, s_hi);
  dispatch_gpu_float(a.t(0).dtype, a.name, [&](auto tag) {
    using S = decltype(tag);
    using Blk = cc::ConvBlock<HostIO<S, VEC>, VEC, BWD>;
    if (VEC && !cc::conv_vec_ok(p, sizeof(S)))
      throw std::invalid_argument(a.name + ": the vector path needs channel stride 1, C and strides multiples of " +
                                  std::to_string(16 / sizeof(S)) + ", 16-byte aligned tensors");
    const int64_t before = g_vec_violations.load();
#pragma omp parallel for num_threads(a.num_threads) schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      constexpr int kE = Blk::Tile::kElems, kS = cc::kConvStages;
      std::vector<S> ring(kS * kE, from_float<S>(std::nanf("")));  // never-staged reads would show as NaN
      std::vector<typename Blk::Thread> th(cc::kConvThreads);
      std::vector<typename Blk::Stager> st(cc::kConvThreads);
      const int32_t lo = static_cast<int32_t>(s_lo), hi = static_cast<int32_t>(s_hi);
      for (int t = 0; t < cc::kConvThreads; ++t) Blk::setup(p, blk, t, th[t], st[t]);
      for (int t = 0; t < cc::kConvThreads; ++t)
        for (int i = 0; i < kS - 1 && lo + i < hi; ++i) Blk::template issue<false>(p, st[t], lo + i, ring.data() + i * kE);
      for (int32_t s = lo; s < hi; ++s) {
        // (the kernel's barrier: every copy of step s landed, every thread done with step s - 1)
        S* slot = ring.data() + ((s - lo) % kS) * kE;
        const bool steady = s >= s_a && s < s_b;  // the kernel's steady loop
        for (int t = 0; t < cc::kConvThreads; ++t) {
          if (steady) {
            Blk::template compute<true>(p, th[t], s, slot);
          } else {
            Blk::cache_copy(p, st[t], s);
            Blk::template compute<false>(p, th[t], s, slot);
          }
        }
        const int32_t sn = s + kS - 1;
        S* next = ring.data() + ((sn - lo) % kS) * kE;
        if (sn < hi)
          for (int t = 0; t < cc::kConvThreads; ++t) {
            if (steady) Blk::template issue<true>(p, st[t], sn, next);
            else Blk::template issue<false>(p, st[t], sn, next);
          }
      }
    }
    if (g_vec_violations.load() != before)
      throw std::logic_error(a.name + ": a vector-path access broke its alignment preconditions");
  });
}

void fwd_emu(const KernelArgs& a) { emulate_conv<false, false>(a); }
void bwd_input_emu(const KernelArgs& a) { emulate_conv<true, false>(a); }
void fwd_vec_emu(const KernelArgs& a) { emulate_conv<false, true>(a); }
void bwd_input_vec_emu(const KernelArgs& a) { emulate_conv<true, true>(a); }

// The CUDA grad-weight kernel's blocks: 32 channel groups x kWY pixel groups, per-thread sums added over
// the pixel groups in order, then the partials summed in partial order. VEC_IF_OK: the launcher's choice
// of path (vector loads and 32-bit offsets where cc::vec_ok and cc::wgrad_off32_ok hold, else scalar).
template <bool VEC_IF_OK>
void bwd_weight_emu(const KernelArgs& a) {
  int64_t n_parts = 0;
  const cc::WgradParams p = cc::make_wgrad_params(a, &n_parts);
  const TensorView &gw = a.t(3), &gb = a.t(4);
  const int64_t ncvb = ((p.C + cc::kV - 1) / cc::kV + 31) / 32;
  const int64_t nwb = (p.W + cc::kWY * cc::kWPW - 1) / (cc::kWY * cc::kWPW), nhb = (p.H + p.rows - 1) / p.rows;
  dispatch_gpu_float(a.t(0).dtype, a.name, [&](auto tag) {
    using S = decltype(tag);
    const bool vec = VEC_IF_OK && cc::vec_ok(p.x, p.C, cc::kV, sizeof(S)) &&
                     cc::vec_ok(p.cache, p.C, cc::kV, sizeof(S)) && cc::vec_ok(p.gy, p.C, cc::kV, sizeof(S)) &&
                     cc::wgrad_off32_ok(p);
    const int64_t before = g_vec_violations.load();
#pragma omp parallel for num_threads(a.num_threads) schedule(static)
    for (int64_t blk = 0; blk < p.B * nhb * nwb * ncvb; ++blk) {
      int64_t r = blk;
      const int64_t cvb = r % ncvb;
      r /= ncvb;
      const int64_t wb = r % nwb;
      r /= nwb;
      const int64_t hb = r % nhb, b = r / nhb;
      float* part = p.part + ((b * nhb + hb) * nwb + wb) * 28 * p.C;
      for (int tx = 0; tx < 32; ++tx) {
        const int64_t cv = cvb * 32 + tx;
        float red[28][cc::kV] = {};
        for (int ty = 0; ty < cc::kWY; ++ty) {
          float acc[28][cc::kV];
          if (vec)
            cc::wgrad_thread<HostIO<S, true>, cc::kV, cc::kWPW, int32_t>(p, b, hb, wb * cc::kWY + ty, cv, acc);
          else
            cc::wgrad_thread<HostIO<S>, cc::kV, cc::kWPW, int64_t>(p, b, hb, wb * cc::kWY + ty, cv, acc);
          for (int tap = 0; tap < 28; ++tap)
            for (int v = 0; v < cc::kV; ++v) red[tap][v] = (ty == 0 ? 0.f : red[tap][v]) + acc[tap][v];
        }
        for (int tap = 0; tap < 28; ++tap)
          for (int v = 0; v < cc::kV; ++v)
            if (cv * cc::kV + v < p.C) part[tap * p.C + cv * cc::kV + v] = red[tap][v];
      }
    }
    if (g_vec_violations.load() != before)
      throw std::logic_error(a.name + ": a vector-path access broke its alignment preconditions");
  });
  for (int64_t m = 0; m < 28 * p.C; ++m) {
    float s = 0.f;
    for (int64_t k = 0; k < n_parts; ++k) s += p.part[k * 28 * p.C + m];
    if (m < 27 * p.C) gw.ptr<float>()[m] = s;
    else gb.ptr<float>()[m - 27 * p.C] = s;
  }
}

}  // namespace

LEANVAE_REGISTER_KERNEL("causal_dwconv3d_fwd_cudaemu", fwd_emu);
LEANVAE_REGISTER_KERNEL("causal_dwconv3d_bwd_input_cudaemu", bwd_input_emu);
LEANVAE_REGISTER_KERNEL("causal_dwconv3d_bwd_weight_cudaemu", bwd_weight_emu<false>);
// The vector path (16-byte access; raises on inputs the CUDA launcher sends to the scalar path). Its grad
// weight takes the path the launcher would take (vector loads of kV channels and 32-bit offsets where allowed).
LEANVAE_REGISTER_KERNEL("causal_dwconv3d_fwd_cudaemu_vec", fwd_vec_emu);
LEANVAE_REGISTER_KERNEL("causal_dwconv3d_bwd_input_cudaemu_vec", bwd_input_vec_emu);
LEANVAE_REGISTER_KERNEL("causal_dwconv3d_bwd_weight_cudaemu_vec", bwd_weight_emu<true>);

}  // namespace cpu
}  // namespace leanvae
