// Soft threshold on the CPU: out = sign(x) * relu(|x| - theta), and its backward.
// x, out, grad, grad_x: contiguous, one dtype; theta: one element of any float dtype.
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "cpu_common.h"
#include "cpu_simd.h"

namespace leanvae {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per OpenMP work item
constexpr int kLanes = 16;           // partial sums per grad_theta block: a fixed order that vectorises

// Branch-free, so the loops vectorise. sign(x) as (x > 0) - (x < 0): 0 for 0 and NaN (the product is
// NaN anyway). torch's relu lets NaN through: `m <= 0 ? 0 : m` keeps NaN, since NaN <= 0 is false.
template <class A>
inline A sign_of(A v) { return static_cast<A>(v > A(0)) - static_cast<A>(v < A(0)); }
template <class A>
inline A relu_nan(A v) { return v <= A(0) ? A(0) : v; }

template <class T>
void fwd(const T* __restrict x, T* __restrict out, int64_t n, acc_t<T> theta, int threads) {
  using A = acc_t<T>;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
    for (int64_t i = lo; i < hi; ++i) {
      const A v = load(x + i);
      store(out + i, sign_of(v) * relu_nan(std::abs(v) - theta));
    }
  }
}

// grad_x = (grad * sign(x)) * sign(x) unless |x| - theta <= 0 (so a NaN |x| - theta, from a NaN theta or
// inf - inf, passes the gradient as torch's relu backward does), else 0 (autograd's order of operations;
// the product is computed unconditionally and then selected, which lets the compiler vectorise);
// partials[b] = sum over block b of grad * sign(x) where |x| - theta > 0 (grad_theta = -sum(partials)),
// summed in kLanes interleaved lanes, then the lanes pairwise.
template <class T>
void bwd(const T* __restrict grad, const T* __restrict x, T* __restrict grad_x, acc_t<T>* partials, int64_t n,
         int64_t block, acc_t<T> theta, int threads) {
  using A = acc_t<T>;
  constexpr int VN = Vec<A>::n, NV = kLanes / VN;
  const int64_t blocks = (n + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * block, hi = std::min(n, lo + block);
    vec_t<A> acc[NV] = {};
    const vec_t<A> zero{}, one = vsplat(A(1)), th = vsplat(theta);
    int64_t i = lo;
    for (; i + kLanes <= hi; i += kLanes) {
      A xs[kLanes], gv[kLanes], out[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        xs[l] = load(x + i + l);
        gv[l] = load(grad + i + l);
      }
      for (int q = 0; q < NV; ++q) {
        const vec_t<A> v = vload(xs + q * VN);
        const vec_t<A> s = vselect0<A>(v > zero, one) - vselect0<A>(v < zero, one);
        const vec_t<A> gs = vselect0<A>(~(vabs<A>(v) - th <= zero), vload(gv + q * VN) * s);
        acc[q] += gs;
        vstore(out + q * VN, gs * s);
      }
      for (int l = 0; l < kLanes; ++l) store(grad_x + i + l, out[l]);
    }
    A lanes[kLanes];
    for (int q = 0; q < NV; ++q) vstore(lanes + q * VN, acc[q]);
    for (int l = 0; i < hi; ++i, ++l) {
      const A v = load(x + i), s = sign_of(v), gsv = load(grad + i) * s;
      const A gs = (std::abs(v) - theta <= A(0)) ? A(0) : gsv;
      store(grad_x + i, gs * s);
      lanes[l] += gs;
    }
    for (int s = kLanes / 2; s > 0; s >>= 1)
      for (int l = 0; l < s; ++l) lanes[l] += lanes[l + s];
    partials[b] = lanes[0];
  }
  if (blocks == 0) partials[0] = 0;
}

void soft_threshold_fwd_cpu(const KernelArgs& a) {
  const TensorView &x = a.t(0), &theta = a.t(1), &out = a.t(2);
  const double th = read_scalar(theta);
  dispatch_float(x.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    fwd<T>(x.ptr<const T>(), out.ptr<T>(), x.numel(), static_cast<acc_t<T>>(th), a.num_threads);
  });
}

void soft_threshold_bwd_cpu(const KernelArgs& a) {
  const TensorView &grad = a.t(0), &x = a.t(1), &theta = a.t(2), &grad_x = a.t(3), &partials = a.t(4);
  const int64_t block = a.i(0);
  const double th = read_scalar(theta);
  dispatch_float(x.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    bwd<T>(grad.ptr<const T>(), x.ptr<const T>(), grad_x.ptr<T>(), partials.ptr<acc_t<T>>(), x.numel(), block,
           static_cast<acc_t<T>>(th), a.num_threads);
  });
}

}  // namespace

LEANVAE_REGISTER_KERNEL("soft_threshold_fwd", soft_threshold_fwd_cpu);
LEANVAE_REGISTER_KERNEL("soft_threshold_bwd", soft_threshold_bwd_cpu);

}  // namespace cpu
}  // namespace leanvae
