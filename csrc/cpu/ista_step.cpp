// ISTA-Net+ gradient step on the CPU, forward and backward, per token row:
//
//   x   = r                      (mode 0, "step")
//       | round(r + u)           (mode 1, "residual": the previous iteration's residual add, fused)
//       | round(y @ Q^T)         (mode 2, "init": the first iteration's x0 = y @ Q^T, never stored)
//   e   = x @ phi^T - y          (d values)
//   out = x - w * e @ phi
//
// `round` rounds to the storage dtype, as the unfused model stores x before the step reads it.
// Backward (g = grad of out):
//   h = g @ phi^T;  grad_x = g - w * h @ phi;  grad_y = w * h  (mode 2 adds the Q terms in Python,
//   so grad_y is written in the accumulation dtype)
//   grad_phi = -w * sum_rows(e^T g + h^T x),  grad_w = -sum_rows(e . h)
// The two row sums are written as partials, one per fixed block of `rows_per_partial` rows, each summed
// in row order; the caller reduces them. Neither depends on the thread count.
//
// Tensors (element strides; rows of r, u, y, grad may have any row stride, elements are unit-stride):
//   fwd: [src, y, phi, w, out, (u)]                                    ints: [mode]
//   bwd: [grad, src, y, phi, w, grad_x, grad_y, part_phi, part_w, (u)]  ints: [mode, rows_per_partial]
//   src is r (N, D) in modes 0 and 1, Q (D, d) contiguous in mode 2; phi (d, D) contiguous; out,
//   grad_x (N, D), grad_y (N, d) contiguous; grad_y, part_phi (blocks, d, D) and part_w (blocks,) in
//   the accumulation dtype (float, double for float64).
//
// Inner loops use 32-byte vectors (GCC/Clang vector extensions: AVX on x86, pairs of NEON registers on
// ARM) over rows zero-padded to a multiple of 16, in register tiles of kGroup rows; every sum has a
// fixed order, so results do not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "cpu_simd.h"

namespace leanvae {
namespace cpu {
namespace {

enum Mode : int { kStep = 0, kResidual = 1, kInit = 2 };

constexpr int kGroup = 4;   // rows per register tile
constexpr int64_t kPad = 16;  // rows are padded to a multiple of this many columns

template <class T>
inline acc_t<T> round_to(acc_t<T> v) {
  const T s = from_float<T>(static_cast<float>(v));
  return load(&s);
}
template <> inline double round_to<double>(double v) { return v; }
template <> inline float round_to<float>(float v) { return v; }

// Everything the rows need, shared read-only by all threads. phi and Q^T are converted to the
// accumulation dtype and zero-padded: (dp, Dp) with dp = d rounded up to even, Dp = D rounded up to kPad.
template <class T>
struct Problem {
  using A = acc_t<T>;
  int mode = kStep;
  int64_t n = 0, D = 0, d = 0, Dp = 0, dp = 0;
  const T* src = nullptr;  // r (modes 0, 1)
  const T* u = nullptr;    // mode 1
  const T* y = nullptr;
  int64_t src_rs = 0, u_rs = 0, y_rs = 0;
  std::vector<A> phi, qt;
  A w = 0;

