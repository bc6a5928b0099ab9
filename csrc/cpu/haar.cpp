// Haar wavelet transforms on the CPU: one analysis kernel and one synthesis kernel serve every op.
//
//   haar_analysis   x (B, C, T, H, W) -> xi (B, 4C, 1, Ho, Wo) from frame 0 (2-D) and/or
//                   xv (B, nslot*C, To, Ho, Wo) from frames f0.. (3-D); Ho = ceil(H/2), odd sizes reflect.
//                   Serves dwt3d, dwt2d, patch, and the backward of idwt3d, idwt2d, unpatch.
//   haar_synthesis  xi and/or xv -> y (B, C, T, H, W). For odd T/H/W (the backward of a DWT) the
//                   reflected sample N of a block belongs to sample N-2: it is added there (the adjoint of
//                   the reflect padding). Serves idwt3d, idwt2d, unpatch, and the backward of the DWTs.
//
// Arguments (both kernels): tensors [x, xi, xv] / [xi, xv, y] (an absent part is any placeholder);
// ints [has_xi, has_xv, mask, slot0..slot7]; floats [scale2d, scale3d]. The 3-D band b lives in xv channel
// slot[b]*C + c; slot -1: not stored (analysis) / zero (synthesis); mask bit b clear: stored as zero /
// read as zero (the latent compression of ops/haar_multilevel.py uses both). Every tensor may have any
// strides; offsets are int64. Accumulation in float (double for float64); one rounding per output.
//
// Work is split into (b, c, output frame, row chunk) items; with the synthesis written as a gather
// (each output row sums the blocks it depends on), every item writes its own rows: no races, no atomics,
// and the result does not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/haar_tree.h"
#include "cpu_common.h"

