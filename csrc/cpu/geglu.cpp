// GEGLU on the CPU: out = value * gelu(gate) with value = u[:, :p], gate = u[:, p:] (exact erf GELU), and
// its backward grad_u = [grad * gelu(gate) | grad * value * gelu'(gate)], each in one pass over u.
// u: (N, 2p), out/grad: (N, p), grad_u: (N, 2p); any row strides, unit column stride; one dtype.
//
// gelu(g) = g * Phi(g), Phi the standard normal CDF; gelu'(g) = Phi(g) + g * phi(g), phi(g) = exp(-g^2/2)/sqrt(2 pi).
// Float math (double for float64). The float erfc/exp are our own vectorised approximations, fitted for this
// file by least squares in float64 on Chebyshev nodes. With z = g / sqrt2 and a = |z|:
//   a < 4:   erfc(a) = exp(-a^2) * R(a / 2 - 1)   (R ~ erfc(a) exp(a^2) on [0, 4]: degree 16, relative
//            error 2.5e-8; 3.4 float32 ulps evaluated in float, i.e. under 1.7 ulps of 1 in Phi)
//   a >= 4:  erfc(a) < 1.6e-8 is taken as 0 (1 - erfc rounds to 1 in float; Phi of a gate below
//            -4 sqrt2 is then 0, as torch's float 1 + erf(z) gives as well)
//   Phi(g) = erfc(a) / 2 for z < 0, 1 - erfc(a) / 2 otherwise.
// For a negative gate Phi comes from erfc directly, not as (1 + erf(z)) / 2: no cancellation, so gelu of a
// negative gate keeps its relative accuracy (torch's float path loses it: gelu(-5) = -1.19e-6 there,
// -1.43e-6 exactly). One polynomial for every gate, no branch and no division: an earlier two-piece
// version (erf by a polynomial below a = 1, erfc in 1/a above) was as accurate and took more instructions.
// Phi's absolute error measured over 2e6 gates in [-12, 12]: 2.1 float32 ulps of 1 (tests/test_geglu.py
// derives its tolerance from these terms).
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "cpu_common.h"
#include "cpu_simd.h"