  // x of row i into buf (Dp values, zero-padded), rounded to T as the model stores it.
  void load_x(int64_t i, A* buf) const {
    std::fill(buf + D, buf + Dp, A(0));
    if (mode == kInit) {
      const T* yr = y + i * y_rs;
      std::fill(buf, buf + D, A(0));
      for (int64_t k = 0; k < d; ++k) {
        const A yk = load(yr + k), *q = qt.data() + k * Dp;
        for (int64_t j = 0; j < D; ++j) buf[j] += yk * q[j];
      }
      for (int64_t j = 0; j < D; ++j) buf[j] = round_to<T>(buf[j]);
    } else if (mode == kResidual) {
      const T *a = src + i * src_rs, *b = u + i * u_rs;
      for (int64_t j = 0; j < D; ++j) buf[j] = round_to<T>(load(a + j) + load(b + j));
    } else if (std::is_same<T, A>::value) {
      std::memcpy(buf, src + i * src_rs, D * sizeof(A));
    } else {
      const T* a = src + i * src_rs;
      for (int64_t j = 0; j < D; ++j) buf[j] = load(a + j);
    }
  }
};

template <class T>
Problem<T> make_problem(const KernelArgs& a, int mode, const TensorView& src, const TensorView& y,
                        const TensorView& phi, const TensorView& w, const TensorView& rows_like, const TensorView* u) {
  Problem<T> p;
  p.mode = mode;
  p.n = rows_like.size(0);
  p.D = rows_like.size(1);
  p.d = phi.size(0);
  p.Dp = (p.D + kPad - 1) / kPad * kPad;
  p.dp = (p.d + 1) / 2 * 2;
  p.y = y.ptr<const T>();
  p.y_rs = y.st(0);
  p.w = static_cast<acc_t<T>>(read_scalar(w));
  p.phi.assign(p.dp * p.Dp, 0);
  const T* ph = phi.ptr<const T>();
  for (int64_t k = 0; k < p.d; ++k)
    for (int64_t j = 0; j < p.D; ++j) p.phi[k * p.Dp + j] = load(ph + k * p.D + j);
  if (mode == kInit) {
    p.qt.assign(p.dp * p.Dp, 0);
    const T* q = src.ptr<const T>();  // (D, d) contiguous
    for (int64_t j = 0; j < p.D; ++j)
      for (int64_t k = 0; k < p.d; ++k) p.qt[k * p.Dp + j] = load(q + j * p.d + k);
  } else {
    p.src = src.ptr<const T>();
    p.src_rs = src.st(0);
  }
  if (mode == kResidual) {
    if (u == nullptr) throw std::invalid_argument(a.name + ": residual mode needs u");
    p.u = u->ptr<const T>();
    p.u_rs = u->st(0);
  }
  return p;
}

// out[r * dp + k] = rows[r] . phi[k] for the kGroup rows (each Dp long) and every k < dp, two phi rows at
// a time. Each dot sums Vec<A>::n lane partials in column order, then the lanes pairwise.
template <class A>
inline void group_dots(const A* rows, const A* phi, int64_t dp, int64_t Dp, A* out) {
  constexpr int VN = Vec<A>::n;
  for (int64_t k = 0; k < dp; k += 2) {
    vec_t<A> acc[kGroup][2] = {};
    const A *p0 = phi + k * Dp, *p1 = p0 + Dp;
    for (int64_t j = 0; j < Dp; j += VN) {
      const vec_t<A> a = vload(p0 + j), b = vload(p1 + j);
      for (int r = 0; r < kGroup; ++r) {
        const vec_t<A> x = vload(rows + r * Dp + j);
        acc[r][0] += x * a;
        acc[r][1] += x * b;
      }
    }
    for (int r = 0; r < kGroup; ++r) {
      out[r * dp + k] = vsum<A>(acc[r][0]);
      out[r * dp + k + 1] = vsum<A>(acc[r][1]);
    }
  }
}

// out[r][j] = base[r][j] - w * sum_k coef[r][k] * phi[k][j] (sum in k order), for the first `valid`
// rows and the first D columns; out has row stride D.
template <class T>
inline void group_update(const acc_t<T>* base, const acc_t<T>* coef, const acc_t<T>* phi, int64_t dp, int64_t D,
                         int64_t Dp, acc_t<T> w, T* out, int valid) {
  using A = acc_t<T>;
  constexpr int VN = Vec<A>::n;
  for (int64_t j = 0; j < Dp; j += 2 * VN) {
    vec_t<A> v[kGroup][2] = {};
    for (int64_t k = 0; k < dp; ++k) {
      const vec_t<A> a = vload(phi + k * Dp + j), b = vload(phi + k * Dp + j + VN);
      for (int r = 0; r < kGroup; ++r) {
        const vec_t<A> c = vsplat(coef[r * dp + k]);
        v[r][0] += c * a;
        v[r][1] += c * b;
      }
    }
    const int64_t nc = std::min<int64_t>(2 * VN, D - j);
    const vec_t<A> wv = vsplat(w);
    for (int r = 0; r < valid; ++r) {
      const A* bs = base + r * Dp + j;
      const vec_t<A> o0 = vload(bs) - wv * v[r][0], o1 = vload(bs + VN) - wv * v[r][1];
      if (std::is_same<T, A>::value && nc == 2 * VN) {  // stored as computed: straight vector stores
        vstore(reinterpret_cast<A*>(out + r * D + j), o0);
        vstore(reinterpret_cast<A*>(out + r * D + j + VN), o1);
      } else {
        A os[2 * VN];
        vstore(os, o0);
        vstore(os + VN, o1);
        for (int64_t c = 0; c < nc; ++c) store(out + r * D + j + c, os[c]);
      }
    }
  }
}

// The padded measurement k = d (odd d) is x . 0: NaN when x holds an inf. Set it to 0 (never multiply
// by 0) so that it cannot reach the update or the sums, which the reference never computes.
template <class A>
inline void zero_padding(A* coef, int64_t d, int64_t dp) {
  for (int r = 0; r < kGroup; ++r)
    for (int64_t k = d; k < dp; ++k) coef[r * dp + k] = A(0);
}

// Loads rows [i0, i0 + kGroup) into X (zero rows past `valid`) and sets E[r][k] = x_r . phi_k - y_rk.
template <class T>
inline void group_inputs(const Problem<T>& p, int64_t i0, int valid, acc_t<T>* X, acc_t<T>* E) {
  using A = acc_t<T>;
  for (int r = 0; r < kGroup; ++r) {
    if (r < valid) p.load_x(i0 + r, X + r * p.Dp);
    else std::fill(X + r * p.Dp, X + (r + 1) * p.Dp, A(0));
  }
  group_dots(X, p.phi.data(), p.dp, p.Dp, E);
  for (int r = 0; r < valid; ++r)
    for (int64_t k = 0; k < p.d; ++k) E[r * p.dp + k] -= load(p.y + (i0 + r) * p.y_rs + k);
  zero_padding(E, p.d, p.dp);
}

constexpr int64_t kRowsPerTask = 64;  // forward: rows per OpenMP work item (a multiple of kGroup)
// Below this many multiply-adds a call runs on one thread: waking a thread team costs more than the work
// (and much more on an oversubscribed machine, where every barrier waits for a time slice).
constexpr int64_t kMinParallelWork = 1 << 18;

template <class T>
void fwd(const Problem<T>& p, T* out, int threads) {
  using A = acc_t<T>;
  const int64_t tasks = (p.n + kRowsPerTask - 1) / kRowsPerTask;
  const bool parallel = tasks > 1 && p.n * p.D * p.dp >= kMinParallelWork;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<A> X(kGroup * p.Dp), E(kGroup * p.dp);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t hi = std::min(p.n, (t + 1) * kRowsPerTask);
      for (int64_t i0 = t * kRowsPerTask; i0 < hi; i0 += kGroup) {
        const int valid = static_cast<int>(std::min<int64_t>(kGroup, hi - i0));
        group_inputs(p, i0, valid, X.data(), E.data());
        group_update<T>(X.data(), E.data(), p.phi.data(), p.dp, p.D, p.Dp, p.w, out + i0 * p.D, valid);
      }
    }
  }
}

// A row's share of grad_w in the reference's order, sum_j g_j * (e @ phi)_j, for a row whose e . h is not
// finite (an inf or NaN in its data): one infinite e_k gives +/-Inf in e . h but NaN in g . (e @ phi) when
// g has both signs, and autograd computes the latter. Finite rows keep the cheaper e . h (equal in exact
// arithmetic).
template <class A>
A reference_order_row(const A* e, const A* g, const A* phi, int64_t d, int64_t D, int64_t Dp) {
  A s = 0;
  for (int64_t j = 0; j < D; ++j) {
    A m = 0;
    for (int64_t k = 0; k < d; ++k) m += e[k] * phi[k * Dp + j];
    s += g[j] * m;
  }
  return s;
}

template <class T>
void bwd(const Problem<T>& p, const T* grad, int64_t grad_rs, T* grad_x, acc_t<T>* grad_y, acc_t<T>* part_phi,
         acc_t<T>* part_w, int64_t rows_per_partial, int threads) {
  using A = acc_t<T>;
  constexpr int VN = Vec<A>::n;
  const int64_t D = p.D, Dp = p.Dp, d = p.d, dp = p.dp;
  const int64_t blocks = (p.n + rows_per_partial - 1) / rows_per_partial;
  const bool parallel = blocks > 1 && p.n * D * dp >= kMinParallelWork;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<A> X(kGroup * Dp), G(kGroup * Dp), E(kGroup * dp), H(kGroup * dp), P(dp * Dp);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      std::fill(P.begin(), P.end(), A(0));
      A wsum = 0;
      const int64_t hi = std::min(p.n, (b + 1) * rows_per_partial);
      for (int64_t i0 = b * rows_per_partial; i0 < hi; i0 += kGroup) {
        const int valid = static_cast<int>(std::min<int64_t>(kGroup, hi - i0));
        group_inputs(p, i0, valid, X.data(), E.data());
        for (int r = 0; r < kGroup; ++r) {
          A* gr = G.data() + r * Dp;
          std::fill(gr, gr + Dp, A(0));
          if (r < valid) {
            const T* src = grad + (i0 + r) * grad_rs;
            for (int64_t j = 0; j < D; ++j) gr[j] = load(src + j);
          }
        }
        group_dots(G.data(), p.phi.data(), dp, Dp, H.data());
        zero_padding(H.data(), d, dp);
        for (int r = valid; r < kGroup; ++r)
          for (int64_t k = 0; k < dp; ++k) E[r * dp + k] = H[r * dp + k] = 0;
        group_update<T>(G.data(), H.data(), p.phi.data(), dp, D, Dp, p.w, grad_x + i0 * D, valid);
        for (int r = 0; r < valid; ++r) {
          bool finite = true;
          for (int64_t k = 0; k < d; ++k) {
            grad_y[(i0 + r) * d + k] = p.w * H[r * dp + k];
            finite = finite && std::isfinite(E[r * dp + k] * H[r * dp + k]);
          }
          if (finite) {
            for (int64_t k = 0; k < d; ++k) wsum += E[r * dp + k] * H[r * dp + k];
          } else {
            wsum += reference_order_row(E.data() + r * dp, G.data() + r * Dp, p.phi.data(), d, D, Dp);
          }
        }
        // P[k][j] += e_rk g_rj + h_rk x_rj over the group's rows in order.
        for (int64_t k = 0; k < d; ++k) {
          vec_t<A> ev[kGroup], hv[kGroup];
          for (int r = 0; r < kGroup; ++r) {
            ev[r] = vsplat(E[r * dp + k]);
            hv[r] = vsplat(H[r * dp + k]);
          }
          A* pk = P.data() + k * Dp;
          for (int64_t j = 0; j < Dp; j += VN) {
            vec_t<A> acc = vload(pk + j);
            for (int r = 0; r < kGroup; ++r) {
              acc += ev[r] * vload(G.data() + r * Dp + j);
              acc += hv[r] * vload(X.data() + r * Dp + j);
            }
            vstore(pk + j, acc);
          }
        }
      }
      A* out = part_phi + b * d * D;
      for (int64_t k = 0; k < d; ++k) std::memcpy(out + k * D, P.data() + k * Dp, D * sizeof(A));
      part_w[b] = wsum;
    }
  }
}

