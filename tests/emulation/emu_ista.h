// Emulated launches of the CUDA ISTA step kernels: csrc/cuda/ista_step.cu's launchers with the same launch
// plan (csrc/cuda/ista_step_plan.h: block size, dynamic shared memory, row grouping, vector decision), on
// an emulated device of `sms` streaming multiprocessors with one resident block each (so that the
// grid-stride loops take several turns), running the bodies of csrc/cuda/ista_step_body.cuh.
#pragma once
#include "cuda/ista_step_plan.h"
#include "emu_common.h"

namespace lvemu {
namespace ista {

namespace is = ::leanvae::cuda::ista;
using leanvae::KernelArgs;
using leanvae::TensorView;

inline int& sms() {
  static int n = 3;
  return n;
}

template <class Body>
void launch_plan(const KernelArgs& a, const is::Launch& l, int64_t work_items, const is::StepParams& p, Body body_fn) {
  const size_t max_optin = 227 * 1024;  // an H100/H200's opt-in limit
  if (l.threads > is::kMaxThreads || l.smem > max_optin)
    throw std::invalid_argument(a.name + ": D = " + std::to_string(p.D) + ", d = " + std::to_string(p.d) +
                                " needs more than a block has");
  const int64_t resident = sms();
  const int grid = static_cast<int>(work_items < resident ? work_items : resident);
  std::function<void()> body = [&] { body_fn(dynamic_shared<float>("smem")); };
  launch(a.name.c_str(), dim3(grid), dim3(l.threads), l.smem, body);
}

inline void fwd(const KernelArgs& a) {
  const TensorView &src = a.t(0), &y = a.t(1), &phi = a.t(2), &w = a.t(3), &out = a.t(4);
  const int mode = static_cast<int>(a.i(0));
  const TensorView* u = mode == is::kResidual ? &a.t(5) : nullptr;
  is::StepParams p = is::common_params(a, mode, src, y, phi, w, out, u);
  if (p.n == 0) return;
  p.out = out.data;
  dispatch_gpu_float(out.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    p.vec = is::fwd_vec(p, mode, src, u, out, sizeof(T));
    is::with_mode(mode, a.name, [&](auto m) {
      constexpr int M = decltype(m)::value;
      p.DP = is::fwd_dp(p.d);
      if (is::fwd_rows(p.d) == 8)
        launch_plan(a, is::plan(p, mode, 8), (p.n + 7) / 8, p, [&](SPtr<float> s) { is::fwd_body<T, M, 8>(p, s); });
      else
        launch_plan(a, is::plan(p, mode, 4), (p.n + 3) / 4, p, [&](SPtr<float> s) { is::fwd_body<T, M, 4>(p, s); });
    });
  });
}

inline void bwd(const KernelArgs& a) {
  const TensorView &grad = a.t(0), &src = a.t(1), &y = a.t(2), &phi = a.t(3), &w = a.t(4);
  const TensorView &grad_x = a.t(5), &grad_y = a.t(6), &part_phi = a.t(7), &part_w = a.t(8);
  const int mode = static_cast<int>(a.i(0));
  const TensorView* u = mode == is::kResidual ? &a.t(9) : nullptr;
  is::StepParams p = is::common_params(a, mode, src, y, phi, w, grad, u);
  p.rows_per_partial = a.i(1);
  if (p.rows_per_partial <= 0 || p.rows_per_partial % is::kBwdRows != 0)
    throw std::invalid_argument(a.name + ": rows_per_partial must be a positive multiple of 4");
  if (p.n == 0) {
    std::memset(part_phi.data, 0, part_phi.numel() * sizeof(float));
    std::memset(part_w.data, 0, part_w.numel() * sizeof(float));
    return;
  }
  p.grad = grad.data;
  p.grad_rs = grad.st(0);
  p.out = grad_x.data;
  p.grad_y = grad_y.ptr<float>();
  p.part_phi = part_phi.ptr<float>();
  p.part_w = part_w.ptr<float>();
  p.DP = is::bwd_dp(p.d);
  const int64_t blocks = (p.n + p.rows_per_partial - 1) / p.rows_per_partial;
  dispatch_gpu_float(grad.dtype, a.name, [&](auto tag) {
    using T = decltype(tag);
    p.vec = is::bwd_vec(p, mode, grad, src, u, grad_x, sizeof(T));
    is::with_mode(mode, a.name, [&](auto m) {
      constexpr int M = decltype(m)::value;
      const is::Launch l = is::plan(p, mode, 2 * is::kBwdRows);
      const int dmax = is::bwd_dmax(p.d);
      if (dmax == 4) launch_plan(a, l, blocks, p, [&](SPtr<float> s) { is::bwd_body<T, M, 4>(p, s); });
      else if (dmax == 16) launch_plan(a, l, blocks, p, [&](SPtr<float> s) { is::bwd_body<T, M, 16>(p, s); });
      else launch_plan(a, l, blocks, p, [&](SPtr<float> s) { is::bwd_body<T, M, 64>(p, s); });
    });
  });
}

}  // namespace ista
}  // namespace lvemu
