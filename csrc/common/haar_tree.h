// The Haar butterflies shared by the CPU and CUDA kernels (and mirrored by the Triton kernels).
//
// Every backend evaluates a band (or an output sample) with the same tree of additions in the same order
// as the float32 reference in leanvae_kernels/ops/haar.py, and applies the scale once at the end, so
// float32 results agree bit for bit across backends (no multiplications inside the tree, hence nothing
// for a compiler to contract into an FMA).
//
// Indexing: a 2x2x2 input block a[(pt*2 + ph)*2 + pw] (parity along T, H, W); 3-D band 4*bt + 2*bh + bw;
// a 2x2 block a[ph*2 + pw]; 2-D band 2*bw + bh (W is the major bit in the published 2-D layout).
#pragma once

#include "cpu_path.h"

#if defined(__CUDACC__)
#define LEANVAE_HD __host__ __device__ __forceinline__
#else
#define LEANVAE_HD inline
#endif

namespace leanvae {
namespace haar {
inline namespace LEANVAE_CPU_PATH_NS {  // one copy per SIMD path: see cpu_path.h

// 3-D analysis, stages along T, then H, then W (the published order). low = a + b, high = a - b.
template <class A>
LEANVAE_HD void analysis3(const A* a, A* band) {
  A t[8], h[8];
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // k = ph*2 + pw
    t[k] = a[k] + a[4 + k];
    t[4 + k] = a[k] - a[4 + k];
  }
#pragma unroll
  for (int bt = 0; bt < 2; ++bt) {
#pragma unroll
    for (int pw = 0; pw < 2; ++pw) {
      const A u = t[bt * 4 + pw], v = t[bt * 4 + 2 + pw];
      h[bt * 4 + pw] = u + v;
      h[bt * 4 + 2 + pw] = u - v;
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // k = bt*2 + bh
    band[2 * k] = h[2 * k] + h[2 * k + 1];
    band[2 * k + 1] = h[2 * k] - h[2 * k + 1];
  }
}

// 2-D analysis, stages along W, then H.
template <class A>
LEANVAE_HD void analysis2(const A* a, A* band) {
  const A l0 = a[0] + a[1], h0 = a[0] - a[1];  // row ph = 0
  const A l1 = a[2] + a[3], h1 = a[2] - a[3];  // row ph = 1
  band[0] = l0 + l1;  // bw = 0, bh = 0
  band[1] = l0 - l1;  // bw = 0, bh = 1
  band[2] = h0 + h1;  // bw = 1, bh = 0
  band[3] = h0 - h1;  // bw = 1, bh = 1
}

// 3-D synthesis (also the adjoint of analysis3), stages along W, then H, then T: out[(pt*2+ph)*2+pw].
template <class A>
LEANVAE_HD void synthesis3(const A* band, A* out) {
  A w[8], h[8];
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // k = bt*2 + bh
    w[2 * k] = band[2 * k] + band[2 * k + 1];
    w[2 * k + 1] = band[2 * k] - band[2 * k + 1];
  }
#pragma unroll
  for (int bt = 0; bt < 2; ++bt) {
#pragma unroll
    for (int pw = 0; pw < 2; ++pw) {
      const A u = w[bt * 4 + pw], v = w[bt * 4 + 2 + pw];
      h[bt * 4 + pw] = u + v;
      h[bt * 4 + 2 + pw] = u - v;
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // k = ph*2 + pw
    out[k] = h[k] + h[4 + k];
    out[4 + k] = h[k] - h[4 + k];
  }
}

// 2-D synthesis, stages along H, then W: out[ph*2 + pw].
template <class A>
LEANVAE_HD void synthesis2(const A* band, A* out) {
  const A l0 = band[0] + band[1], l1 = band[0] - band[1];  // bw = 0: rows ph = 0, 1
  const A h0 = band[2] + band[3], h1 = band[2] - band[3];  // bw = 1
  out[0] = l0 + h0;
  out[1] = l0 - h0;
  out[2] = l1 + h1;
  out[3] = l1 - h1;
}

// One output sample of the 3-D synthesis with fixed parities, the same additions as synthesis3:
// W stage, then H, then T. sp* is +1 for parity 0 and -1 for parity 1 (u + (-1)*v == u - v exactly).
template <class A>
LEANVAE_HD A synthesis3_at(const A* band, A spt, A sph, A spw) {
  const A w00 = band[0] + spw * band[1], w01 = band[2] + spw * band[3];
  const A w10 = band[4] + spw * band[5], w11 = band[6] + spw * band[7];
  const A h0 = w00 + sph * w01, h1 = w10 + sph * w11;
  return h0 + spt * h1;
}

// One output sample of the 2-D synthesis: H stage, then W.
template <class A>
LEANVAE_HD A synthesis2_at(const A* band, A sph, A spw) {
  const A l = band[0] + sph * band[1], h = band[2] + sph * band[3];
  return l + spw * h;
}

}  // namespace LEANVAE_CPU_PATH_NS
}  // namespace haar
}  // namespace leanvae