void ista_step_fwd_cpu(const KernelArgs& a) {
  const TensorView &src = a.t(0), &y = a.t(1), &phi = a.t(2), &w = a.t(3), &out = a.t(4);
  const int mode = static_cast<int>(a.i(0));
  const TensorView* u = mode == kResidual ? &a.t(5) : nullptr;
  dispatch_float(out.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    const Problem<T> p = make_problem<T>(a, mode, src, y, phi, w, out, u);
    fwd<T>(p, out.ptr<T>(), a.num_threads);
  });
}

void ista_step_bwd_cpu(const KernelArgs& a) {
  const TensorView &grad = a.t(0), &src = a.t(1), &y = a.t(2), &phi = a.t(3), &w = a.t(4);
  const TensorView &grad_x = a.t(5), &grad_y = a.t(6), &part_phi = a.t(7), &part_w = a.t(8);
  const int mode = static_cast<int>(a.i(0));
  const int64_t rows_per_partial = a.i(1);
  if (rows_per_partial <= 0) throw std::invalid_argument(a.name + ": rows_per_partial must be positive");
  const TensorView* u = mode == kResidual ? &a.t(9) : nullptr;
  dispatch_float(grad.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    const Problem<T> p = make_problem<T>(a, mode, src, y, phi, w, grad, u);
    bwd<T>(p, grad.ptr<const T>(), grad.st(0), grad_x.ptr<T>(), grad_y.ptr<acc_t<T>>(), part_phi.ptr<acc_t<T>>(),
           part_w.ptr<acc_t<T>>(), rows_per_partial, a.num_threads);
  });
}

}  // namespace

LEANVAE_REGISTER_KERNEL("ista_step_fwd", ista_step_fwd_cpu);
LEANVAE_REGISTER_KERNEL("ista_step_bwd", ista_step_bwd_cpu);

}  // namespace cpu
}  // namespace leanvae
