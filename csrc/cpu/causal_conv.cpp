// Causal depthwise 3x3x3 conv on channels-last tokens (the model's PEG3D) on the CPU: forward (with the
// new cache and the optional fused residual), grad input (including the cache and residual paths), and
// grad weight/bias (fixed partial blocks summed in a fixed order: deterministic, whatever the thread count).
//
// Contract: leanvae_kernels/ops/causal_conv.py. Work item: (b, FHT output rows, FWT output columns, all
// channels), looping over frames. Each input frame's tile, with a one-pixel halo, is converted once to the
// accumulation type into a ring of three frame buffers (read pixel by pixel, all channels contiguous: the
// tile streams through memory in order); outputs accumulate in registers, one channel block at a time, in the
// order bias, then taps (i, j, k) lexicographically, whatever frame a tap reads (cache or x), so chunked calls
// reproduce a full call bit for bit.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace leanvae {
namespace cpu {
namespace {

constexpr int CB = 16;  // channels per block: one 64-byte line of float32
constexpr int NW = 4;   // output columns per register block

// Temporal structure shared by every kernel. Causal mode (g == 0): output frame t reads frames t-2, t-1, t
// (taps i = 0, 1, 2); frames -2, -1 are the cache. Group mode: t reads t-1, t, t+1; frame -1 is the cache;
// a tap past the end of t's group (or of the call) reads zeros (`valid` is false).
struct Temporal {
  int64_t T, g;
  int off, n;  // frame read by tap i of output t: t - off + i; n: cache frames
  Temporal(int64_t T_, int64_t g_) : T(T_), g(g_), off(g_ > 0 ? 1 : 2), n(g_ > 0 ? 1 : 2) {}
  bool valid(int64_t t, int i) const {
    if (g == 0) return true;
    return t - off + i < std::min(T, (t / g) * g + g);
  }
};

template <class S>
inline const S* frame_ptr(const TensorView& v, int64_t b, int64_t q) {
  return v.ptr<const S>() + b * v.st(0) + q * v.st(1);
}
template <class S>
inline S* frame_ptr_mut(const TensorView& v, int64_t b, int64_t q) {
  return v.ptr<S>() + b * v.st(0) + q * v.st(1);
}

// Explicit 32-byte vectors (GCC/Clang vector extensions) keep the accumulators in registers.
template <class A> struct VecOf { typedef A type __attribute__((vector_size(32))); };
template <class A> using vec_t = typename VecOf<A>::type;
template <class A> inline vec_t<A> vload(const A* p) { vec_t<A> v; std::memcpy(&v, p, sizeof v); return v; }
template <class A> inline void vstore(A* p, vec_t<A> v) { std::memcpy(p, &v, sizeof v); }

// Output rows hh and hh + 1 (out1 null: row hh only) of one frame:
//   out[w][c] = bias[c] + sum over temporal taps i with a frame, and j, k, of
//               wt[9i + 3j + k][c] * frames[i][hh + j][w + k][c]
// (frames[i]: one channel block of a frame buffer with halo, rows of ROWW pixels of CB channels)
// for w < ncols (a multiple of NW); a null frame is a tap that reads zeros, skipped. Every output accumulates in
// the same order (bias, then i, j, k) whether or not it is computed in a pair.
// Register blocking: one vector of channels, NW output columns and two output rows at a time: the two rows
// share their input rows, and their 2 x NW accumulators are independent chains that keep both FMA units busy.
template <class A, int ROWW>
inline void conv_rows(A* out0, A* out1, const A* const* frames, int hh, const A* wt, const A* bias, int ncols) {
  constexpr int L = 32 / sizeof(A), NV = CB / L;  // lanes per vector, vectors per pixel
  using V = vec_t<A>;
  const bool two = out1 != nullptr;
  for (int v = 0; v < NV; ++v) {
    const V b = vload(bias + v * L);
    for (int w = 0; w < ncols; w += NW) {
      V a0[NW], a1[NW];
#pragma GCC unroll 4
      for (int n = 0; n < NW; ++n) a0[n] = a1[n] = b;
      for (int i = 0; i < 3; ++i) {
        if (frames[i] == nullptr) continue;
        const A* base = frames[i] + (hh * ROWW + w) * CB + v * L;
        for (int rr = 0; rr < (two ? 4 : 3); ++rr) {  // input rows hh + rr
          const A* x = base + rr * ROWW * CB;
          V xv[NW + 2];
#pragma GCC unroll 6
          for (int k = 0; k < NW + 2; ++k) xv[k] = vload(x + k * CB);
          if (rr < 3) {  // row hh, spatial tap j = rr
            const A* wr = wt + (i * 3 + rr) * 3 * CB + v * L;
            const V w0 = vload(wr), w1 = vload(wr + CB), w2 = vload(wr + 2 * CB);
#pragma GCC unroll 4
            for (int n = 0; n < NW; ++n) {
              a0[n] += w0 * xv[n];
              a0[n] += w1 * xv[n + 1];
              a0[n] += w2 * xv[n + 2];
            }
          }
          if (two && rr > 0) {  // row hh + 1, spatial tap j = rr - 1
            const A* wr = wt + (i * 3 + rr - 1) * 3 * CB + v * L;
            const V w0 = vload(wr), w1 = vload(wr + CB), w2 = vload(wr + 2 * CB);
#pragma GCC unroll 4
            for (int n = 0; n < NW; ++n) {
              a1[n] += w0 * xv[n];
              a1[n] += w1 * xv[n + 1];
              a1[n] += w2 * xv[n + 2];
            }
          }
        }
      }
#pragma GCC unroll 4
      for (int n = 0; n < NW; ++n) {
        vstore(out0 + (w + n) * CB + v * L, a0[n]);
        if (two) vstore(out1 + (w + n) * CB + v * L, a1[n]);
      }
    }
  }
}

// Weights (27, C) and bias (C,) in the accumulation type, regrouped as [channel block][27][CB] and
// [channel block][CB], zero past C.
template <class A>
void pack_weights(std::vector<A>& wp, std::vector<A>& bp, const TensorView& w27, const TensorView* bias, int64_t C) {
  const int64_t ncb = (C + CB - 1) / CB;
  wp.assign(ncb * 27 * CB, A(0));
  bp.assign(ncb * CB, A(0));
  const A* w = w27.ptr<const A>();
  for (int64_t c = 0; c < C; ++c) {
    for (int tap = 0; tap < 27; ++tap) wp[((c / CB) * 27 + tap) * CB + c % CB] = w[tap * w27.st(0) + c * w27.st(1)];
    if (bias) bp[c] = bias->ptr<const A>()[c * bias->st(0)];
  }
}

// Calls smaller than this many output elements run on one thread: waking a team costs more than the work,
// and on a busy machine a team waits for its slowest (descheduled) member.
constexpr int64_t kMinParallelElements = 1 << 16;

inline int threads_for(const KernelArgs& a, int64_t elements) {
  return elements < kMinParallelElements ? 1 : a.num_threads;
}

struct Tiles {
  int64_t B, T, H, W, C, ncb;
  Tiles(const TensorView& x)
      : B(x.size(0)), T(x.size(1)), H(x.size(2)), W(x.size(3)), C(x.size(4)), ncb((C + CB - 1) / CB) {}
  int64_t elements() const { return B * T * H * W * C; }
};

// Forward / grad-input work item: (b, FHT output rows, FWT output columns), all channels, looping over frames.
// Its frame buffers are [channel block][FHT + 2][FWT + 2][CB]: filled by reading each pixel's channels as one
// contiguous run (rows of the tile stream through memory in order; a tile of one channel block would instead
// touch 64 bytes every C * 4 bytes, a power-of-two stride that defeats the prefetchers and aliases cache sets),
// and read per channel block from contiguous rows. Outputs are stored pixel by pixel, all channels at once.
constexpr int FHT = 4, FWT = 8;
constexpr int FBH = FHT + 2, FBW = FWT + 2;
constexpr int kBlockF = FBH * FBW * CB;  // elements of one channel block of a frame buffer

// buf[cb][r][col][c] = frame[h0-1+r][w0-1+col][cb*CB + c] in the accumulation type; zero outside the frame,
// past C, or everywhere when frame is null.
template <class S, class A>
void load_tile_all(A* buf, const S* frame, const TensorView& v, int64_t H, int64_t W, int64_t h0, int64_t w0,
                   int64_t C) {
  const int64_t sh = v.st(2), sw = v.st(3), sc = v.st(4), ncb = (C + CB - 1) / CB, full = C / CB;
  for (int r = 0; r < FBH; ++r) {
    const int64_t h = h0 - 1 + r;
    for (int col = 0; col < FBW; ++col) {
      const int64_t w = w0 - 1 + col;
      A* d0 = buf + (r * FBW + col) * CB;
      if (frame == nullptr || h < 0 || h >= H || w < 0 || w >= W) {
        for (int64_t cb = 0; cb < ncb; ++cb)
          for (int c = 0; c < CB; ++c) d0[cb * kBlockF + c] = A(0);
        continue;
      }
      const S* px = frame + h * sh + w * sw;
      int64_t cb = 0;
      if (sc == 1) {
        for (; cb < full; ++cb) {
          A* d = d0 + cb * kBlockF;
          const S* p = px + cb * CB;
          if constexpr (std::is_same<S, A>::value) {
            for (int c = 0; c < CB; c += 32 / sizeof(A)) vstore(d + c, vload(p + c));
          } else {
            for (int c = 0; c < CB; ++c) d[c] = load(p + c);
          }
        }
      }
      for (; cb < ncb; ++cb) {
        A* d = d0 + cb * kBlockF;
        for (int c = 0; c < CB; ++c) d[c] = cb * CB + c < C ? load(px + (cb * CB + c) * sc) : A(0);
      }
    }
  }
}

// One output pixel, all channels: dst[c] = v[cb][c] (+ a0[c]) (+ a1[c]), rounded once; v: the pixel's values
// in an output-row buffer [channel block][FWT][CB]; dst/a0/a1 at channel 0 with channel strides.
template <class S, class A>
inline void store_pixel(S* dst, int64_t dc, const A* v, const S* a0, int64_t a0c, const S* a1, int64_t a1c, int64_t C) {
  const int64_t full = C / CB;
  int64_t cb = 0;
  if (dc == 1 && (!a0 || a0c == 1) && (!a1 || a1c == 1)) {
    for (; cb < full; ++cb) {
      const A* vb = v + cb * FWT * CB;
      A r[CB];
      for (int c = 0; c < CB; ++c) r[c] = vb[c];
      if (a0)
        for (int c = 0; c < CB; ++c) r[c] += load(a0 + cb * CB + c);
      if (a1)
        for (int c = 0; c < CB; ++c) r[c] += load(a1 + cb * CB + c);
      for (int c = 0; c < CB; ++c) store(dst + cb * CB + c, r[c]);
    }
  }
  for (int64_t c = cb * CB; c < C; ++c) {
    A r = v[(c / CB) * FWT * CB + c % CB];
    if (a0) r += load(a0 + c * a0c);
    if (a1) r += load(a1 + c * a1c);
    store(dst + c * dc, r);
  }
}

// Grad input at a pixel (h, w) on the frame's border, every channel block: the sum over the taps that
// read inside the frame only (same order as conv_rows: i, j, k), into the output-row buffer `out`
// ([channel block][FWT][CB], at this pixel). frames: the tap frames' ring slots (null: no frame); the pixel
// is row hl, column wl of the tile. Interior pixels are left as they are.
template <class A>
void border_pixel_exact(A* out, const A* const* frames, const A* wp, int hl, int wl, int64_t h, int64_t w,
                        int64_t H, int64_t W, int64_t ncb) {
  if (h > 0 && h < H - 1 && w > 0 && w < W - 1) return;
  for (int64_t cb = 0; cb < ncb; ++cb)
    for (int c = 0; c < CB; ++c) {
      A s = 0;
      for (int i = 0; i < 3; ++i) {
        if (frames[i] == nullptr) continue;
        for (int j = 0; j < 3; ++j) {
          if (h + j - 1 < 0 || h + j - 1 >= H) continue;
          for (int k = 0; k < 3; ++k) {
            if (w + k - 1 < 0 || w + k - 1 >= W) continue;
            s += wp[(cb * 27 + i * 9 + j * 3 + k) * CB + c] * frames[i][cb * kBlockF + ((hl + j) * FBW + wl + k) * CB + c];
          }
        }
      }
      out[cb * FWT * CB + c] = s;
    }
}

// Forward (kBwd = false) and grad input (kBwd = true), which is the same correlation with spatially
// flipped taps and the temporal map reversed:
//   forward:    output o in [0, T) reads source frame q = o - off + i (q < 0: the cache, or zeros);
//               y[o] = conv (+ x[o] when residual); new_cache[q - (T - n)] = source frame q for q >= T - n.
//   grad input: output e in [-n, T) (e < 0: grad of the cache) reads grad_y frame q = e + off - i where the
//               forward tap (q, i) is valid; gx[e] = conv (+ gy[e] when residual) (+ grad_new_cache[e-(T-n)]).
// Tensors: fwd [x, cache, w27, bias, y, new_cache], bwd [gy, grad_new_cache, wflip27, gx, gcache].
template <class S, bool kBwd>
void conv_frames(const KernelArgs& a, const Tiles& tl, const Temporal& tv, bool has_cache, bool has_bias,
                 bool residual) {
  using A = acc_t<S>;
  const TensorView &src = a.t(0), &aux = a.t(1), &w27 = a.t(2), &bias = a.t(3);
  const TensorView &out = kBwd ? a.t(3) : a.t(4), &out_cache = kBwd ? a.t(4) : a.t(5);
  std::vector<A> wp, bp;
  pack_weights<A>(wp, bp, w27, (!kBwd && has_bias) ? &bias : nullptr, tl.C);
  // Grad input skips the taps that read past the frame (the reference's conv backward never multiplies
  // them), where the fast path multiplies zero padding: the same unless a weight is Inf or NaN (0 * Inf is
  // NaN). Then the frame's border pixels are recomputed without those taps.
  const bool exact_border = kBwd && std::any_of(wp.begin(), wp.end(), [](A v) { return !std::isfinite(v); });
  const int64_t T = tl.T, H = tl.H, W = tl.W, C = tl.C, ncb = tl.ncb;
  const int n = tv.n, off = tv.off;
  const int64_t q_lo = kBwd ? 0 : -n;                            // first source frame
  const int64_t o_lo = kBwd ? (has_cache ? -n : 0) : 0;          // first output frame
  const int64_t nht = (H + FHT - 1) / FHT, nwt = (W + FWT - 1) / FWT, tasks = tl.B * nht * nwt;
  const int64_t slot_size = ncb * kBlockF;

#pragma omp parallel num_threads(threads_for(a, tl.elements()))
  {
    std::vector<A> ring(3 * slot_size), outrows(2 * ncb * FWT * CB);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t wt = task % nwt, ht = (task / nwt) % nht, b = task / nwt / nht;
      const int64_t h0 = ht * FHT, w0 = wt * FWT;
      const int th = static_cast<int>(std::min<int64_t>(FHT, H - h0)), tw = static_cast<int>(std::min<int64_t>(FWT, W - w0));
      const int ncols = (tw + NW - 1) / NW * NW;
      int64_t loaded = q_lo - 1;

      auto slot = [&](int64_t q) { return ring.data() + ((q - q_lo) % 3) * slot_size; };
      auto load_frame = [&](int64_t q) {
        const bool from_src = kBwd || q >= 0;
        const TensorView& sv = from_src ? src : aux;
        const S* f = from_src ? frame_ptr<S>(src, b, q) : (has_cache ? frame_ptr<S>(aux, b, q + n) : nullptr);
        load_tile_all<S, A>(slot(q), f, sv, H, W, h0, w0, C);
        if (!kBwd && q >= T - n) {  // this frame belongs to the new cache: copy it bit for bit
          S* d = frame_ptr_mut<S>(out_cache, b, q - (T - n));
          const int64_t dc = out_cache.st(4), scs = sv.st(4);
          for (int hh = 0; hh < th; ++hh)
            for (int ww = 0; ww < tw; ++ww) {
              S* dp = d + (h0 + hh) * out_cache.st(2) + (w0 + ww) * out_cache.st(3);
              const S* sp = f ? f + (h0 + hh) * sv.st(2) + (w0 + ww) * sv.st(3) : nullptr;
              if (sp && dc == 1 && scs == 1) std::memcpy(dp, sp, C * sizeof(S));
              else
                for (int64_t c = 0; c < C; ++c) dp[c * dc] = sp ? sp[c * scs] : S{};
            }
        }
      };

      for (int64_t o = o_lo; o < T; ++o) {
        const int64_t need = std::min<int64_t>(T - 1, kBwd ? o + off : o - off + 2);
        while (loaded < need) load_frame(++loaded);
        const A* frame_of_tap[3];
        for (int i = 0; i < 3; ++i) {
          const int64_t q = kBwd ? o + off - i : o - off + i;
          const bool ok = kBwd ? (q >= 0 && q < T && tv.valid(q, i)) : tv.valid(o, i);
          frame_of_tap[i] = ok ? slot(q) : nullptr;
        }
        // Output destination and the frames added to it.
        S* dst;
        const TensorView* dv;
        if (!kBwd || o >= 0) { dst = frame_ptr_mut<S>(out, b, o); dv = &out; }
        else { dst = frame_ptr_mut<S>(out_cache, b, o + n); dv = &out_cache; }
        const S* add0 = (residual && o >= 0) ? frame_ptr<S>(src, b, o) : nullptr;  // x[o] (fwd) or gy[o] (bwd)
        const S* add1 = (kBwd && o >= T - n) ? frame_ptr<S>(aux, b, o - (T - n)) : nullptr;  // grad of new cache

        for (int hh = 0; hh < th; hh += 2) {
          const int rows = std::min(2, th - hh);
          for (int64_t cb = 0; cb < ncb; ++cb) {
            const A* frames[3];
            for (int i = 0; i < 3; ++i) frames[i] = frame_of_tap[i] ? frame_of_tap[i] + cb * kBlockF : nullptr;
            A* o0 = outrows.data() + cb * FWT * CB;
            conv_rows<A, FBW>(o0, rows == 2 ? o0 + ncb * FWT * CB : nullptr, frames, hh, wp.data() + cb * 27 * CB,
                              bp.data() + cb * CB, ncols);
          }
          if (exact_border)
            for (int r = 0; r < rows; ++r)
              for (int ww = 0; ww < tw; ++ww)
                border_pixel_exact<A>(outrows.data() + r * ncb * FWT * CB + ww * CB, frame_of_tap, wp.data(), hh + r,
                                      ww, h0 + hh + r, w0 + ww, H, W, ncb);
          for (int r = 0; r < rows; ++r) {
            const int64_t h = h0 + hh + r;
            for (int ww = 0; ww < tw; ++ww) {
              const int64_t w = w0 + ww;
              store_pixel<S, A>(dst + h * dv->st(2) + w * dv->st(3), dv->st(4),
                                outrows.data() + r * ncb * FWT * CB + ww * CB,
                                add0 ? add0 + h * src.st(2) + w * src.st(3) : nullptr, src.st(4),
                                add1 ? add1 + h * aux.st(2) + w * aux.st(3) : nullptr, aux.st(4), C);
            }
          }
        }
      }
      // Forward: new-cache frames never read by an output (none in practice: the last output reads them).
      if (!kBwd)
        while (loaded < T - 1) load_frame(++loaded);
    }
  }
}

// Grad weight and bias. Work item as for the forward: (b, FHT rows, FWT columns), all channels, looping over
// frames; per item, part[item][tap][c] = sum over its positions and all frames of gy * (the frame read through
// tap (i, j, k)), tap 27 = sum of gy (bias). Partials are summed over items in item order: deterministic,
// whatever the thread count. Tensors: [x, cache, gy, gw27 (27, C), gb (C,), part (B * ceil(H/FHT) *
// ceil(W/FWT), 28, C)], the last three in the accumulation type; ints [has_cache, group_size, FHT, FWT].
template <class S>
void conv_weight_grad(const KernelArgs& a, const Tiles& tl, const Temporal& tv, bool has_cache) {
  using A = acc_t<S>;
  const TensorView &x = a.t(0), &cache = a.t(1), &gy = a.t(2), &gw = a.t(3), &gb = a.t(4), &part = a.t(5);
  const int64_t T = tl.T, H = tl.H, W = tl.W, C = tl.C, ncb = tl.ncb;
  const int n = tv.n, off = tv.off;
  const int64_t nht = (H + FHT - 1) / FHT, nwt = (W + FWT - 1) / FWT, npos = tl.B * nht * nwt;
  const int64_t slot_size = ncb * kBlockF, gblock = FHT * FWT * CB;
  if (a.i(2) != FHT || a.i(3) != FWT)
    throw std::invalid_argument(a.name + ": partial tile must be " + std::to_string(FHT) + " x " + std::to_string(FWT));
  if (part.ndim != 3 || part.size(0) != npos || part.size(1) != 28 || part.size(2) != C || !part.is_contiguous())
    throw std::invalid_argument(a.name + ": workspace must be a contiguous (" + std::to_string(npos) + ", 28, C) tensor");
  A* partials = part.ptr<A>();

#pragma omp parallel num_threads(threads_for(a, tl.elements()))
  {
    std::vector<A> ring(3 * slot_size), gbuf(ncb * gblock);
#pragma omp for schedule(dynamic, 1)
    for (int64_t pos = 0; pos < npos; ++pos) {
      const int64_t wt = pos % nwt, ht = (pos / nwt) % nht, b = pos / nwt / nht;
      const int64_t h0 = ht * FHT, w0 = wt * FWT;
      const int th = static_cast<int>(std::min<int64_t>(FHT, H - h0)), tw = static_cast<int>(std::min<int64_t>(FWT, W - w0));
      const int ncols = (tw + 3) / 4 * 4;
      A* acc = partials + pos * 28 * C;
      std::fill(acc, acc + 28 * C, A(0));
      int64_t loaded = -n - 1;
      auto slot = [&](int64_t q) { return ring.data() + ((q + n) % 3) * slot_size; };
      for (int64_t o = 0; o < T; ++o) {
        const int64_t need = std::min<int64_t>(T - 1, o - off + 2);
        while (loaded < need) {
          const int64_t q = ++loaded;
          const S* f = q >= 0 ? frame_ptr<S>(x, b, q) : (has_cache ? frame_ptr<S>(cache, b, q + n) : nullptr);
          load_tile_all<S, A>(slot(q), f, q >= 0 ? x : cache, H, W, h0, w0, C);
        }
        // gy tile of frame o: gbuf[cb][hh][ww][c], zero past th, tw and C.
        const S* g = frame_ptr<S>(gy, b, o);
        for (int hh = 0; hh < FHT; ++hh)
          for (int ww = 0; ww < FWT; ++ww) {
            A* d0 = gbuf.data() + (hh * FWT + ww) * CB;
            const S* px = (hh < th && ww < tw) ? g + (h0 + hh) * gy.st(2) + (w0 + ww) * gy.st(3) : nullptr;
            for (int64_t cb = 0; cb < ncb; ++cb)
              for (int c = 0; c < CB; ++c)
                d0[cb * gblock + c] = (px && cb * CB + c < C) ? load(px + (cb * CB + c) * gy.st(4)) : A(0);
          }
        for (int64_t cb = 0; cb < ncb; ++cb) {
          const A* gc = gbuf.data() + cb * gblock;
          const int cn = static_cast<int>(std::min<int64_t>(CB, C - cb * CB));
          A* acc_cb = acc + cb * CB;
          {
            A s[CB] = {};
            for (int hh = 0; hh < th; ++hh)
              for (int ww = 0; ww < ncols; ++ww)
                for (int c = 0; c < CB; ++c) s[c] += gc[(hh * FWT + ww) * CB + c];
            for (int c = 0; c < cn; ++c) acc_cb[27 * C + c] += s[c];
          }
          for (int i = 0; i < 3; ++i) {
            if (!tv.valid(o, i)) continue;
            const A* xb = slot(o - off + i) + cb * kBlockF;
            for (int j = 0; j < 3; ++j)
              for (int k = 0; k < 3; ++k) {
                A s[4][CB] = {};  // four independent chains over columns mod 4, combined in a fixed order
                for (int hh = 0; hh < th; ++hh) {
                  const A* gr = gc + hh * FWT * CB;
                  const A* xr = xb + ((hh + j) * FBW + k) * CB;
                  // Columns past the tile (gy zero-filled) are skipped, not multiplied: x there may be Inf.
                  int ww = 0;
                  for (; ww + 4 <= tw; ww += 4)
#pragma GCC unroll 4
                    for (int u = 0; u < 4; ++u)
                      for (int c = 0; c < CB; ++c) s[u][c] += gr[(ww + u) * CB + c] * xr[(ww + u) * CB + c];
                  for (int u = 0; ww + u < tw; ++u)
                    for (int c = 0; c < CB; ++c) s[u][c] += gr[(ww + u) * CB + c] * xr[(ww + u) * CB + c];
                }
                A* at = acc_cb + ((i * 3 + j) * 3 + k) * C;
                for (int c = 0; c < cn; ++c) at[c] += (s[0][c] + s[1][c]) + (s[2][c] + s[3][c]);
              }
          }
        }
      }
    }
  }
  // Fixed-order reduction over work items.
#pragma omp parallel for num_threads(threads_for(a, npos * 28 * C)) schedule(static)
  for (int64_t tc = 0; tc < 28 * C; ++tc) {
    A s = 0;
    for (int64_t pos = 0; pos < npos; ++pos) s += partials[pos * 28 * C + tc];
    const int64_t tap = tc / C, c = tc % C;
    if (tap < 27) gw.ptr<A>()[tap * gw.st(0) + c * gw.st(1)] = s;
    else gb.ptr<A>()[c * gb.st(0)] = s;
  }
}

void check_5d(const KernelArgs& a, const TensorView& t, const char* what) {
  if (t.ndim != 5) throw std::invalid_argument(a.name + ": " + what + " must be 5-D");
}

void causal_dwconv3d_fwd_cpu(const KernelArgs& a) {
  const TensorView& x = a.t(0);
  check_5d(a, x, "x");
  const Tiles tl(x);
  const Temporal tv(tl.T, a.i(3));
  dispatch_float(x.dtype, a.name, [&](auto tag) {
    conv_frames<decltype(tag), false>(a, tl, tv, a.i(0) != 0, a.i(1) != 0, a.i(2) != 0);
  });
}

void causal_dwconv3d_bwd_input_cpu(const KernelArgs& a) {
  const TensorView& gy = a.t(0);
  check_5d(a, gy, "grad_y");
  const Tiles tl(gy);
  const Temporal tv(tl.T, a.i(2));
  dispatch_float(gy.dtype, a.name, [&](auto tag) {
    conv_frames<decltype(tag), true>(a, tl, tv, a.i(0) != 0, false, a.i(1) != 0);
  });
}

void causal_dwconv3d_bwd_weight_cpu(const KernelArgs& a) {
  const TensorView& x = a.t(0);
  check_5d(a, x, "x");
  const Tiles tl(x);
  const Temporal tv(tl.T, a.i(1));
  dispatch_float(x.dtype, a.name, [&](auto tag) { conv_weight_grad<decltype(tag)>(a, tl, tv, a.i(0) != 0); });
}

}  // namespace

LEANVAE_REGISTER_KERNEL("causal_dwconv3d_fwd", causal_dwconv3d_fwd_cpu);
LEANVAE_REGISTER_KERNEL("causal_dwconv3d_bwd_input", causal_dwconv3d_bwd_input_cpu);
LEANVAE_REGISTER_KERNEL("causal_dwconv3d_bwd_weight", causal_dwconv3d_bwd_weight_cpu);

}  // namespace cpu
}  // namespace leanvae
