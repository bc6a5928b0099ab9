// Host-side launch plan of the CUDA ISTA step kernels (csrc/cuda/ista_step.cu): block size, shared memory,
// row grouping and the vector-access decision, shared by the launchers and by the test suite's emulation
// (which runs the kernel bodies with exactly these launch parameters).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/kernel_args.h"
#include "ista_step_body.cuh"

namespace leanvae {
namespace cuda {
namespace ista {

inline bool aligned4(const void* ptr, int64_t row_stride, size_t elem) {
  return reinterpret_cast<uintptr_t>(ptr) % (kCols * elem) == 0 && row_stride % kCols == 0;
}

struct Launch {
  int threads = 0;
  size_t smem = 0;
};

inline Launch plan(const StepParams& p, int mode, int red_rows) {
  Launch l;
  l.threads = (p.D + kCols - 1) / kCols;
  l.threads = (l.threads + 31) / 32 * 32;
  const int warps = l.threads / 32;
  const size_t tables = static_cast<size_t>(p.DP) * p.D4 * (mode == kInit ? 2 : 1);
  // red_s: warps * (DP / KC) * 32 = warps * DP * red_rows; e_s, h_s: 4 * DP each (<= red_rows * DP); wred_s.
  l.smem = (tables + static_cast<size_t>(warps) * p.DP * red_rows + 2 * static_cast<size_t>(red_rows) * p.DP + warps) *
           sizeof(float);
  return l;
}

// Forward: groups of 8 rows for small d (8 x 4 sums per reduction), else 4 rows x 8 phi rows; DP: phi rows
// padded to the reduction's granularity.
inline int fwd_rows(int d) { return d <= 4 ? 8 : 4; }
inline int fwd_dp(int d) { return d <= 4 ? 4 : (d + 7) / 8 * 8; }
// Backward: 8 virtual rows x 4 phi rows per reduction; DMAX: the grad_phi register specialisation.
inline int bwd_dp(int d) { return (d + 3) / 4 * 4; }
inline int bwd_dmax(int d) { return d <= 4 ? 4 : (d <= 16 ? 16 : 64); }

// Whether every row base of the tensors a kernel reads and writes is aligned for 4-element accesses.
inline bool fwd_vec(const StepParams& p, int mode, const TensorView& src, const TensorView* u, const TensorView& out,
                    size_t elem) {
  return aligned4(out.data, out.st(0), elem) && (mode == kInit || aligned4(src.data, p.src_rs, elem)) &&
         (u == nullptr || aligned4(u->data, p.u_rs, elem));
}
inline bool bwd_vec(const StepParams& p, int mode, const TensorView& grad, const TensorView& src, const TensorView* u,
                    const TensorView& grad_x, size_t elem) {
  return aligned4(grad_x.data, grad_x.st(0), elem) && aligned4(grad.data, p.grad_rs, elem) &&
         (mode == kInit || aligned4(src.data, p.src_rs, elem)) && (u == nullptr || aligned4(u->data, p.u_rs, elem));
}

template <class F>
inline void with_mode(int mode, const std::string& name, F&& f) {
  switch (mode) {
    case kStep: f(std::integral_constant<int, kStep>{}); break;
    case kResidual: f(std::integral_constant<int, kResidual>{}); break;
    case kInit: f(std::integral_constant<int, kInit>{}); break;
    default: throw std::invalid_argument(name + ": unknown mode " + std::to_string(mode));
  }
}

inline StepParams common_params(const KernelArgs& a, int mode, const TensorView& src, const TensorView& y,
                                const TensorView& phi, const TensorView& w, const TensorView& rows_like,
                                const TensorView* u) {
  StepParams p{};
  p.src = src.data;
  p.src_rs = mode == kInit ? 0 : src.st(0);
  p.u = u ? u->data : nullptr;
  p.u_rs = u ? u->st(0) : 0;
  p.y = y.data;
  p.y_rs = y.st(0);
  p.phi = phi.data;
  p.n = rows_like.size(0);
  p.D = static_cast<int>(rows_like.size(1));
  p.d = static_cast<int>(phi.size(0));
  p.D4 = ((p.D + kCols - 1) / kCols + 31) / 32 * 32 * kCols;
  p.w = DeviceScalar{w.data, w.dtype};
  if (rows_like.size(1) > 4096 || p.d > 64) throw std::invalid_argument(a.name + ": the cuda kernels support D <= 4096 and d <= 64");
  if (mode == kResidual && u == nullptr) throw std::invalid_argument(a.name + ": residual mode needs u");
  return p;
}

}  // namespace ista
}  // namespace cuda
}  // namespace leanvae