namespace leanvae {
namespace cpu {
namespace {

// 16 floats a vector (64 bytes, wider than cpu_simd.h's 32): one zmm register where AVX-512 is enabled,
// two ymm registers on AVX2 (GCC/Clang split generic vectors). The math is a few dozen vector instructions,
// so the kernel is compute-bound on the CPU: on this AVX-512 machine (one thread, CPU time, a 1524-row
// chunk of the feed-forward) the 16-lane version took 0.8x the time of the 8-lane one in float32 and
// 0.55x in bfloat16. Nothing in the results depends on the lane count.
typedef float V __attribute__((vector_size(64)));
typedef int32_t M __attribute__((vector_size(64)));
constexpr int VN = 16;
constexpr int64_t kRowsPerTask = 16;  // rows per OpenMP work item

inline V vsel(M m, V a, V b) {
  return reinterpret_cast<V>((reinterpret_cast<M>(a) & m) | (reinterpret_cast<M>(b) & ~m));
}
// Every lane s (an explicit initialiser: one broadcast, and -0.0 stays -0.0).
inline V vs(float s) { return V{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
inline V vabs16(V v) { return reinterpret_cast<V>(reinterpret_cast<M>(v) & 0x7fffffff); }
inline V vload16(const float* p) { V v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void vstore16(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for x <= 0 (or NaN): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a degree-7 Taylor
// polynomial (truncation 5e-9 relative), times 2^n built in the exponent bits. Below -87 the result
// (< 1.7e-38) is returned as 0; -inf gives 0, NaN gives NaN.
inline V vexp_nonpos(V x) {
  const V xc = vsel(x >= vs(-87.0f), x, vs(-87.0f));  // also maps NaN to a safe value (restored below)
  const V magic = vs(12582912.0f);                     // 1.5 * 2^23: adding it rounds to an integer
  const V n = (xc * vs(1.44269504f) + magic) - magic;
  const V r = (xc - n * vs(0.693145751953125f)) - n * vs(1.42860682030941723e-6f);
  V p = vs(1.0f / 5040);
  p = p * r + vs(1.0f / 720);
  p = p * r + vs(1.0f / 120);
  p = p * r + vs(1.0f / 24);
  p = p * r + vs(1.0f / 6);
  p = p * r + vs(0.5f);
  p = p * r + vs(1.0f);
  p = p * r + vs(1.0f);
  const M ni = __builtin_convertvector(n, M);
  const V scale = reinterpret_cast<V>((ni + 127) << 23);
  V y = vsel(x < vs(-87.0f), vs(0.0f), p * scale);
  return vsel(x != x, x, y);
}

// Phi(g) = (1 + erf(g / sqrt2)) / 2, absolute error a few float ulps of 1 (see the top of the file).
inline V vphi(V g) {
  const V z = g * vs(0.70710678f);
  const V a = vabs16(z);
  const V x = a * vs(0.5f) - vs(1.0f);  // [0, 4] -> [-1, 1]
  V q = vs(2.193003456e-04f);  // erfc(a) * exp(a^2), in x
  q = q * x + vs(-5.388585269e-04f);
  q = q * x + vs(2.066723828e-04f);
  q = q * x + vs(-5.359570423e-05f);
  q = q * x + vs(1.491612988e-03f);
  q = q * x + vs(-3.285124432e-03f);
  q = q * x + vs(4.765686579e-03f);
  q = q * x + vs(-7.992272265e-03f);
  q = q * x + vs(1.422786340e-02f);
  q = q * x + vs(-2.375350520e-02f);
  q = q * x + vs(3.793203831e-02f);
  q = q * x + vs(-5.859788507e-02f);
  q = q * x + vs(8.704975992e-02f);
  q = q * x + vs(-1.236861199e-01f);
  q = q * x + vs(1.672111154e-01f);
  q = q * x + vs(-2.135929018e-01f);
  q = q * x + vs(2.553956807e-01f);
  const V erfc_a = vsel(a < vs(4.0f), vexp_nonpos(-(a * a)) * q, vs(0.0f));
  return vsel(z < vs(0.0f), vs(0.5f) * erfc_a, vs(1.0f) - vs(0.5f) * erfc_a);  // NaN: 1, and g * Phi is NaN
}

// gelu'(g) = Phi(g) + g * phi(g). At g = +-inf, g * phi is inf * 0 = NaN, as in torch's GELU backward.
inline V vdgelu(V g, V phi_cdf) {
  return phi_cdf + g * (vexp_nonpos(-(g * g * vs(0.5f))) * vs(0.39894228f));
}

inline double phi_cdf(double g) { return 0.5 * std::erfc(-g * 0.70710678118654752440); }
inline double dgelu(double g) { return phi_cdf(g) + g * (std::exp(-0.5 * g * g) * 0.39894228040143267794); }

// Loads lanes [j, j + k) of a row (k <= VN) as float, the rest 0.
// A full vector (k == VN, the common case) has a compile-time trip count, so it compiles to vector loads.
template <class T>
inline V load_lanes(const T* p, int k) {
  float buf[VN] = {};
  if (k == VN) {
    for (int l = 0; l < VN; ++l) buf[l] = load(p + l);
  } else {
    for (int l = 0; l < k; ++l) buf[l] = load(p + l);
  }
  return vload16(buf);
}
template <class T>
inline void store_lanes(T* p, V v, int k) {
  float buf[VN];
  vstore16(buf, v);
  if (k == VN) {
    for (int l = 0; l < VN; ++l) store(p + l, buf[l]);
  } else {
    for (int l = 0; l < k; ++l) store(p + l, buf[l]);
  }
}

// bfloat16, full vectors: the conversions as vector integer ops (the element-wise helpers of cpu_common.h
// do not vectorise here, and bfloat16 ran at half the float32 speed with them). Same rounding as
// from_float<BFloat16>: to nearest even, NaN kept quiet.
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
template <>
inline V load_lanes<BFloat16>(const BFloat16* p, int k) {
  if (k != VN) {
    float buf[VN] = {};
    for (int l = 0; l < k; ++l) buf[l] = load(p + l);
    return vload16(buf);
  }
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<V>(__builtin_convertvector(h, u32x16) << 16);
}
template <>
inline void store_lanes<BFloat16>(BFloat16* p, V v, int k) {
  if (k != VN) {
    float buf[VN];
    vstore16(buf, v);
    for (int l = 0; l < k; ++l) store(p + l, buf[l]);
    return;
  }
  const u32x16 u = reinterpret_cast<u32x16>(v);
  const u32x16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const u32x16 quiet = (u >> 16) | 0x40u;
  const u32x16 is_nan = reinterpret_cast<u32x16>((u & 0x7fffffffu) > 0x7f800000u);
  const u16x16 h = __builtin_convertvector((quiet & is_nan) | (rounded & ~is_nan), u16x16);
  std::memcpy(p, &h, sizeof(h));
}

template <class T>
void fwd(const T* u, int64_t rs_u, T* out, int64_t rs_o, int64_t n, int64_t p, int threads) {
  const int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for num_threads(threads) schedule(static) if (tasks > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    for (int64_t i = task * kRowsPerTask, end = std::min(n, i + kRowsPerTask); i < end; ++i) {
      const T* val = u + i * rs_u;
      const T* gate = val + p;
      T* o = out + i * rs_o;
      for (int64_t j = 0; j < p; j += VN) {
        const int k = static_cast<int>(std::min<int64_t>(VN, p - j));
        const V g = load_lanes(gate + j, k), v = load_lanes(val + j, k);
        store_lanes(o + j, v * (g * vphi(g)), k);  // torch's order: gelu(gate), then times value
      }
    }
  }
}

template <class T>
void bwd(const T* grad, int64_t rs_g, const T* u, int64_t rs_u, T* grad_u, int64_t rs_gu, int64_t n, int64_t p,
         int threads) {
  const int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for num_threads(threads) schedule(static) if (tasks > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    for (int64_t i = task * kRowsPerTask, end = std::min(n, i + kRowsPerTask); i < end; ++i) {
      const T* val = u + i * rs_u;
      const T* gate = val + p;
      const T* gr = grad + i * rs_g;
      T* gv = grad_u + i * rs_gu;
      T* gg = gv + p;
      for (int64_t j = 0; j < p; j += VN) {
        const int k = static_cast<int>(std::min<int64_t>(VN, p - j));
        const V g = load_lanes(gate + j, k), v = load_lanes(val + j, k), dy = load_lanes(gr + j, k);
        const V cdf = vphi(g);
        store_lanes(gv + j, dy * (g * cdf), k);
        store_lanes(gg + j, (dy * v) * vdgelu(g, cdf), k);  // autograd's order: (grad * value) * gelu'
      }
    }
  }
}

// float64: scalar, with the C library's erfc and exp.
template <>
void fwd<double>(const double* u, int64_t rs_u, double* out, int64_t rs_o, int64_t n, int64_t p, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n > kRowsPerTask)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < p; ++j) {
      const double g = u[i * rs_u + p + j];
      out[i * rs_o + j] = u[i * rs_u + j] * (g * phi_cdf(g));
    }
}

template <>
void bwd<double>(const double* grad, int64_t rs_g, const double* u, int64_t rs_u, double* grad_u, int64_t rs_gu,
                 int64_t n, int64_t p, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n > kRowsPerTask)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < p; ++j) {
      const double g = u[i * rs_u + p + j], v = u[i * rs_u + j], dy = grad[i * rs_g + j];
      grad_u[i * rs_gu + j] = dy * (g * phi_cdf(g));
      grad_u[i * rs_gu + p + j] = (dy * v) * dgelu(g);
    }
}

void check_rows(const KernelArgs& a, const TensorView& t, int64_t n, int64_t cols) {
  if (t.ndim != 2 || t.size(0) != n || t.size(1) != cols || (cols > 1 && t.st(1) != 1))
    throw std::invalid_argument(a.name + ": expected a (" + std::to_string(n) + ", " + std::to_string(cols) +
                                ") tensor with unit column stride");
}

void geglu_fwd_cpu(const KernelArgs& a) {
  const TensorView &u = a.t(0), &out = a.t(1);
  const int64_t n = u.size(0), p = u.size(1) / 2;
  check_rows(a, u, n, 2 * p);
  check_rows(a, out, n, p);
  dispatch_float(u.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    fwd<T>(u.ptr<const T>(), u.st(0), out.ptr<T>(), out.st(0), n, p, a.num_threads);
  });
}

void geglu_bwd_cpu(const KernelArgs& a) {
  const TensorView &grad = a.t(0), &u = a.t(1), &grad_u = a.t(2);
  const int64_t n = u.size(0), p = u.size(1) / 2;
  check_rows(a, u, n, 2 * p);
  check_rows(a, grad, n, p);
  check_rows(a, grad_u, n, 2 * p);
  dispatch_float(u.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    bwd<T>(grad.ptr<const T>(), grad.st(0), u.ptr<const T>(), u.st(0), grad_u.ptr<T>(), grad_u.st(0), n, p,
           a.num_threads);
  });
}

}  // namespace

LEANVAE_REGISTER_KERNEL("geglu_fwd", geglu_fwd_cpu);
LEANVAE_REGISTER_KERNEL("geglu_bwd", geglu_bwd_cpu);

}  // namespace cpu
}  // namespace leanvae
