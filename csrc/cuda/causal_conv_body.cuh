// Per-thread bodies of the CUDA causal depthwise 3x3x3 conv kernels (csrc/cuda/causal_conv.cu).
//
// Written to compile as host C++ too (no CUDA headers; storage access goes through an `IO` class given by
// the includer), so that csrc/cpu/causal_conv_cuda_emu.cpp can run exactly this index logic on the CPU in
// the test suite: the only CUDA-specific parts left untested without a GPU are the launch configuration,
// the shared-memory reduction and the vector loads.
//
// Thread layout (forward and grad input): a thread owns V consecutive channels of PW consecutive pixels of
// one row (b, h), and walks the frames once: each frame's 3 rows x (PW + 2) columns are read once (the
// neighbouring threads' overlaps hit L1) and feed three rolling accumulators, one per output frame the
// frame touches. The 27 taps of its channels stay in registers. Accumulation order per output: bias, then
// taps (i, j, k) lexicographically, whatever frame a tap reads: chunked calls reproduce a full call.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/kernel_args.h"

#ifdef __CUDACC__
#define LV_HD __host__ __device__ __forceinline__
#define LV_UNROLL _Pragma("unroll")
#else
#define LV_HD inline
#define LV_UNROLL
#endif

namespace leanvae {
namespace causal_conv {

constexpr int kV = 2;    // channels per thread
constexpr int kWPW = 2;  // grad weight: pixels per thread, along W
constexpr int kWY = 16;  // grad weight: threads along W per block (a block covers kWY * kWPW = 32 pixels)

// Forward and grad input: pixels per thread along W, per path (vector or scalar storage access). Chosen so
// that no path spills under __launch_bounds__(256, 2) (128 registers) with nvcc 13 for sm_90, as
// tests/test_causal_conv.py checks with ptxas: the 27 weight pairs (54 registers) and 3 x PW x V
// accumulators leave little room, and ptxas's allocation is not monotonic in PW (the grad input spilled
// 8-16 bytes at 4 pixels on the vector path and 136-144 at 2 on the scalar one; 0 at the values below).
// Per-output accumulation order does not depend on PW (with nvcc contracting each update to an FMA, the
// same bits; the host emulation's compiler contracts the grad input differently per instantiation).
constexpr int conv_pw(bool vec, bool bwd) { return !vec ? 3 : (bwd ? 2 : 4); }

struct Frames {
  const void* data = nullptr;  // null: absent (reads as zeros)
  int64_t s[5] = {0, 0, 0, 0, 0};  // element strides of (B, T, H, W, C)
};

struct ConvParams {
  int64_t B = 0, T = 0, H = 0, W = 0, C = 0, G = 0;  // G: group size, 0 = causal
  Frames src;   // forward: x; grad input: grad_y
  Frames aux;   // forward: cache (or absent); grad input: grad of the new cache
  const float* w27 = nullptr;   // (27, C), tap-major (spatially flipped for grad input)
  const float* bias = nullptr;  // (C,) or null
  void* out = nullptr;          // forward: y; grad input: grad x. (B, T, H, W, C), channel stride 1
  int64_t out_s[4] = {0, 0, 0, 0};
  void* ocache = nullptr;       // forward: new cache; grad input: grad of the cache (or null). Channel stride 1
  int64_t oc_s[4] = {0, 0, 0, 0};
  bool residual = false;
};

struct WgradParams {
  int64_t B = 0, T = 0, H = 0, W = 0, C = 0, G = 0;
  Frames x, cache, gy;  // cache may be absent
  int64_t rows = 8;     // rows of pixels per thread (and per partial)
  float* part = nullptr;  // (n_parts, 28, C): per block of rows x (kWY * kWPW) pixels
};

LV_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Output frame t's temporal tap i reads frame t - off + i (off = 2 causal, 1 group); in group mode a tap past
// the end of t's group (or of the call) reads zeros instead.
// 32-bit division (the host checks T and G < 2^30): a 64-bit one is a long subroutine on the GPU.
LV_HD bool tap_valid(int64_t t, int i, int64_t T, int64_t G) {
  if (G == 0) return true;
  const int32_t start = (static_cast<int32_t>(t) / static_cast<int32_t>(G)) * static_cast<int32_t>(G);
  return t - 1 + i < imin(T, static_cast<int64_t>(start) + G);
}

// tid = ((i3 * n2 + i2) * n1 + i1) * n0 + i0, in 32-bit arithmetic when everything fits.
LV_HD void split_index(int64_t tid, int64_t n0, int64_t n1, int64_t n2, int64_t& i0, int64_t& i1, int64_t& i2,
                       int64_t& i3) {
  if (tid < (int64_t(1) << 31) && n0 < (int64_t(1) << 31) && n1 < (int64_t(1) << 31) && n2 < (int64_t(1) << 31)) {
    uint32_t r = static_cast<uint32_t>(tid);
    const uint32_t m0 = static_cast<uint32_t>(n0), m1 = static_cast<uint32_t>(n1), m2 = static_cast<uint32_t>(n2);
    i0 = r % m0, r /= m0;
    i1 = r % m1, r /= m1;
    i2 = r % m2, i3 = r / m2;
  } else {
    int64_t r = tid;
    i0 = r % n0, r /= n0;
    i1 = r % n1, r /= n1;
    i2 = r % n2, i3 = r / n2;
  }
}

// Loads row hh of `frame` (null: zeros) at pixels w0-1 .. w0+PW, channels c0 .. c0+cn-1, as float.
template <class IO, int V, int PW>
LV_HD void load_row(float (&xv)[PW + 2][V], const typename IO::storage* frame, const int64_t* s, int64_t hh, int64_t H,
                    int64_t W, int64_t w0, int64_t c0, int cn) {
  const bool row_ok = frame != nullptr && hh >= 0 && hh < H;
  LV_UNROLL
  for (int px = 0; px < PW + 2; ++px) {
    const int64_t w = w0 - 1 + px;
    if (row_ok && w >= 0 && w < W) {
      IO::template load<V>(frame + hh * s[2] + w * s[3] + c0 * s[4], s[4], cn, xv[px]);
    } else {
      LV_UNROLL
      for (int v = 0; v < V; ++v) xv[px][v] = 0.f;
    }
  }
}

// Forward (BWD = false) and grad input (BWD = true); `tid` = ((b * H + h) * n_pixel_groups + wg) * n_channel_groups
// + cv. Forward: step s over source frames -n .. T+1-off; slot k holds output s + off - 2 + k (tap i = 2 - k).
// Grad input: step s over grad_y frames 0 .. T+off-1; slot k holds output e = s - off + k (tap i = k, where the
// forward tap (s, k) is valid); e < 0 is the grad of cache frame e + n. After a step, slot 0 is complete.
template <class IO, int V, int PW, bool BWD>
LV_HD void conv_thread(const ConvParams& p, int64_t tid) {
  using S = typename IO::storage;
  const int64_t ncv = (p.C + V - 1) / V, nwg = (p.W + PW - 1) / PW;
  int64_t cv, wg, h, b;
  split_index(tid, ncv, nwg, p.H, cv, wg, h, b);
  if (b >= p.B) return;
  const int64_t c0 = cv * V, w0 = wg * PW, T = p.T;
  const int cn = static_cast<int>(imin(V, p.C - c0));
  const int off = p.G > 0 ? 1 : 2, n = off;

  float wr[27][V];
  LV_UNROLL
  for (int tap = 0; tap < 27; ++tap)
    LV_UNROLL
    for (int v = 0; v < V; ++v) wr[tap][v] = v < cn ? p.w27[tap * p.C + c0 + v] : 0.f;
  float init[V];
  LV_UNROLL
  for (int v = 0; v < V; ++v) init[v] = (p.bias != nullptr && v < cn) ? p.bias[c0 + v] : 0.f;
  float acc[3][PW][V];
  LV_UNROLL
  for (int k = 0; k < 3; ++k)
    LV_UNROLL
    for (int px = 0; px < PW; ++px)
      LV_UNROLL
      for (int v = 0; v < V; ++v) acc[k][px][v] = init[v];

  const S* src = static_cast<const S*>(p.src.data) + b * p.src.s[0];
  const S* aux = p.aux.data ? static_cast<const S*>(p.aux.data) + b * p.aux.s[0] : nullptr;
  const bool edge = BWD && (h == 0 || h == p.H - 1 || w0 == 0 || w0 + PW >= p.W);
  const int64_t s_lo = BWD ? 0 : -n, s_hi = BWD ? T + off : T + 2 - off;
  for (int64_t s = s_lo; s < s_hi; ++s) {
    const S* frame;
    const int64_t* fs;
    if (!BWD && s < 0) {
      frame = aux ? aux + (s + n) * p.aux.s[1] : nullptr;
      fs = p.aux.s;
    } else {
      frame = s < T ? src + s * p.src.s[1] : nullptr;
      fs = p.src.s;
    }
    // Which slots this frame feeds: a real output (forward: 0 <= o < T; grad input: e >= 0, or a cache frame
    // when there is a cache) through a valid tap.
    bool valid[3];
    LV_UNROLL
    for (int k = 0; k < 3; ++k) {
      if (BWD) {
        valid[k] = s < T && tap_valid(s, k, T, p.G) && (s - off + k >= 0 || p.ocache != nullptr);
      } else {
        const int64_t o = s + off - 2 + k;
        valid[k] = o >= 0 && o < T && tap_valid(o, 2 - k, T, p.G);
      }
    }
    LV_UNROLL
    for (int j = 0; j < 3; ++j) {
      float xv[PW + 2][V];
      load_row<IO, V, PW>(xv, frame, fs, h + j - 1, p.H, p.W, w0, c0, cn);
      if (!BWD && j == 1 && s >= T - n && s < T) {
        // The new cache holds the last n frames of cat(cache or zeros, x): a bit-exact copy.
        S* d = static_cast<S*>(p.ocache) + b * p.oc_s[0] + (s - (T - n)) * p.oc_s[1] + h * p.oc_s[2];
        LV_UNROLL
        for (int px = 0; px < PW; ++px)
          if (w0 + px < p.W)
            IO::template copy<V>(d + (w0 + px) * p.oc_s[3] + c0,
                                 frame ? frame + h * fs[2] + (w0 + px) * fs[3] + c0 * fs[4] : nullptr, fs[4], cn);
      }
      // Grad input skips the taps that read grad_y past the frame (the forward never had those outputs),
      // rather than multiplying zeros: with an Inf or NaN weight 0 * w is NaN. Only threads on the frame's
      // border have such taps; they take a checked copy of the loop, the others the unchecked one. The
      // forward multiplies its zero padding, as the reference's convolution of a zero-padded frame does.
      if (BWD && edge) {
        if (h + j - 1 < 0 || h + j - 1 >= p.H) continue;
        LV_UNROLL
        for (int k = 0; k < 3; ++k) {
          if (!valid[k]) continue;
          LV_UNROLL
          for (int kk = 0; kk < 3; ++kk)
            LV_UNROLL
            for (int px = 0; px < PW; ++px) {
              if (w0 - 1 + px + kk < 0 || w0 - 1 + px + kk >= p.W) continue;
              LV_UNROLL
              for (int v = 0; v < V; ++v) acc[k][px][v] += wr[k * 9 + j * 3 + kk][v] * xv[px + kk][v];
            }
        }
        continue;
      }
      LV_UNROLL
      for (int k = 0; k < 3; ++k) {
        if (!valid[k]) continue;  // skipped, not multiplied by zero: NaN * 0 is NaN
        const int i = BWD ? k : 2 - k;
        LV_UNROLL
        for (int kk = 0; kk < 3; ++kk)
          LV_UNROLL
          for (int px = 0; px < PW; ++px)
            LV_UNROLL
            for (int v = 0; v < V; ++v) acc[k][px][v] += wr[i * 9 + j * 3 + kk][v] * xv[px + kk][v];
      }
    }
    // Slot 0 is complete: output frame o.
    const int64_t o = BWD ? s - off : s + off - 2;
    S* dst = nullptr;
    if (o >= 0 && o < T)
      dst = static_cast<S*>(p.out) + b * p.out_s[0] + o * p.out_s[1] + h * p.out_s[2];
    else if (BWD && o < 0 && p.ocache != nullptr)
      dst = static_cast<S*>(p.ocache) + b * p.oc_s[0] + (o + n) * p.oc_s[1] + h * p.oc_s[2];
    if (dst != nullptr) {
      const int64_t qn = o - (T - n);  // grad input: the grad of the new cache frame that holds frame o
      LV_UNROLL
      for (int px = 0; px < PW; ++px) {
        const int64_t w = w0 + px;
        if (w >= p.W) continue;
        float val[V], add[V];
        LV_UNROLL
        for (int v = 0; v < V; ++v) val[v] = acc[0][px][v];
        if (p.residual && o >= 0) {
          IO::template load<V>(src + o * p.src.s[1] + h * p.src.s[2] + w * p.src.s[3] + c0 * p.src.s[4], p.src.s[4],
                               cn, add);
          LV_UNROLL
          for (int v = 0; v < V; ++v) val[v] += add[v];
        }
        if (BWD && qn >= 0) {
          IO::template load<V>(aux + qn * p.aux.s[1] + h * p.aux.s[2] + w * p.aux.s[3] + c0 * p.aux.s[4], p.aux.s[4],
                               cn, add);
          LV_UNROLL
          for (int v = 0; v < V; ++v) val[v] += add[v];
        }
        IO::template store<V>(dst + w * (o >= 0 ? p.out_s[3] : p.oc_s[3]) + c0, cn, val);
      }
    }
    LV_UNROLL
    for (int px = 0; px < PW; ++px)
      LV_UNROLL
      for (int v = 0; v < V; ++v) {
        acc[0][px][v] = acc[1][px][v];
        acc[1][px][v] = acc[2][px][v];
        acc[2][px][v] = init[v];
      }
  }
}

// Grad weight: thread (b, row block hb, pixel group wg, channel group cv) accumulates, over its `rows` rows
// and all frames, acc[tap][v] = sum gy[o] * (frame read by output o through tap), acc[27] = sum gy (bias).
// Step s walks source frames -n .. T-1; a ring holds gy of the three outputs frame s feeds (slot k: output
// s + off - 2 + k, tap i = 2 - k). The order of additions is fixed: the result is deterministic.
template <class IO, int V, int PW>
LV_HD void wgrad_thread(const WgradParams& p, int64_t b, int64_t hb, int64_t wg, int64_t cv, float (&acc)[28][V]) {
  using S = typename IO::storage;
  LV_UNROLL
  for (int tap = 0; tap < 28; ++tap)
    LV_UNROLL
    for (int v = 0; v < V; ++v) acc[tap][v] = 0.f;
  const int64_t c0 = cv * V, w0 = wg * PW, T = p.T;
  if (b >= p.B || c0 >= p.C || w0 >= p.W) return;
  const int cn = static_cast<int>(imin(V, p.C - c0));
  const int off = p.G > 0 ? 1 : 2, n = off;
  const S* x = static_cast<const S*>(p.x.data) + b * p.x.s[0];
  const S* cache = p.cache.data ? static_cast<const S*>(p.cache.data) + b * p.cache.s[0] : nullptr;
  const S* gy = static_cast<const S*>(p.gy.data) + b * p.gy.s[0];
  for (int64_t h = hb * p.rows; h < imin(p.H, hb * p.rows + p.rows); ++h) {
    float g[3][PW][V];
    LV_UNROLL
    for (int k = 0; k < 3; ++k)
      LV_UNROLL
      for (int px = 0; px < PW; ++px)
        LV_UNROLL
        for (int v = 0; v < V; ++v) g[k][px][v] = 0.f;
    for (int64_t s = -n; s < T; ++s) {
      const int64_t on = s + off;  // the output entering the ring (tap 0 reads frame s)
      LV_UNROLL
      for (int px = 0; px < PW; ++px) {
        const int64_t w = w0 + px;
        if (on < T && w < p.W) {
          IO::template load<V>(gy + on * p.gy.s[1] + h * p.gy.s[2] + w * p.gy.s[3] + c0 * p.gy.s[4], p.gy.s[4], cn,
                               g[2][px]);
        } else {
          LV_UNROLL
          for (int v = 0; v < V; ++v) g[2][px][v] = 0.f;
        }
        LV_UNROLL
        for (int v = 0; v < V; ++v) acc[27][v] += g[2][px][v];
      }
      bool valid[3];
      LV_UNROLL
      for (int k = 0; k < 3; ++k) {
        const int64_t o = s + off - 2 + k;
        valid[k] = o >= 0 && o < T && tap_valid(o, 2 - k, T, p.G);
      }
      const S* frame = s >= 0 ? x + s * p.x.s[1] : (cache ? cache + (s + n) * p.cache.s[1] : nullptr);
      const int64_t* fs = s >= 0 ? p.x.s : p.cache.s;
      LV_UNROLL
      for (int j = 0; j < 3; ++j) {
        float xv[PW + 2][V];
        load_row<IO, V, PW>(xv, frame, fs, h + j - 1, p.H, p.W, w0, c0, cn);
        LV_UNROLL
        for (int k = 0; k < 3; ++k) {
          if (!valid[k]) continue;
          const int i = 2 - k;
          LV_UNROLL
          for (int kk = 0; kk < 3; ++kk)
            LV_UNROLL
            for (int px = 0; px < PW; ++px) {
              if (w0 + px >= p.W) continue;  // no output there: skipped, not 0 * x (x may be Inf)
              LV_UNROLL
              for (int v = 0; v < V; ++v) acc[i * 9 + j * 3 + kk][v] += g[k][px][v] * xv[px + kk][v];
            }
        }
      }
      LV_UNROLL
      for (int px = 0; px < PW; ++px)
        LV_UNROLL
        for (int v = 0; v < V; ++v) {
          g[0][px][v] = g[1][px][v];
          g[1][px][v] = g[2][px][v];
        }
    }
  }
}

// Whether every access can use V-element vector loads/stores: channel stride 1, C and every other stride a
// multiple of V, base pointers aligned to V elements.
inline bool vec_ok(const Frames& f, int64_t C, int V, int elem_size) {
  if (f.data == nullptr) return true;
  if (f.s[4] != 1 || C % V != 0) return false;
  for (int d = 0; d < 4; ++d)
    if (f.s[d] % V != 0) return false;
  return reinterpret_cast<uintptr_t>(f.data) % (static_cast<uintptr_t>(V) * elem_size) == 0;
}

inline Frames frames_of(const TensorView& t, bool present = true) {
  Frames f;
  if (!present) return f;
  f.data = t.data;
  for (int d = 0; d < 5; ++d) f.s[d] = t.st(d);
  return f;
}

inline void check_5d(const KernelArgs& a, const TensorView& t, const char* what) {
  if (t.ndim != 5) throw std::invalid_argument(a.name + ": " + what + " must be 5-D");
}

// Forward: tensors [x, cache, w27, bias, y, new_cache], ints [has_cache, has_bias, residual, group_size].
// Grad input: tensors [grad_y, grad_new_cache, wflip27, grad_x, grad_cache], ints [has_cache, residual, group_size].
inline ConvParams make_conv_params(const KernelArgs& a, bool bwd) {
  const TensorView& src = a.t(0);
  check_5d(a, src, bwd ? "grad_y" : "x");
  ConvParams p;
  p.B = src.size(0), p.T = src.size(1), p.H = src.size(2), p.W = src.size(3), p.C = src.size(4);
  p.G = a.i(bwd ? 2 : 3);
  if (p.T >= (int64_t(1) << 30) || p.G >= (int64_t(1) << 30))
    throw std::invalid_argument(a.name + ": frames and group size must be < 2^30");
  p.src = frames_of(src);
  p.aux = frames_of(a.t(1), bwd || a.i(0) != 0);
  p.w27 = a.t(2).ptr<const float>();
  p.bias = (!bwd && a.i(1) != 0) ? a.t(3).ptr<const float>() : nullptr;
  const TensorView &out = a.t(bwd ? 3 : 4), &oc = a.t(bwd ? 4 : 5);
  p.out = out.data;
  for (int d = 0; d < 4; ++d) p.out_s[d] = out.st(d);
  if (!bwd || a.i(0) != 0) {
    p.ocache = oc.data;
    for (int d = 0; d < 4; ++d) p.oc_s[d] = oc.st(d);
  }
  if (out.st(4) != 1 || (p.ocache && oc.st(4) != 1)) throw std::invalid_argument(a.name + ": outputs must have channel stride 1");
  p.residual = a.i(bwd ? 1 : 2) != 0;
  return p;
}

inline bool conv_vec_ok(const ConvParams& p, int V, int elem_size) {
  Frames out, oc;
  out.data = p.out;
  oc.data = p.ocache;
  for (int d = 0; d < 4; ++d) out.s[d] = p.out_s[d], oc.s[d] = p.oc_s[d];
  out.s[4] = oc.s[4] = 1;
  return vec_ok(p.src, p.C, V, elem_size) && vec_ok(p.aux, p.C, V, elem_size) && vec_ok(out, p.C, V, elem_size) &&
         vec_ok(oc, p.C, V, elem_size);
}

// Grad weight: tensors [x, cache, grad_y, gw27 (27, C) float, gb (C,) float, part (n_parts, 28, C) float],
// ints [has_cache, group_size, rows, cols]; cols must be kWY * kWPW.
inline WgradParams make_wgrad_params(const KernelArgs& a, int64_t* n_parts) {
  const TensorView& x = a.t(0);
  check_5d(a, x, "x");
  WgradParams p;
  p.B = x.size(0), p.T = x.size(1), p.H = x.size(2), p.W = x.size(3), p.C = x.size(4);
  p.G = a.i(1);
  if (p.T >= (int64_t(1) << 30) || p.G >= (int64_t(1) << 30))
    throw std::invalid_argument(a.name + ": frames and group size must be < 2^30");
  p.x = frames_of(x);
  p.cache = frames_of(a.t(1), a.i(0) != 0);
  p.gy = frames_of(a.t(2));
  p.rows = a.i(2);
  if (p.rows < 1 || a.i(3) != kWY * kWPW)
    throw std::invalid_argument(a.name + ": partial tile must be rows >= 1 by " + std::to_string(kWY * kWPW) + " columns");
  const TensorView& part = a.t(5);
  *n_parts = p.B * ((p.H + p.rows - 1) / p.rows) * ((p.W + kWY * kWPW - 1) / (kWY * kWPW));
  if (part.ndim != 3 || part.size(0) != *n_parts || part.size(1) != 28 || part.size(2) != p.C || !part.is_contiguous())
    throw std::invalid_argument(a.name + ": workspace must be a contiguous (" + std::to_string(*n_parts) + ", 28, C) tensor");
  p.part = part.ptr<float>();
  return p;
}

}  // namespace causal_conv
}  // namespace leanvae