namespace leanvae {
namespace cpu {
namespace {

constexpr int64_t kRowChunk = 16;  // block rows (analysis) / output rows (synthesis) per work item
constexpr int64_t kGrain = 1 << 16;  // samples per thread below which more threads cost more than they save

// Threads for `samples` of work: waking a second thread costs more than a small tensor's whole pass
// (and far more on a loaded machine), so small calls stay on the calling thread.
inline int threads_for(int64_t samples, int max_threads) {
  const int64_t t = samples / kGrain;
  return static_cast<int>(t < 1 ? 1 : (t < max_threads ? t : max_threads));
}

struct Args {
  bool has_xi = false, has_xv = false;
  unsigned mask = 0xffu;
  int slot[8];
  double s2 = 1, s3 = 1;
};

Args parse(const KernelArgs& a) {
  Args r;
  r.has_xi = a.i(0) != 0;
  r.has_xv = a.i(1) != 0;
  r.mask = static_cast<unsigned>(a.i(2));
  for (int b = 0; b < 8; ++b) r.slot[b] = static_cast<int>(a.i(3 + b));
  r.s2 = a.f(0);
  r.s3 = a.f(1);
  return r;
}

// A strided 5-D view (B, C, T, H, W).
template <class T>
struct View {
  T* p;
  int64_t n[5], s[5];
  explicit View(const TensorView& v) : p(static_cast<T*>(v.data)) {
    for (int d = 0; d < 5; ++d) n[d] = v.shape[d], s[d] = v.stride[d];
  }
  T* row(int64_t b, int64_t c, int64_t t, int64_t h) const { return p + b * s[0] + c * s[1] + t * s[2] + h * s[3]; }
};

// Reads a row of W samples into dst[0 .. 2*ceil(W/2)), reflect-padding an odd row (dst[W] = x[W-2]).
template <class T, class A>
void read_row(const T* src, int64_t sw, int64_t w_len, A* dst) {
  if (sw == 1) {
    for (int64_t w = 0; w < w_len; ++w) dst[w] = load(src + w);
  } else {
    for (int64_t w = 0; w < w_len; ++w) dst[w] = load(src + w * sw);
  }
  if (w_len & 1) dst[w_len] = dst[w_len - 2];
}

template <class T, class A>
void write_row(const A* src, T* dst, int64_t sw, int64_t len, A scale) {
  if (sw == 1) {
    for (int64_t w = 0; w < len; ++w) store(dst + w, src[w] * scale);
  } else {
    for (int64_t w = 0; w < len; ++w) store(dst + w * sw, src[w] * scale);
  }
}

template <class T>
void zero_row(T* dst, int64_t sw, int64_t len) {
  for (int64_t w = 0; w < len; ++w) store(dst + w * sw, acc_t<T>(0));
}

// ------------------------------------------------------------------------------------------ analysis
// One block row: NT input frames (1: 2-D, 2: 3-D), two input rows each, already read into `in`
// (index (pt*2 + ph), each 2*Wo long); the 4*NT band rows go to `band` (index band*Wo + wo).
// 3-D: the T, H and W stages one after the other over whole rows (contiguous loops the compiler
// vectorises); per sample these are exactly the additions of haar::analysis3, in its order.
template <class A>
void analysis_block_row_3(const A* __restrict__ r0, const A* __restrict__ r1, const A* __restrict__ r2,
                          const A* __restrict__ r3, int64_t wo_len, A* __restrict__ band, A* __restrict__ tmp) {
  const int64_t n = 2 * wo_len;
  A* __restrict__ l0 = tmp;          // T low,  row ph = 0
  A* __restrict__ l1 = tmp + n;      // T low,  row ph = 1
  A* __restrict__ h0 = tmp + 2 * n;  // T high, row ph = 0
  A* __restrict__ h1 = tmp + 3 * n;  // T high, row ph = 1
  for (int64_t w = 0; w < n; ++w) {  // T stage: rows (pt, ph) = r0 (0,0), r1 (0,1), r2 (1,0), r3 (1,1)
    l0[w] = r0[w] + r2[w];
    h0[w] = r0[w] - r2[w];
    l1[w] = r1[w] + r3[w];
    h1[w] = r1[w] - r3[w];
  }
  for (int64_t w = 0; w < n; ++w) {  // H stage, in place: (bt, bh) rows
    const A a = l0[w], b = l1[w], c = h0[w], d = h1[w];
    l0[w] = a + b;
    l1[w] = a - b;
    h0[w] = c + d;
    h1[w] = c - d;
  }
  const A* rows[4] = {l0, l1, h0, h1};  // (bt, bh) = (0,0), (0,1), (1,0), (1,1)
  for (int k = 0; k < 4; ++k) {  // W stage: band 2k + bw
    const A* __restrict__ r = rows[k];
    A* __restrict__ lo = band + (2 * k) * wo_len;
    A* __restrict__ hi = band + (2 * k + 1) * wo_len;
    for (int64_t wo = 0; wo < wo_len; ++wo) {
      lo[wo] = r[2 * wo] + r[2 * wo + 1];
      hi[wo] = r[2 * wo] - r[2 * wo + 1];
    }
  }
}

template <class A>
void analysis_block_row_2(const A* __restrict__ r0, const A* __restrict__ r1, int64_t wo_len, A* __restrict__ band) {
  for (int64_t wo = 0; wo < wo_len; ++wo) {
    const A a[4] = {r0[2 * wo], r0[2 * wo + 1], r1[2 * wo], r1[2 * wo + 1]};
    A o[4];
    haar::analysis2(a, o);
    for (int b = 0; b < 4; ++b) band[b * wo_len + wo] = o[b];
  }
}

template <class A, int NT>
void analysis_block_row(const A* const* in, int64_t wo_len, A* __restrict__ band, A* __restrict__ tmp) {
  if constexpr (NT == 2) {
    analysis_block_row_3(in[0], in[1], in[2], in[3], wo_len, band, tmp);
  } else {
    analysis_block_row_2(in[0], in[1], wo_len, band);
  }
}

template <class TI, class TO>  // input and output storage types (they differ between levels)
void analysis(const KernelArgs& ka) {
  using A = acc_t<TI>;
  const Args g = parse(ka);
  const View<const TI> x(ka.t(0));
  const View<TO> xi(ka.t(1)), xv(ka.t(2));
  const int64_t B = x.n[0], C = x.n[1], T_ = x.n[2], H = x.n[3], W = x.n[4];
  const int64_t Ho = (H + 1) / 2, Wo = (W + 1) / 2;
  const int64_t f0 = g.has_xi ? 1 : 0, Tv = T_ - f0, To = g.has_xv ? (Tv + 1) / 2 : 0;
  const int64_t parts = f0 + To;  // output "frames": the 2-D frame, then the 3-D blocks
  const int64_t chunks = (Ho + kRowChunk - 1) / kRowChunk;
  const int64_t items = B * C * parts * chunks;
  const A s2 = static_cast<A>(g.s2), s3 = static_cast<A>(g.s3);
  const int threads = threads_for(x.n[0] * x.n[1] * x.n[2] * H * W, ka.num_threads);

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<A> rows(4 * 2 * Wo), band(8 * Wo), tmp(4 * 2 * Wo);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      int64_t r = it;
      const int64_t chunk = r % chunks; r /= chunks;
      const int64_t part = r % parts; r /= parts;
      const int64_t c = r % C, b = r / C;
      const bool two_d = part < f0;
      const int64_t to = part - f0;
      const int nt = two_d ? 1 : 2;
      int64_t frames[2] = {0, 0};
      if (!two_d) {
        const int64_t t0 = 2 * to, t1 = (2 * to + 1 < Tv) ? 2 * to + 1 : Tv - 2;  // reflect an odd T
        frames[0] = f0 + t0;
        frames[1] = f0 + t1;
      }
      const A* in[4];
      for (int k = 0; k < 4; ++k) in[k] = rows.data() + k * 2 * Wo;
      for (int64_t ho = chunk * kRowChunk; ho < std::min(Ho, (chunk + 1) * kRowChunk); ++ho) {
        const int64_t h0 = 2 * ho, h1 = (2 * ho + 1 < H) ? 2 * ho + 1 : H - 2;  // reflect an odd H
        for (int pt = 0; pt < nt; ++pt) {
          read_row(x.row(b, c, frames[pt], h0), x.s[4], W, rows.data() + (pt * 2 + 0) * 2 * Wo);
          read_row(x.row(b, c, frames[pt], h1), x.s[4], W, rows.data() + (pt * 2 + 1) * 2 * Wo);
        }
        if (two_d) {
          analysis_block_row<A, 1>(in, Wo, band.data(), tmp.data());
          for (int bd = 0; bd < 4; ++bd)
            write_row(band.data() + bd * Wo, xi.row(b, bd * C + c, 0, ho), xi.s[4], Wo, s2);
        } else {
          analysis_block_row<A, 2>(in, Wo, band.data(), tmp.data());
          for (int bd = 0; bd < 8; ++bd) {
            if (g.slot[bd] < 0) continue;
            TO* dst = xv.row(b, g.slot[bd] * C + c, to, ho);
            if (g.mask >> bd & 1u) {
              write_row(band.data() + bd * Wo, dst, xv.s[4], Wo, s3);
            } else {
              zero_row(dst, xv.s[4], Wo);
            }
          }
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------------------- synthesis
// The contributions to output sample n of an axis of length N: the block n/2 at parity n%2, and for an
// odd N the reflected sample N (block (N-1)/2, parity 1) adds into n = N-2.
struct Sources {
  int count;
  int64_t block[2];
  int parity[2];
};

inline Sources sources(int64_t n, int64_t len) {
  Sources s{1, {n / 2, 0}, {static_cast<int>(n & 1), 0}};
  if ((len & 1) && n == len - 2) {
    s.count = 2;
    s.block[1] = (len - 1) / 2;
    s.parity[1] = 1;
  }
  return s;
}

// Band rows of one block (to, ho), read into float rows; a small cache, as an output row and its
// neighbour (and the fold rows) read the same blocks.
template <class T, class A>
struct BandRows {
  static constexpr int kSlots = 4;
  int64_t wo_len = 0;
  std::vector<A> data;  // kSlots * 8 * wo_len
  int64_t key_t[kSlots], key_h[kSlots];
  int next = 0;

  explicit BandRows(int64_t wo) : wo_len(wo), data(static_cast<size_t>(kSlots * 8 * wo)) { reset(); }
  void reset() {
    for (int k = 0; k < kSlots; ++k) key_t[k] = key_h[k] = -1;
  }
  // 3-D: rows of xv at (to, ho) for the 8 bands; 2-D: rows of xi at ho for the 4 bands (to = -2).
  const A* get(const View<const T>& v, int64_t b, int64_t c, int64_t C, int64_t to, int64_t ho, const Args& g,
               bool two_d) {
    for (int k = 0; k < kSlots; ++k)
      if (key_t[k] == to && key_h[k] == ho) return data.data() + k * 8 * wo_len;
    const int k = next;
    next = (next + 1) % kSlots;
    key_t[k] = to;
    key_h[k] = ho;
    A* dst = data.data() + k * 8 * wo_len;
    const int nb = two_d ? 4 : 8;
    for (int bd = 0; bd < nb; ++bd) {
      A* d = dst + bd * wo_len;
      const bool present = two_d || (g.slot[bd] >= 0 && (g.mask >> bd & 1u));
      if (!present) {
        std::fill(d, d + wo_len, A(0));
        continue;
      }
      const T* src = v.row(b, (two_d ? bd : g.slot[bd]) * C + c, two_d ? 0 : to, ho);
      const int64_t sw = v.s[4];
      if (sw == 1) {
        for (int64_t w = 0; w < wo_len; ++w) d[w] = load(src + w);
      } else {
        for (int64_t w = 0; w < wo_len; ++w) d[w] = load(src + w * sw);
      }
    }
    return dst;
  }
};

// acc[2*wo + pw] (+)= the synthesis of one block row at parities (pt, ph); 3-D (NT = 2) or 2-D.
// `band` holds the block row's bands (index band*Wo + wo).
template <class A, int NT>
void synthesis_row(const A* __restrict__ band, int64_t wo_len, int pt, int ph, A* __restrict__ acc, bool first) {
  const A spt = pt ? A(-1) : A(1), sph = ph ? A(-1) : A(1);
  constexpr int NB = 4 * NT;
  for (int64_t wo = 0; wo < wo_len; ++wo) {
    A bv[NB];
    for (int k = 0; k < NB; ++k) bv[k] = band[k * wo_len + wo];
    A y0, y1;
    if constexpr (NT == 2) {
      y0 = haar::synthesis3_at(bv, spt, sph, A(1));
      y1 = haar::synthesis3_at(bv, spt, sph, A(-1));
    } else {
      y0 = haar::synthesis2_at(bv, sph, A(1));
      y1 = haar::synthesis2_at(bv, sph, A(-1));
    }
    const A p0 = first ? A(0) : acc[2 * wo], p1 = first ? A(0) : acc[2 * wo + 1];
    acc[2 * wo] = first ? y0 : p0 + y0;
    acc[2 * wo + 1] = first ? y1 : p1 + y1;
  }
}

template <class TI, class TO>
void synthesis(const KernelArgs& ka) {
  using A = acc_t<TI>;
  const Args g = parse(ka);
  const View<const TI> xi(ka.t(0)), xv(ka.t(1));
  const View<TO> y(ka.t(2));
  const int64_t B = y.n[0], C = y.n[1], T_ = y.n[2], H = y.n[3], W = y.n[4];
  const int64_t Ho = (H + 1) / 2, Wo = (W + 1) / 2;
  const int64_t f0 = g.has_xi ? 1 : 0, Tv = g.has_xv ? T_ - f0 : 0;
  const int64_t frames = f0 + Tv;
  const int64_t chunks = (H + kRowChunk - 1) / kRowChunk;
  const int64_t items = B * C * frames * chunks;
  const A s2 = static_cast<A>(g.s2), s3 = static_cast<A>(g.s3);
  const int threads = threads_for(B * C * frames * H * W, ka.num_threads);

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    BandRows<TI, A> cache(Wo);
    std::vector<A> acc(2 * Wo);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      int64_t r = it;
      const int64_t chunk = r % chunks; r /= chunks;
      const int64_t t = r % frames; r /= frames;
      const int64_t c = r % C, b = r / C;
      const bool two_d = t < f0;
      const Sources st = two_d ? Sources{1, {0, 0}, {0, 0}} : sources(t - f0, Tv);
      cache.reset();
      for (int64_t h = chunk * kRowChunk; h < std::min(H, (chunk + 1) * kRowChunk); ++h) {
        const Sources sh = sources(h, H);
        bool first = true;
        for (int i = 0; i < st.count; ++i) {
          for (int j = 0; j < sh.count; ++j) {
            if (two_d) {
              const A* band = cache.get(xi, b, c, C, -2, sh.block[j], g, true);
              synthesis_row<A, 1>(band, Wo, 0, sh.parity[j], acc.data(), first);
            } else {
              const A* band = cache.get(xv, b, c, C, st.block[i], sh.block[j], g, false);
              synthesis_row<A, 2>(band, Wo, st.parity[i], sh.parity[j], acc.data(), first);
            }
            first = false;
          }
        }
        if (W & 1) acc[W - 2] += acc[W];  // the reflected sample W belongs to W-2
        write_row(acc.data(), y.row(b, c, t, h), y.s[4], W, two_d ? s2 : s3);
      }
    }
  }
}

// Input and output of one dtype, or one of them float32 and the other 16-bit: the multi-level latent
// transforms keep float32 between levels, as their reference does (a 16-bit band between levels
// overflowed and lost precision).
template <class F>
void dispatch_io(int in, int out, const std::string& name, F&& f) {
  if (in == out) {
    dispatch_float(in, name, [&](auto tag) { f(tag, tag); });
  } else if (out == kFloat32 && (in == kFloat16 || in == kBFloat16)) {
    dispatch_float(in, name, [&](auto tag) { f(tag, float{}); });
  } else if (in == kFloat32 && (out == kFloat16 || out == kBFloat16)) {
    dispatch_float(out, name, [&](auto tag) { f(float{}, tag); });
  } else {
    throw std::invalid_argument(name + ": input dtype " + dtype_name(in) + " with output dtype " + dtype_name(out) +
                                " is not supported (same dtype, or float32 with float16/bfloat16)");
  }
}

// The output the call writes (xi or xv; the other may be a placeholder of the input's dtype).
inline int analysis_out_dtype(const KernelArgs& a) { return (a.i(1) ? a.t(2) : a.t(1)).dtype; }
inline int synthesis_in_dtype(const KernelArgs& a) { return (a.i(1) ? a.t(1) : a.t(0)).dtype; }

void haar_analysis_cpu(const KernelArgs& a) {
  dispatch_io(a.t(0).dtype, analysis_out_dtype(a), a.name,
              [&](auto ti, auto to) { analysis<decltype(ti), decltype(to)>(a); });
}

void haar_synthesis_cpu(const KernelArgs& a) {
  dispatch_io(synthesis_in_dtype(a), a.t(2).dtype, a.name,
              [&](auto ti, auto to) { synthesis<decltype(ti), decltype(to)>(a); });
}

}  // namespace

LEANVAE_REGISTER_KERNEL("haar_analysis", haar_analysis_cpu);
LEANVAE_REGISTER_KERNEL("haar_synthesis", haar_synthesis_cpu);

}  // namespace cpu
}  // namespace leanvae
