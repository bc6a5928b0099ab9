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

// Threads and shared memory of a launch over DP padded phi rows with `red_rows` reduction rows
// (ista_step_shape.h has the sizes, shared with the Python side's backend check).
inline Launch plan(const StepParams& p, int mode, int red_rows) {
  Launch l;
  l.threads = block_threads(p.D);
  l.smem = smem_bytes(mode, p.D, p.DP, red_rows);
  return l;
}

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
  p.D4 = table_cols(p.D);
  p.w = DeviceScalar{w.data, w.dtype};
  if (rows_like.size(1) > 4096 || p.d > 64) throw std::invalid_argument(a.name + ": the cuda kernels support D <= 4096 and d <= 64");
  if (mode == kResidual && u == nullptr) throw std::invalid_argument(a.name + ": residual mode needs u");
  return p;
}

}  // namespace ista
}  // namespace cuda
}  // namespace leanvae
