// Bodies of the CUDA ISTA-Net+ gradient step kernels, forward and backward (csrc/cuda/ista_step.cu has the
// layout, the launch plan and the launchers). Compiled by nvcc and, for the test suite's race-checking
// emulation, by a host compiler: sync points and shared memory go through lv_sync.cuh.
#pragma once
#include <cstdint>

#include "ista_step_shape.h"
#include "lv_sync.cuh"
#ifdef __CUDACC__
#include "cuda_common.cuh"
#endif

namespace leanvae {
namespace cuda {
namespace ista {

constexpr unsigned kFull = 0xffffffffu;

template <class T>
struct alignas(kCols * sizeof(T)) Pack4 {
  T v[kCols];
};

// Four consecutive elements starting at column j of a row (zeros past `D`); `vec`: the row base is
// aligned for one 4-element access.
template <class T>
LV_DEV void load4(const T* __restrict__ row, int j, int D, bool vec, float out[kCols]) {
  if (vec && j + kCols <= D) {
    const Pack4<T> p = *reinterpret_cast<const Pack4<T>*>(row + j);
#pragma unroll
    for (int e = 0; e < kCols; ++e) out[e] = to_float(p.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kCols; ++e) out[e] = j + e < D ? to_float(row[j + e]) : 0.f;
  }
}

template <class T>
LV_DEV void store4(T* __restrict__ row, int j, int D, bool vec, const float v[kCols]) {
  if (vec && j + kCols <= D) {
    Pack4<T> p;
#pragma unroll
    for (int e = 0; e < kCols; ++e) p.v[e] = from_float<T>(v[e]);
    *reinterpret_cast<Pack4<T>*>(row + j) = p;
  } else {
#pragma unroll
    for (int e = 0; e < kCols; ++e)
      if (j + e < D) row[j + e] = from_float<T>(v[e]);
  }
}

template <class T>
LV_DEV float round_to(float v) { return to_float(from_float<T>(v)); }

// 32 values per lane in, after 31 shuffles lane l holds the warp's sum of value l. At the step with
// offset S each lane keeps the half of its remaining 2S values selected by bit S of its lane id and adds
// the partner's copy of that half. (Compile-time S: every index is static, so v stays in registers.)
template <int S>
LV_DEV void reduce_scatter_step(float (&v)[32], int lane) {
  const bool upper = (lane & S) != 0;
#pragma unroll
  for (int i = 0; i < S; ++i) {
    const float lo = v[i], hi = v[i + S];  // values first: a select of addresses would put v in local memory
    const float send = upper ? lo : hi;
    const float keep = upper ? hi : lo;
    v[i] = keep + LV_SHFL_XOR("ista.reduce_scatter", kFull, send, S);
  }
  if constexpr (S > 1) reduce_scatter_step<S / 2>(v, lane);
}

LV_DEV float warp_reduce_scatter(float (&v)[32], int lane) {
  reduce_scatter_step<16>(v, lane);
  return v[0];
}

struct StepParams {
  const void* src;  // r (N, D) rows, or Q (D, d) contiguous in the init mode
  const void* u;    // residual mode: (N, D) rows
  const void* y;    // (N, d) rows
  const void* phi;  // (d, D) contiguous
  const void* grad; // backward: (N, D) rows
  void* out;        // forward: (N, D) contiguous; backward: grad_x
  float* grad_y;    // backward: (N, d) contiguous, float32 (the init mode adds to it in Python)
  float* part_phi;  // backward: (blocks, d, D)
  float* part_w;    // backward: (blocks,)
  int64_t n, src_rs, u_rs, y_rs, grad_rs, rows_per_partial;
  int D, d, DP, D4;
  bool vec;  // every row base of src, u, grad and out is aligned for 4-element accesses
  DeviceScalar w;
};

// Shared memory (floats): phi_s (DP, D4), qt_s (DP, D4) in the init mode, red_s (warps, DP / KC, 32),
// e_s (R, DP), and in the backward h_s (R, DP) and one float per warp.
// Fills phi_s (and qt_s) from global memory, converting to float and zero-padding.
template <class T, int MODE>
LV_DEV void fill_tables(const StepParams& p, LV_SPTR(float) phi_s, LV_SPTR(float) qt_s) {
  const T* phi = static_cast<const T*>(p.phi);
  const T* q = static_cast<const T*>(p.src);
  const int total = p.DP * p.D4;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int k = idx / p.D4, j = idx % p.D4;
    const bool in = k < p.d && j < p.D;
    phi_s[idx] = in ? to_float(phi[static_cast<int64_t>(k) * p.D + j]) : 0.f;
    if (MODE == kInit) qt_s[idx] = in ? to_float(q[static_cast<int64_t>(j) * p.d + k]) : 0.f;
  }
}

// x of `row` at this thread's columns (zeros for a row past the end), rounded to T as the model stores it.
template <class T, int MODE>
LV_DEV void load_x(const StepParams& p, int64_t row, int j0, LV_SPTR(const float) qt_s, float x[kCols]) {
  if (row >= p.n) {
#pragma unroll
    for (int e = 0; e < kCols; ++e) x[e] = 0.f;
    return;
  }
  if (MODE == kInit) {
    const T* yr = static_cast<const T*>(p.y) + row * p.y_rs;
#pragma unroll
    for (int e = 0; e < kCols; ++e) x[e] = 0.f;
    for (int k = 0; k < p.d; ++k) {
      const float yk = to_float(yr[k]);
      const float4 q = LV_LDS4(qt_s + k * p.D4 + j0);
      x[0] += yk * q.x;
      x[1] += yk * q.y;
      x[2] += yk * q.z;
      x[3] += yk * q.w;
    }
#pragma unroll
    for (int e = 0; e < kCols; ++e) x[e] = j0 + e < p.D ? round_to<T>(x[e]) : 0.f;
  } else {
    load4(static_cast<const T*>(p.src) + row * p.src_rs, j0, p.D, p.vec, x);
    if (MODE == kResidual) {
      float b[kCols];
      load4(static_cast<const T*>(p.u) + row * p.u_rs, j0, p.D, p.vec, b);
#pragma unroll
      for (int e = 0; e < kCols; ++e) x[e] = round_to<T>(x[e] + b[e]);
    }
  }
}

// Dot products of VR rows (this thread's columns in v) with every phi row, reduced over the CTA:
// red_s[(warp * rounds + c) * 32 + vr * KC + kk] = the warp's sum for row vr and phi row c * KC + kk.
template <int VR>
LV_DEV void dots_to_smem(const float (&v)[VR][kCols], LV_SPTR(const float) phi_s, int DP, int D4, int j0,
                         LV_SPTR(float) red_s) {
  constexpr int KC = 32 / VR;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, rounds = DP / KC;
  for (int c = 0; c < rounds; ++c) {
    float acc[32];
#pragma unroll
    for (int kk = 0; kk < KC; ++kk) {
      const float4 ph = LV_LDS4(phi_s + (c * KC + kk) * D4 + j0);
#pragma unroll
      for (int r = 0; r < VR; ++r)
        acc[r * KC + kk] = v[r][0] * ph.x + v[r][1] * ph.y + v[r][2] * ph.z + v[r][3] * ph.w;
    }
    red_s[(warp * rounds + c) * 32 + lane] = warp_reduce_scatter(acc, lane);
  }
}

// The CTA's total for row vr and phi row k: the warps' sums in warp order.
template <int VR>
LV_DEV float cta_dot(LV_SPTR(const float) red_s, int DP, int vr, int k) {
  constexpr int KC = 32 / VR;
  const int rounds = DP / KC, warps = blockDim.x >> 5, idx = vr * KC + k % KC, c = k / KC;
  float s = 0.f;
  for (int w = 0; w < warps; ++w) s += red_s[(w * rounds + c) * 32 + idx];
  return s;
}

// Forward, one block (`smem`: the launch's dynamic shared memory, plan() floats).
template <class T, int MODE, int R>
LV_DEV void fwd_body(const StepParams& p, LV_SPTR(float) smem) {
  LV_SPTR(float) phi_s = smem;
  LV_SPTR(float) qt_s = phi_s + p.DP * p.D4;
  LV_SPTR(float) red_s = qt_s + (MODE == kInit ? p.DP * p.D4 : 0);
  LV_SPTR(float) e_s = red_s + (blockDim.x >> 5) * p.DP * R;  // red_s: (warps, DP / KC, 32) with KC = 32 / R
  fill_tables<T, MODE>(p, phi_s, qt_s);
  LV_SYNC("ista.fwd_tables");  // phi_s (and qt_s) filled

  const float w = p.w.get();
  const int j0 = threadIdx.x * kCols;
  const int64_t groups = (p.n + R - 1) / R;
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t row0 = g * R;
    float x[R][kCols];
#pragma unroll
    for (int r = 0; r < R; ++r) load_x<T, MODE>(p, row0 + r, j0, qt_s, x[r]);
    dots_to_smem<R>(x, phi_s, p.DP, p.D4, j0, red_s);
    LV_SYNC("ista.fwd_dots");  // every warp's sums in red_s; every thread done reading e_s of the last group
    for (int t = threadIdx.x; t < R * p.DP; t += blockDim.x) {
      const int r = t / p.DP, k = t % p.DP;
      const int64_t row = row0 + r;
      const float s = cta_dot<R>(red_s, p.DP, r, k);
      e_s[t] = (k < p.d && row < p.n) ? s - to_float(static_cast<const T*>(p.y)[row * p.y_rs + k]) : 0.f;
    }
    LV_SYNC("ista.fwd_e");  // e_s complete; every thread done reading red_s
    float v[R][kCols] = {};
    for (int k = 0; k < p.d; ++k) {
      const float4 ph = LV_LDS4(phi_s + k * p.D4 + j0);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float ek = e_s[r * p.DP + k];
        v[r][0] += ek * ph.x;
        v[r][1] += ek * ph.y;
        v[r][2] += ek * ph.z;
        v[r][3] += ek * ph.w;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (row0 + r >= p.n) break;
      float o[kCols];
#pragma unroll
      for (int e = 0; e < kCols; ++e) o[e] = x[r][e] - w * v[r][e];
      store4(static_cast<T*>(p.out) + (row0 + r) * p.D, j0, p.D, p.vec, o);
    }
  }
}

// Backward: groups of kBwdRows rows; the dot products of the x rows and the grad rows go through one
// reduction (2 * kBwdRows virtual rows).
// Backward, one block (`smem`: the launch's dynamic shared memory, plan() floats).
template <class T, int MODE, int DMAX>
LV_DEV void bwd_body(const StepParams& p, LV_SPTR(float) smem) {
  constexpr int R = kBwdRows, VR = 2 * R;
  LV_SPTR(float) phi_s = smem;
  LV_SPTR(float) qt_s = phi_s + p.DP * p.D4;
  LV_SPTR(float) red_s = qt_s + (MODE == kInit ? p.DP * p.D4 : 0);
  LV_SPTR(float) e_s = red_s + (blockDim.x >> 5) * p.DP * VR;
  LV_SPTR(float) h_s = e_s + R * p.DP;
  LV_SPTR(float) wred_s = h_s + R * p.DP;  // one float per warp
  fill_tables<T, MODE>(p, phi_s, qt_s);
  LV_SYNC("ista.bwd_tables");  // phi_s (and qt_s) filled

  // grad_phi rows accumulated in registers per pass over the block's rows: every d at once up to 16, and
  // above 16 at a time, one pass per 16 (recomputing the dot products): DMAX x 4 = 256 accumulators
  // per thread at d = 64 spilled 544-576 bytes at 255 registers on sm_90.
  constexpr int KR = DMAX < 16 ? DMAX : 16;
  const float w = p.w.get();
  const int j0 = threadIdx.x * kCols, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t blocks = (p.n + p.rows_per_partial - 1) / p.rows_per_partial;
  const int passes = DMAX <= KR ? 1 : (p.d + KR - 1) / KR;
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
   float wacc = 0.f;
   for (int pass = 0; pass < passes; ++pass) {
    const int k0 = pass * KR;
    float gacc[KR][kCols] = {};
    const int64_t end = min(p.n, (b + 1) * p.rows_per_partial);
    for (int64_t row0 = b * p.rows_per_partial; row0 < end; row0 += R) {
      float xg[VR][kCols];  // rows 0..R-1: x, rows R..2R-1: grad
#pragma unroll
      for (int r = 0; r < R; ++r) {
        load_x<T, MODE>(p, row0 + r, j0, qt_s, xg[r]);  // past `end` only past n (end is n or a multiple of R)
        if (row0 + r < end) {
          load4(static_cast<const T*>(p.grad) + (row0 + r) * p.grad_rs, j0, p.D, p.vec, xg[R + r]);
        } else {
#pragma unroll
          for (int e = 0; e < kCols; ++e) xg[R + r][e] = 0.f;
        }
      }
      dots_to_smem<VR>(xg, phi_s, p.DP, p.D4, j0, red_s);
      LV_SYNC("ista.bwd_dots");  // every warp's sums in red_s; every thread done reading e_s, h_s of the last rows
      for (int t = threadIdx.x; t < VR * p.DP; t += blockDim.x) {
        const int vr = t / p.DP, k = t % p.DP;
        const float s = cta_dot<VR>(red_s, p.DP, vr, k);
        if (vr < R) {
          const int64_t row = row0 + vr;
          e_s[t] = (k < p.d && row < end) ? s - to_float(static_cast<const T*>(p.y)[row * p.y_rs + k]) : 0.f;
        } else {
          // rows past the end: 0, not 0 . phi (NaN for an inf in phi, which would reach the grad_phi partial)
          h_s[t - R * p.DP] = (row0 + vr - R < end) ? s : 0.f;
        }
      }
      LV_SYNC("ista.bwd_eh");  // e_s and h_s complete; every thread done reading red_s
      // grad_y = w * h and this thread's share of sum(e . h), in a fixed assignment of (row, k) to threads;
      // then grad_x. Once, in the first pass.
      if (pass == 0) {
      bool nonfinite = false;
      for (int t = threadIdx.x; t < R * p.DP; t += blockDim.x) {
        const int r = t / p.DP, k = t % p.DP;
        if (k < p.d && row0 + r < end && !isfinite(e_s[t] * h_s[t])) nonfinite = true;
      }
      if (LV_SYNC_OR("ista.bwd_nonfinite", nonfinite)) {
        // Rare (an inf or NaN in these rows' data): a row whose e . h is not finite adds its share of
        // grad_w in the reference's order, g . (e @ phi), over this thread's columns (csrc/cpu/ista_step.cpp:
        // reference_order_row); the other rows as below.
        unsigned bad_rows = 0;  // a bit per row (an array indexed by a runtime row would live in local memory)
#pragma unroll
        for (int r = 0; r < R; ++r)
          for (int k = 0; k < p.d && row0 + r < end; ++k)
            if (!isfinite(e_s[r * p.DP + k] * h_s[r * p.DP + k])) bad_rows |= 1u << r;
        for (int t = threadIdx.x; t < R * p.DP; t += blockDim.x) {
          const int r = t / p.DP, k = t % p.DP;
          const int64_t row = row0 + r;
          if (k < p.d && row < end) {
            p.grad_y[row * p.d + k] = w * h_s[t];
            if (!((bad_rows >> r) & 1u)) wacc += e_s[t] * h_s[t];
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (!((bad_rows >> r) & 1u)) continue;
#pragma unroll
          for (int e = 0; e < kCols; ++e) {
            if (j0 + e >= p.D) break;
            float m = 0.f;
            for (int k = 0; k < p.d; ++k) m += e_s[r * p.DP + k] * phi_s[k * p.D4 + j0 + e];
            wacc += xg[R + r][e] * m;
          }
        }
      } else {
      for (int t = threadIdx.x; t < R * p.DP; t += blockDim.x) {
        const int r = t / p.DP, k = t % p.DP;
        const int64_t row = row0 + r;
        if (k < p.d && row < end) {
          p.grad_y[row * p.d + k] = w * h_s[t];
          wacc += e_s[t] * h_s[t];
        }
      }
      }
      float v[R][kCols] = {};
      for (int k = 0; k < p.d; ++k) {
        const float4 ph = LV_LDS4(phi_s + k * p.D4 + j0);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float hk = h_s[r * p.DP + k];
          v[r][0] += hk * ph.x;
          v[r][1] += hk * ph.y;
          v[r][2] += hk * ph.z;
          v[r][3] += hk * ph.w;
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (row0 + r >= end) break;
        float o[kCols];
#pragma unroll
        for (int e = 0; e < kCols; ++e) o[e] = xg[R + r][e] - w * v[r][e];
        store4(static_cast<T*>(p.out) + (row0 + r) * p.D, j0, p.D, p.vec, o);
      }
      }
#pragma unroll
      for (int kk = 0; kk < KR; ++kk) {
        const int k = k0 + kk;
        if (k >= p.d) break;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float ek = e_s[r * p.DP + k], hk = h_s[r * p.DP + k];
#pragma unroll
          for (int e = 0; e < kCols; ++e) gacc[kk][e] += ek * xg[R + r][e] + hk * xg[r][e];
        }
      }
    }
    float* part = p.part_phi + b * p.d * static_cast<int64_t>(p.D);
#pragma unroll
    for (int kk = 0; kk < KR; ++kk) {
      const int k = k0 + kk;
      if (k >= p.d) break;
#pragma unroll
      for (int e = 0; e < kCols; ++e)
        if (j0 + e < p.D) part[static_cast<int64_t>(k) * p.D + j0 + e] = gacc[kk][e];
    }
   }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) wacc += LV_SHFL_XOR("ista.bwd_wacc", kFull, wacc, off);
    if (lane == 0) wred_s[warp] = wacc;
    LV_SYNC("ista.bwd_wred");  // every warp's grad_w share in wred_s
    if (threadIdx.x == 0) {
      float s = 0.f;
      for (int i = 0; i < (int)(blockDim.x >> 5); ++i) s += wred_s[i];
      p.part_w[b] = s;
    }
  }
}

}  // namespace ista
}  // namespace cuda
}  // namespace leanvae
