// Causal depthwise 3x3x3 conv on channels-last tokens (the model's PEG3D) on the CPU: forward (with the
// new cache and the optional fused residual), grad input (including the cache and residual paths), and
// grad weight/bias (fixed partial blocks summed in a fixed order: deterministic, whatever the thread count).
//
// Contract: leanvae_kernels/ops/causal_conv.py. Work item: (b, CB channels, HT output rows, WT output
// columns), looping over frames. Each input frame's tile, with a one-pixel halo, is converted once to the
// accumulation type into a ring of three frame buffers; outputs accumulate in registers in the order
// bias, then taps (i, j, k) lexicographically, whatever frame a tap reads (cache or x), so chunked calls
// reproduce a full call bit for bit.
#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace leanvae {
namespace cpu {
namespace {

constexpr int CB = 16;  // channels per work item: one 64-byte line of float32
constexpr int HT = 4;   // output rows per work item
constexpr int WT = 32;  // output columns per work item
constexpr int NW = 4;   // output columns per register block (WT is a multiple of NW)
constexpr int BH = HT + 2, BWC = WT + 2;  // frame buffer rows/columns, with the halo
constexpr int kSlot = BH * BWC * CB;      // elements of one frame buffer

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

// Asks for the lines of rows [h_lo, h_hi) x columns [w_lo, w_hi) of a frame (null: nothing) ahead of use.
// A tile's pixels lie a channel-stride apart, a pattern the hardware prefetchers do not follow, so without
// this the loads (and the stores' line fills) wait on memory one pixel at a time.
template <int kWrite, class S>
void prefetch_tile(const S* frame, const TensorView& v, int64_t H, int64_t W, int64_t h_lo, int64_t h_hi, int64_t w_lo,
                   int64_t w_hi, int cn) {
  if (frame == nullptr) return;
  const int64_t sh = v.st(2), sw = v.st(3), span = (cn - 1) * v.st(4) * int64_t(sizeof(S));
  for (int64_t h = std::max<int64_t>(0, h_lo); h < std::min(H, h_hi); ++h)
    for (int64_t w = std::max<int64_t>(0, w_lo); w < std::min(W, w_hi); ++w) {
      const char* p = reinterpret_cast<const char*>(frame + h * sh + w * sw);
      __builtin_prefetch(p, kWrite);
      if (span >= 64) __builtin_prefetch(p + span, kWrite);
    }
}

// dst[w][c] = v[w][c] (+ a0[w][c]) (+ a1[w][c]) for w < tw, c < cn, in the accumulation type, rounded once.
// Pointers are at the row's first pixel and channel c0; (sw, sc): pixel and channel strides.
template <class S, class A>
inline void store_row(S* dst, int64_t dw, int64_t dc, const A* v, const S* a0, int64_t a0w, int64_t a0c, const S* a1,
                      int64_t a1w, int64_t a1c, int tw, int cn) {
  if (cn == CB && dc == 1 && (!a0 || a0c == 1) && (!a1 || a1c == 1)) {
    for (int ww = 0; ww < tw; ++ww) {
      A r[CB];
      for (int c = 0; c < CB; ++c) r[c] = v[ww * CB + c];
      if (a0)
        for (int c = 0; c < CB; ++c) r[c] += load(a0 + ww * a0w + c);
      if (a1)
        for (int c = 0; c < CB; ++c) r[c] += load(a1 + ww * a1w + c);
      for (int c = 0; c < CB; ++c) store(dst + ww * dw + c, r[c]);
    }
    return;
  }
  for (int ww = 0; ww < tw; ++ww)
    for (int c = 0; c < cn; ++c) {
      A r = v[ww * CB + c];
      if (a0) r += load(a0 + ww * a0w + c * a0c);
      if (a1) r += load(a1 + ww * a1w + c * a1c);
      store(dst + ww * dw + c * dc, r);
    }
}

// buf[r][col][c] = frame[h0-1+r][w0-1+col][c0+c] in the accumulation type; zero outside the frame, past
// channel cn, or everywhere when frame is null. `frame` points at channel c0 of the frame.
template <class S, class A>
void load_tile(A* buf, const S* frame, const TensorView& v, int64_t H, int64_t W, int64_t h0, int64_t w0, int cn) {
  const int64_t sh = v.st(2), sw = v.st(3), sc = v.st(4);
  for (int r = 0; r < BH; ++r) {
    const int64_t h = h0 - 1 + r;
    for (int col = 0; col < BWC; ++col) {
      const int64_t w = w0 - 1 + col;
      A* d = buf + (r * BWC + col) * CB;
      if (frame == nullptr || h < 0 || h >= H || w < 0 || w >= W) {
        for (int c = 0; c < CB; ++c) d[c] = A(0);
        continue;
      }
      const S* s = frame + h * sh + w * sw;
      if (sc == 1 && cn == CB) {
        if constexpr (std::is_same<S, A>::value) {
          for (int c = 0; c < CB; c += 32 / sizeof(A)) vstore(d + c, vload(s + c));
        } else {
          for (int c = 0; c < CB; ++c) d[c] = load(s + c);
        }
      } else {
        int c = 0;
        for (; c < cn; ++c) d[c] = load(s + c * sc);
        for (; c < CB; ++c) d[c] = A(0);
      }
    }
  }
}

// out[w][c] = bias[c] + sum over the non-null rows r = 3i+j and k of wt[3r+k][c] * rows[r][w+k][c],
// for w < ncols (a multiple of NW). A null row is a tap that reads zeros and is skipped.
template <class A>
inline void conv_row(A* out, const A* const* rows, const A* wt, const A* bias, int ncols) {
  constexpr int L = 32 / sizeof(A), NV = CB / L;  // lanes per vector, vectors per pixel
  constexpr int P = sizeof(A) == 4 ? NW : NW / 2;  // pixels per register block (16 accumulators at most)
  for (int w = 0; w < ncols; w += P) {
    vec_t<A> acc[P][NV];
    for (int v = 0; v < NV; ++v) {
      const vec_t<A> b = vload(bias + v * L);
      for (int n = 0; n < P; ++n) acc[n][v] = b;
    }
    for (int r = 0; r < 9; ++r) {
      if (rows[r] == nullptr) continue;
      const A* wr = wt + r * 3 * CB;
      const A* x = rows[r] + w * CB;
      for (int k = 0; k < 3; ++k)
        for (int v = 0; v < NV; ++v) {
          const vec_t<A> wv = vload(wr + k * CB + v * L);
          for (int n = 0; n < P; ++n) acc[n][v] += wv * vload(x + (n + k) * CB + v * L);
        }
    }
    for (int n = 0; n < P; ++n)
      for (int v = 0; v < NV; ++v) vstore(out + (w + n) * CB + v * L, acc[n][v]);
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
  int64_t B, T, H, W, C, nht, nwt, ncb;
  Tiles(const TensorView& x)
      : B(x.size(0)), T(x.size(1)), H(x.size(2)), W(x.size(3)), C(x.size(4)), nht((H + HT - 1) / HT),
        nwt((W + WT - 1) / WT), ncb((C + CB - 1) / CB) {}
  int64_t positions() const { return B * nht * nwt; }
  int64_t elements() const { return B * T * H * W * C; }
};

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
  const int64_t T = tl.T, H = tl.H, W = tl.W, C = tl.C;
  const int n = tv.n, off = tv.off;
  const int64_t q_lo = kBwd ? 0 : -n;                            // first source frame
  const int64_t o_lo = kBwd ? (has_cache ? -n : 0) : 0;          // first output frame
  const int64_t tasks = tl.positions() * tl.ncb;

#pragma omp parallel num_threads(threads_for(a, tl.elements()))
  {
    std::vector<A> ring(3 * kSlot), outrow(WT * CB);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      int64_t rest = task;
      const int64_t cb = rest % tl.ncb; rest /= tl.ncb;
      const int64_t wt = rest % tl.nwt; rest /= tl.nwt;
      const int64_t ht = rest % tl.nht;
      const int64_t b = rest / tl.nht;
      const int64_t c0 = cb * CB, h0 = ht * HT, w0 = wt * WT;
      const int cn = static_cast<int>(std::min<int64_t>(CB, C - c0));
      const int th = static_cast<int>(std::min<int64_t>(HT, H - h0)), tw = static_cast<int>(std::min<int64_t>(WT, W - w0));
      const int ncols = (tw + NW - 1) / NW * NW;
      const A* wt27 = wp.data() + cb * 27 * CB;
      const A* bias_cb = bp.data() + cb * CB;
      int64_t loaded = q_lo - 1;

      auto slot = [&](int64_t q) { return ring.data() + ((q - q_lo) % 3) * kSlot; };
      auto source = [&](int64_t q) -> const S* {  // frame q of the source at channel c0, or null (zeros)
        if (kBwd || q >= 0) return frame_ptr<S>(src, b, q) + c0 * src.st(4);
        return has_cache ? frame_ptr<S>(aux, b, q + n) + c0 * aux.st(4) : nullptr;
      };
      auto load_frame = [&](int64_t q) {
        const S* f = source(q);
        const TensorView& sv = (q >= 0 || kBwd) ? src : aux;
        load_tile<S, A>(slot(q), f, sv, H, W, h0, w0, cn);
        if (!kBwd && q >= T - n) {  // this frame belongs to the new cache: copy it bit for bit
          S* d = frame_ptr_mut<S>(out_cache, b, q - (T - n)) + c0 * out_cache.st(4);
          const int64_t dc = out_cache.st(4), scs = sv.st(4);
          for (int hh = 0; hh < th; ++hh)
            for (int ww = 0; ww < tw; ++ww) {
              S* dp = d + (h0 + hh) * out_cache.st(2) + (w0 + ww) * out_cache.st(3);
              const S* sp = f ? f + (h0 + hh) * sv.st(2) + (w0 + ww) * sv.st(3) : nullptr;
              if (sp && dc == 1 && scs == 1) std::memcpy(dp, sp, cn * sizeof(S));
              else
                for (int c = 0; c < cn; ++c) dp[c * dc] = sp ? sp[c * scs] : S{};
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
        const S* add0 = nullptr;  // residual: x[o] (fwd) or gy[o] (bwd)
        if (residual && o >= 0) add0 = frame_ptr<S>(src, b, o) + c0 * src.st(4);
        const S* add1 = nullptr;  // bwd: grad of the new cache frame that holds frame o
        if (kBwd && o >= T - n) add1 = frame_ptr<S>(aux, b, o - (T - n)) + c0 * aux.st(4);
        dst += c0 * dv->st(4);
        prefetch_tile<1, S>(dst, *dv, H, W, h0, h0 + th, w0, w0 + tw, cn);

        // The next frame to load is fetched a few rows at a time while this frame computes.
        const int64_t qn = loaded + 1;
        const S* next = qn < T ? source(qn) : nullptr;
        const TensorView& nv = (qn >= 0 || kBwd) ? src : aux;
        for (int hh = 0; hh < th; ++hh) {
          prefetch_tile<0, S>(next, nv, H, W, h0 - 1 + hh * BH / th, h0 - 1 + (hh + 1) * BH / th, w0 - 1, w0 + WT + 1, cn);
          const A* rows[9];
          for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) rows[i * 3 + j] = frame_of_tap[i] ? frame_of_tap[i] + (hh + j) * BWC * CB : nullptr;
          conv_row<A>(outrow.data(), rows, wt27, bias_cb, ncols);
          const int64_t h = h0 + hh;
          store_row<S, A>(dst + h * dv->st(2) + w0 * dv->st(3), dv->st(3), dv->st(4), outrow.data(),
                          add0 ? add0 + h * src.st(2) + w0 * src.st(3) : nullptr, src.st(3), src.st(4),
                          add1 ? add1 + h * aux.st(2) + w0 * aux.st(3) : nullptr, aux.st(3), aux.st(4), tw, cn);
        }
      }
      // Forward: new-cache frames never read by an output (none in practice: the last output reads them).
      if (!kBwd)
        while (loaded < T - 1) load_frame(++loaded);
    }
  }
}

// Grad weight and bias. Work item as above; per item, partial[tap][c] = sum over its positions and all
// frames of gy * (frame read through tap), tap 27 = sum of gy (bias). Partials are summed over items in
// item order. Tensors: [x, cache, gy, gw27 (27, C), gb (C,), part (B * ceil(H/HT) * ceil(W/WT), 28, C)], the
// last three in the accumulation type; ints [has_cache, group_size, HT, WT].
template <class S>
void conv_weight_grad(const KernelArgs& a, const Tiles& tl, const Temporal& tv, bool has_cache) {
  using A = acc_t<S>;
  const TensorView &x = a.t(0), &cache = a.t(1), &gy = a.t(2), &gw = a.t(3), &gb = a.t(4), &part = a.t(5);
  const int64_t T = tl.T, H = tl.H, W = tl.W, C = tl.C;
  const int n = tv.n, off = tv.off;
  const int64_t npos = tl.positions(), tasks = npos * tl.ncb;
  if (a.i(2) != HT || a.i(3) != WT)
    throw std::invalid_argument(a.name + ": partial tile must be " + std::to_string(HT) + " x " + std::to_string(WT));
  if (part.ndim != 3 || part.size(0) != npos || part.size(1) != 28 || part.size(2) != C || !part.is_contiguous())
    throw std::invalid_argument(a.name + ": workspace must be a contiguous (" + std::to_string(npos) + ", 28, C) tensor");
  A* partials = part.ptr<A>();

#pragma omp parallel num_threads(threads_for(a, tl.elements()))
  {
    std::vector<A> ring(3 * kSlot), gbuf(HT * WT * CB);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t cb = task % tl.ncb, pos = task / tl.ncb;
      int64_t rest = pos;
      const int64_t wt = rest % tl.nwt; rest /= tl.nwt;
      const int64_t ht = rest % tl.nht;
      const int64_t b = rest / tl.nht;
      const int64_t c0 = cb * CB, h0 = ht * HT, w0 = wt * WT;
      const int cn = static_cast<int>(std::min<int64_t>(CB, C - c0));
      const int th = static_cast<int>(std::min<int64_t>(HT, H - h0)), tw = static_cast<int>(std::min<int64_t>(WT, W - w0));
      const int ncols = (tw + 3) / 4 * 4;
      A acc[28][CB] = {};
      int64_t loaded = -n - 1;
      auto slot = [&](int64_t q) { return ring.data() + ((q + n) % 3) * kSlot; };
      auto source = [&](int64_t q) -> const S* {  // frame q at channel c0, or null (zeros)
        if (q >= 0) return frame_ptr<S>(x, b, q) + c0 * x.st(4);
        return has_cache ? frame_ptr<S>(cache, b, q + n) + c0 * cache.st(4) : nullptr;
      };
      auto load_frame = [&](int64_t q) {
        load_tile<S, A>(slot(q), source(q), q >= 0 ? x : cache, H, W, h0, w0, cn);
        if (q + 1 < T)
          prefetch_tile<0, S>(source(q + 1), q + 1 >= 0 ? x : cache, H, W, h0 - 1, h0 + HT + 1, w0 - 1, w0 + WT + 1, cn);
      };
      for (int64_t o = 0; o < T; ++o) {
        const int64_t need = std::min<int64_t>(T - 1, o - off + 2);
        while (loaded < need) load_frame(++loaded);
        // gy tile of frame o: rows < th, columns < ncols (zero past tw and cn).
        const S* g = frame_ptr<S>(gy, b, o) + c0 * gy.st(4);
        for (int hh = 0; hh < th; ++hh)
          for (int ww = 0; ww < ncols; ++ww) {
            A* d = gbuf.data() + (hh * WT + ww) * CB;
            int c = 0;
            if (ww < tw) {
              const S* s = g + (h0 + hh) * gy.st(2) + (w0 + ww) * gy.st(3);
              for (; c < cn; ++c) d[c] = load(s + c * gy.st(4));
            }
            for (; c < CB; ++c) d[c] = A(0);
          }
        {
          A s[CB] = {};
          for (int hh = 0; hh < th; ++hh)
            for (int ww = 0; ww < ncols; ++ww)
              for (int c = 0; c < CB; ++c) s[c] += gbuf[(hh * WT + ww) * CB + c];
          for (int c = 0; c < CB; ++c) acc[27][c] += s[c];
        }
        for (int i = 0; i < 3; ++i) {
          if (!tv.valid(o, i)) continue;
          const A* xb = slot(o - off + i);
          for (int j = 0; j < 3; ++j)
            for (int k = 0; k < 3; ++k) {
              A s[4][CB] = {};  // four independent chains over columns mod 4, combined in a fixed order
              for (int hh = 0; hh < th; ++hh) {
                const A* gr = gbuf.data() + hh * WT * CB;
                const A* xr = xb + ((hh + j) * BWC + k) * CB;
                for (int ww = 0; ww < ncols; ww += 4)
#pragma GCC unroll 4
                  for (int u = 0; u < 4; ++u)
                    for (int c = 0; c < CB; ++c) s[u][c] += gr[(ww + u) * CB + c] * xr[(ww + u) * CB + c];
              }
              for (int c = 0; c < CB; ++c) acc[(i * 3 + j) * 3 + k][c] += (s[0][c] + s[1][c]) + (s[2][c] + s[3][c]);
            }
        }
      }
      A* p = partials + pos * 28 * C + c0;
      for (int tap = 0; tap < 28; ++tap)
        for (int c = 0; c < cn; ++c) p[tap * C + c] = acc[tap][c];
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
