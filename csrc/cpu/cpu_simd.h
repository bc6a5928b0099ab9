// 32-byte vectors for the CPU kernels through GCC/Clang vector extensions, for loops the auto-vectoriser
// leaves scalar (selects, fixed-order sums): one ymm register on the AVX2 and AVX-512 paths, a pair of
// xmm registers on the x86-64 baseline path, a pair of NEON registers on ARM.
#pragma once
#include <cstdint>
#include <cstring>

#include "../common/cpu_path.h"

namespace leanvae {
namespace cpu {
inline namespace LEANVAE_CPU_PATH_NS {  // one copy per SIMD path: see common/cpu_path.h

template <class A> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t mask __attribute__((vector_size(32)));  // what a comparison returns: all ones or zero
  static constexpr int n = 8;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t mask __attribute__((vector_size(32)));
  static constexpr int n = 4;
};
template <class A> using vec_t = typename Vec<A>::type;
template <class A> using mask_t = typename Vec<A>::mask;

template <class A>
inline vec_t<A> vload(const A* p) { vec_t<A> v; std::memcpy(&v, p, sizeof(v)); return v; }
template <class A>
inline void vstore(A* p, vec_t<A> v) { std::memcpy(p, &v, sizeof(v)); }
// Every lane s: an explicit initialiser compiles to one broadcast (a lane-by-lane loop to a chain of
// inserts; `vec{} + s` would turn -0.0 into +0.0).
inline vec_t<float> vsplat(float s) { return vec_t<float>{s, s, s, s, s, s, s, s}; }
inline vec_t<double> vsplat(double s) { return vec_t<double>{s, s, s, s}; }
// m ? v : +0.0, lane by lane (m from a comparison).
template <class A>
inline vec_t<A> vselect0(mask_t<A> m, vec_t<A> v) { return reinterpret_cast<vec_t<A>>(reinterpret_cast<mask_t<A>>(v) & m); }
// |v| by clearing the sign bit (NaN stays NaN).
template <class A>
inline vec_t<A> vabs(vec_t<A> v) {
  const mask_t<A> sign = reinterpret_cast<mask_t<A>>(vsplat(A(-0.0)));
  return reinterpret_cast<vec_t<A>>(reinterpret_cast<mask_t<A>>(v) & ~sign);
}
// Sum of the lanes in a fixed pairwise order.
template <class A>
inline A vsum(vec_t<A> v) {
  A lanes[Vec<A>::n];
  std::memcpy(lanes, &v, sizeof(v));
  for (int s = Vec<A>::n / 2; s > 0; s >>= 1)
    for (int l = 0; l < s; ++l) lanes[l] += lanes[l + s];
  return lanes[0];
}

}  // namespace LEANVAE_CPU_PATH_NS
}  // namespace cpu
}  // namespace leanvae
