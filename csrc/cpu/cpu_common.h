// Shared helpers for the CPU kernels: 16-bit float storage types, float32 load/store, dtype dispatch.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../common/kernel_args.h"

namespace leanvae {
namespace cpu {
inline namespace LEANVAE_CPU_PATH_NS {  // one copy per SIMD path: see common/cpu_path.h

// Storage-only 16-bit types: all arithmetic happens in float (or double for float64 inputs).
struct BFloat16 { uint16_t bits; };
struct Half { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }
inline float to_float(BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }
inline float to_float(Half v) {
  // IEEE binary16 -> binary32, exact (normals, subnormals, inf, nan).
  const uint32_t h = v.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // subnormal or zero: man * 2^-24, exact in float
  float f = static_cast<float>(man) * 5.9604644775390625e-8f;
  return sign ? -f : f;
}

template <class T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline double from_float<double>(float v) { return v; }
template <> inline BFloat16 from_float<BFloat16>(float v) {
  // Round to nearest even, as torch does; NaN stays a quiet NaN.
  uint32_t u = float_to_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}
template <> inline Half from_float<Half>(float v) {
  // binary32 -> binary16, round to nearest even, overflow to inf, subnormals handled.
  uint32_t u = float_to_bits(v);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};  // nan
  if (u >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (u < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // Adding 0.5 (2^-1) aligns the half-subnormal grid with float's last mantissa bits; the float
    // addition rounds to nearest even for us.
    float f = bits_to_float(u) + 0.5f;
    return Half{static_cast<uint16_t>(sign | (float_to_bits(f) - 0x3f000000u))};
  }
  const uint32_t mant_odd = (u >> 13) & 1u;
  u += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return Half{static_cast<uint16_t>(sign | (u >> 13))};
}

// Accumulation type: double for float64 inputs, float otherwise.
template <class T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <class T> using acc_t = typename Acc<T>::type;

template <class T> inline acc_t<T> load(const T* p) { return static_cast<acc_t<T>>(to_float(*p)); }
template <class T> inline void store(T* p, acc_t<T> v) { *p = from_float<T>(static_cast<float>(v)); }
template <> inline void store<double>(double* p, double v) { *p = v; }

// Calls f(T{}) with T the storage type for `dtype`.
template <class F>
inline void dispatch_float(int dtype, const std::string& name, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat64: f(double{}); break;
    case kFloat16: f(Half{}); break;
    case kBFloat16: f(BFloat16{}); break;
    default: throw std::invalid_argument(name + ": unsupported dtype " + dtype_name(dtype));
  }
}

// Reads a one-element tensor of any float dtype as float/double.
inline double read_scalar(const TensorView& t) {
  double v = 0;
  dispatch_float(t.dtype, "read_scalar", [&](auto tag) {
    using T = decltype(tag);
    v = static_cast<double>(to_float(*t.ptr<const T>()));
  });
  return v;
}

}  // namespace LEANVAE_CPU_PATH_NS
}  // namespace cpu
}  // namespace leanvae
