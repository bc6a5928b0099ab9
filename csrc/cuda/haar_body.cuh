// Bodies of the CUDA Haar wavelet kernels (csrc/cuda/haar.cu has the launchers) and their launch geometry.
// Compiled by nvcc and, for the test suite's emulation, by a host compiler (lv_sync.cuh). The kernels use
// no shared memory and no synchronisation.
//
// One thread owns kV consecutive 2x2x2 blocks (2x2 for the 2-D frame) of one (b, c, frame pair, block
// row): it reads its 2*kV input samples of each row with one vector load where the row is contiguous and
// aligned, and writes every output once, so there are no atomics and results are deterministic. The
// butterflies (csrc/common/haar_tree.h) and the order of the gathered fold terms are the CPU kernel's,
// so float32 results agree bit for bit with the CPU and the reference. Offsets are int64 throughout.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/haar_tree.h"
#include "common/kernel_args.h"
#include "lv_sync.cuh"
#ifdef __CUDACC__
#include "cuda_common.cuh"
#endif

namespace leanvae {
namespace cuda {
namespace haar_kernels {

constexpr int kTX = 64;  // threads along W (each owns kV blocks)
constexpr int kTY = 4;   // block rows per thread block
constexpr int kV = 2;    // consecutive blocks per thread

struct BandMap {
  int slot[8];
  unsigned mask;
  LV_DEV bool on(int b) const { return slot[b] >= 0 && ((mask >> b) & 1u); }
};

struct Geo {
  int64_t C, H, W, Ho, Wo, Tv, To, parts, f0, ho_tiles;
  int64_t sx[5], si[5], sv[5];  // video (x or y), 2-D bands (xi), 3-D bands (xv) strides, in elements
};

template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// out[k] = p[k * stride] for k < n (n <= N); one vector load when contiguous, complete and aligned.
template <class T, int N>
LV_DEV void load_n(const T* p, int64_t stride, int n, float* out) {
  if (stride == 1 && n == N && reinterpret_cast<uintptr_t>(p) % sizeof(Vec<T, N>) == 0) {
    const Vec<T, N> q = *reinterpret_cast<const Vec<T, N>*>(p);
LV_UNROLL
    for (int k = 0; k < N; ++k) out[k] = to_float(q.v[k]);
  } else {
LV_UNROLL
    for (int k = 0; k < N; ++k) out[k] = k < n ? to_float(p[k * stride]) : 0.f;
  }
}

template <class T, int N>
LV_DEV void store_n(T* p, int64_t stride, int n, const float* in) {
  if (stride == 1 && n == N && reinterpret_cast<uintptr_t>(p) % sizeof(Vec<T, N>) == 0) {
    Vec<T, N> q;
LV_UNROLL
    for (int k = 0; k < N; ++k) q.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Vec<T, N>*>(p) = q;
  } else {
LV_UNROLL
    for (int k = 0; k < N; ++k)
      if (k < n) p[k * stride] = from_float<T>(in[k]);
  }
}

// The 2*kV samples of a row starting at w = 2*wo0; an odd W reflects (sample W reads W-2).
template <class T>
LV_DEV void load_row(const T* row, int64_t sw, int64_t wo0, const Geo& g, float* out) {
  const int64_t w0 = 2 * wo0;
  if (w0 + 2 * kV <= g.W) {
    load_n<T, 2 * kV>(row + w0 * sw, sw, 2 * kV, out);
  } else {
LV_UNROLL
    for (int k = 0; k < 2 * kV; ++k) {
      const int64_t w = w0 + k;
      out[k] = w < g.W ? to_float(row[w * sw]) : (w == g.W ? to_float(row[(g.W - 2) * sw]) : 0.f);
    }
  }
}

struct Tile {
  int64_t b, c, part, ho, wo0;
  int nv;  // blocks of this thread inside the tensor (0: none)
};

LV_DEV Tile tile_of(const Geo& g) {
  Tile t;
  const int64_t bx = blockIdx.x;
  const int64_t hot = bx % g.ho_tiles, bcp = bx / g.ho_tiles;
  t.part = bcp % g.parts;
  const int64_t bc = bcp / g.parts;
  t.b = bc / g.C;
  t.c = bc % g.C;
  t.ho = hot * kTY + threadIdx.y;
  t.wo0 = (static_cast<int64_t>(blockIdx.y) * kTX + threadIdx.x) * kV;
  const int64_t left = g.Wo - t.wo0;
  t.nv = (t.ho >= g.Ho || left <= 0) ? 0 : static_cast<int>(left < kV ? left : kV);
  return t;
}

// ------------------------------------------------------------------------------------------ analysis
// TI: the input's storage type, TO: the outputs' (they differ between the levels of the latent transforms).
template <class TI, class TO>
LV_DEV void analysis_body(const TI* __restrict__ x, TO* __restrict__ xi, TO* __restrict__ xv, const Geo& g,
                          const BandMap& bm, float s2, float s3) {
  const Tile t = tile_of(g);
  if (t.nv == 0) return;
  const bool two_d = t.part < g.f0;
  const int64_t h[2] = {2 * t.ho, 2 * t.ho + 1 < g.H ? 2 * t.ho + 1 : g.H - 2};
  const TI* xb = x + t.b * g.sx[0] + t.c * g.sx[1];
  float a[4][2 * kV] = {};  // rows (pt*2 + ph), samples 2*kV (rows 2, 3 unused in 2-D)
  int64_t to = 0;
  if (two_d) {
LV_UNROLL
    for (int ph = 0; ph < 2; ++ph) load_row(xb + h[ph] * g.sx[3], g.sx[4], t.wo0, g, a[ph]);
  } else {
    to = t.part - g.f0;
    const int64_t fr[2] = {g.f0 + 2 * to, g.f0 + (2 * to + 1 < g.Tv ? 2 * to + 1 : g.Tv - 2)};
LV_UNROLL
    for (int pt = 0; pt < 2; ++pt)
LV_UNROLL
      for (int ph = 0; ph < 2; ++ph) load_row(xb + fr[pt] * g.sx[2] + h[ph] * g.sx[3], g.sx[4], t.wo0, g, a[pt * 2 + ph]);
  }
  float band[8][kV];
LV_UNROLL
  for (int v = 0; v < kV; ++v) {
    float blk[8], o[8];
LV_UNROLL
    for (int r = 0; r < 4; ++r) {
      blk[2 * r] = a[r][2 * v];
      blk[2 * r + 1] = a[r][2 * v + 1];
    }
    if (two_d) {
      haar::analysis2(blk, o);
LV_UNROLL
      for (int k = 0; k < 4; ++k) band[k][v] = o[k] * s2;
    } else {
      haar::analysis3(blk, o);
LV_UNROLL
      for (int k = 0; k < 8; ++k) band[k][v] = o[k] * s3;
    }
  }
  if (two_d) {
    TO* ob = xi + t.b * g.si[0] + t.c * g.si[1] + t.ho * g.si[3] + t.wo0 * g.si[4];
LV_UNROLL
    for (int k = 0; k < 4; ++k) store_n<TO, kV>(ob + k * g.C * g.si[1], g.si[4], t.nv, band[k]);
  } else {
    TO* ob = xv + t.b * g.sv[0] + t.c * g.sv[1] + to * g.sv[2] + t.ho * g.sv[3] + t.wo0 * g.sv[4];
LV_UNROLL
    for (int k = 0; k < 8; ++k) {
      if (bm.slot[k] < 0) continue;
      if (!((bm.mask >> k) & 1u)) {
LV_UNROLL
        for (int v = 0; v < kV; ++v) band[k][v] = 0.f;
      }
      store_n<TO, kV>(ob + bm.slot[k] * g.C * g.sv[1], g.sv[4], t.nv, band[k]);
    }
  }
}

// ----------------------------------------------------------------------------------------- synthesis
// The outputs y[(pt*2+ph)*2+pw] of one block (8 for 3-D, 4 for 2-D), before scaling.
template <class T>
LV_DEV void block3(const T* xv, const Geo& g, const BandMap& bm, int64_t b, int64_t c, int64_t to,
                                       int64_t ho, int64_t wo, float* y) {
  const T* p = xv + b * g.sv[0] + c * g.sv[1] + to * g.sv[2] + ho * g.sv[3] + wo * g.sv[4];
  float bd[8];
LV_UNROLL
  for (int k = 0; k < 8; ++k) bd[k] = bm.on(k) ? to_float(p[bm.slot[k] * g.C * g.sv[1]]) : 0.f;
  haar::synthesis3(bd, y);
}

template <class T>
LV_DEV void block2(const T* xi, const Geo& g, int64_t b, int64_t c, int64_t ho, int64_t wo, float* y) {
  const T* p = xi + b * g.si[0] + c * g.si[1] + ho * g.si[3] + wo * g.si[4];
  float bd[4];
LV_UNROLL
  for (int k = 0; k < 4; ++k) bd[k] = to_float(p[k * g.C * g.si[1]]);
  haar::synthesis2(bd, y);
}

template <class TI, class TO>
LV_DEV void synthesis_body(const TI* __restrict__ xi, const TI* __restrict__ xv, TO* __restrict__ y, const Geo& g,
                           const BandMap& bm, float s2, float s3) {
  const Tile t = tile_of(g);
  if (t.nv == 0) return;
  const bool two_d = t.part < g.f0;
  const int64_t to = t.part - g.f0;
  const bool fold_h = (g.H & 1) && t.ho == g.Ho - 2;
  const bool fold_t = !two_d && (g.Tv & 1) && to == g.To - 2;
  // out[pt*2 + ph][2*v + pw]: the rows of this thread's blocks.
  float out[4][2 * kV];
LV_UNROLL
  for (int v = 0; v < kV; ++v) {
    if (v >= t.nv) {
LV_UNROLL
      for (int r = 0; r < 4; ++r) out[r][2 * v] = out[r][2 * v + 1] = 0.f;
      continue;
    }
    const int64_t wo = t.wo0 + v;
    const bool fold_w = (g.W & 1) && wo == g.Wo - 2;
    float acc[8], u[8];
    if (two_d) {
      // Sources in the CPU kernel's order: rows (own, H fold), then the W fold (own row, H fold).
      block2(xi, g, t.b, t.c, t.ho, wo, acc);
      if (fold_h) {
        block2(xi, g, t.b, t.c, t.ho + 1, wo, u);
        acc[2] += u[2];
        acc[3] += u[3];
      }
      if (fold_w) {
        float cw[2];
        block2(xi, g, t.b, t.c, t.ho, wo + 1, u);
        cw[0] = u[1];
        cw[1] = u[3];
        if (fold_h) {
          block2(xi, g, t.b, t.c, t.ho + 1, wo + 1, u);
          cw[1] += u[3];
        }
        acc[1] += cw[0];
        acc[3] += cw[1];
      }
LV_UNROLL
      for (int ph = 0; ph < 2; ++ph) {
        out[ph][2 * v] = acc[ph * 2] * s2;
        out[ph][2 * v + 1] = acc[ph * 2 + 1] * s2;
        out[2 + ph][2 * v] = out[2 + ph][2 * v + 1] = 0.f;
      }
    } else {
      // Sources in the CPU kernel's order: (t, h) = (own, own), (own, fold), (fold, own), (fold, fold);
      // then the W fold adds the same sum taken at the reflected column.
      block3(xv, g, bm, t.b, t.c, to, t.ho, wo, acc);
      if (fold_h) {
        block3(xv, g, bm, t.b, t.c, to, t.ho + 1, wo, u);
LV_UNROLL
        for (int k = 0; k < 8; ++k)
          if (k & 2) acc[k] += u[k];
      }
      if (fold_t) {
        block3(xv, g, bm, t.b, t.c, to + 1, t.ho, wo, u);
LV_UNROLL
        for (int k = 4; k < 8; ++k) acc[k] += u[k];
        if (fold_h) {
          block3(xv, g, bm, t.b, t.c, to + 1, t.ho + 1, wo, u);
          acc[6] += u[6];
          acc[7] += u[7];
        }
      }
      if (fold_w) {
        float cw[8];  // indexed like acc; only odd (pw = 1) entries are used
        block3(xv, g, bm, t.b, t.c, to, t.ho, wo + 1, cw);
        if (fold_h) {
          block3(xv, g, bm, t.b, t.c, to, t.ho + 1, wo + 1, u);
          cw[3] += u[3];
          cw[7] += u[7];
        }
        if (fold_t) {
          block3(xv, g, bm, t.b, t.c, to + 1, t.ho, wo + 1, u);
          cw[5] += u[5];
          cw[7] += u[7];
          if (fold_h) {
            block3(xv, g, bm, t.b, t.c, to + 1, t.ho + 1, wo + 1, u);
            cw[7] += u[7];
          }
        }
LV_UNROLL
        for (int k = 1; k < 8; k += 2) acc[k] += cw[k];
      }
LV_UNROLL
      for (int r = 0; r < 4; ++r) {
        out[r][2 * v] = acc[2 * r] * s3;
        out[r][2 * v + 1] = acc[2 * r + 1] * s3;
      }
    }
  }
  // Store the real samples: rows h < H, frames < Tv, columns w < W (the reflected ones were gathered).
  const int64_t w0 = 2 * t.wo0;
  const int64_t nw64 = g.W - w0;
  const int nw = static_cast<int>(nw64 < 2 * kV ? nw64 : 2 * kV);
  TO* yb = y + t.b * g.sx[0] + t.c * g.sx[1] + w0 * g.sx[4];
  const int nt = two_d ? 1 : 2;
  for (int pt = 0; pt < nt; ++pt) {
    const int64_t frame = two_d ? 0 : g.f0 + 2 * to + pt;
    if (!two_d && 2 * to + pt >= g.Tv) continue;
LV_UNROLL
    for (int ph = 0; ph < 2; ++ph) {
      const int64_t hh = 2 * t.ho + ph;
      if (hh >= g.H) continue;
      store_n<TO, 2 * kV>(yb + frame * g.sx[2] + hh * g.sx[3], g.sx[4], nw, out[pt * 2 + ph]);
    }
  }
}

// ------------------------------------------------------------------------------ launch plan (host)
inline Geo geometry(const TensorView& video, const TensorView& xi, const TensorView& xv, bool has_xi, bool has_xv) {
  Geo g;
  g.C = video.shape[1];
  g.H = video.shape[3];
  g.W = video.shape[4];
  g.Ho = (g.H + 1) / 2;
  g.Wo = (g.W + 1) / 2;
  g.f0 = has_xi ? 1 : 0;
  g.Tv = has_xv ? video.shape[2] - g.f0 : 0;
  g.To = (g.Tv + 1) / 2;
  g.parts = g.f0 + g.To;
  g.ho_tiles = (g.Ho + kTY - 1) / kTY;
  for (int d = 0; d < 5; ++d) {
    g.sx[d] = video.stride[d];
    g.si[d] = xi.stride[d];
    g.sv[d] = xv.stride[d];
  }
  return g;
}

inline BandMap band_map(const KernelArgs& a) {
  BandMap m;
  m.mask = static_cast<unsigned>(a.i(2));
  for (int k = 0; k < 8; ++k) m.slot[k] = static_cast<int>(a.i(3 + k));
  return m;
}

inline void launch_dims(const Geo& g, int64_t batch_channels, const std::string& name, dim3& grid) {
  const int64_t gx = g.ho_tiles * g.parts * batch_channels;
  const int64_t per_row = static_cast<int64_t>(kTX) * kV;
  const int64_t gy = (g.Wo + per_row - 1) / per_row;
  if (gx > 0x7fffffffLL || gy > 65535) throw std::invalid_argument(name + ": tensor too large for one launch");
  grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
}

}  // namespace haar_kernels
}  // namespace cuda
}  // namespace leanvae
