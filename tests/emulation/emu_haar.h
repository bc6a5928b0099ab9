// Emulated launches of the CUDA Haar kernels (csrc/cuda/haar.cu's launchers: same geometry, grid, block and
// dtype pairs), running the bodies of csrc/cuda/haar_body.cuh.
#pragma once
#include "cuda/haar_body.cuh"
#include "emu_common.h"

namespace lvemu {
namespace haar {

namespace hk = ::leanvae::cuda::haar_kernels;
using leanvae::KernelArgs;
using leanvae::TensorView;

// Input and output of one dtype, or float32 beside float16/bfloat16 (as haar.cu's dispatch_io).
template <class F>
void dispatch_io(int in, int out, const std::string& name, F&& f) {
  if (in == out) {
    dispatch_gpu_float(in, name, [&](auto tag) { f(tag, tag); });
  } else if (out == leanvae::kFloat32 && (in == leanvae::kFloat16 || in == leanvae::kBFloat16)) {
    dispatch_gpu_float(in, name, [&](auto tag) { f(tag, float{}); });
  } else if (in == leanvae::kFloat32 && (out == leanvae::kFloat16 || out == leanvae::kBFloat16)) {
    dispatch_gpu_float(out, name, [&](auto tag) { f(float{}, tag); });
  } else {
    throw std::invalid_argument(name + ": input dtype " + leanvae::dtype_name(in) + " with output dtype " +
                                leanvae::dtype_name(out) + " is not supported (same dtype, or float32 with float16/bfloat16)");
  }
}

inline void analysis(const KernelArgs& a) {
  const TensorView &x = a.t(0), &xi = a.t(1), &xv = a.t(2);
  const bool has_xi = a.i(0) != 0, has_xv = a.i(1) != 0;
  hk::Geo g = hk::geometry(x, xi, xv, has_xi, has_xv);
  if (x.numel() == 0 || g.parts == 0) return;
  dim3 grid;
  hk::launch_dims(g, x.shape[0] * x.shape[1], a.name, grid);
  const hk::BandMap bm = hk::band_map(a);
  dispatch_io(x.dtype, (has_xv ? xv : xi).dtype, a.name, [&](auto ti, auto to) {
    using TI = decltype(ti);
    using TO = decltype(to);
    const float s2 = static_cast<float>(a.f(0)), s3 = static_cast<float>(a.f(1));
    std::function<void()> body = [&] { hk::analysis_body<TI, TO>(x.ptr<const TI>(), xi.ptr<TO>(), xv.ptr<TO>(), g, bm, s2, s3); };
    launch("_haar_analysis_kernel", grid, dim3(hk::kTX, hk::kTY), 0, body);
  });
}

inline void synthesis(const KernelArgs& a) {
  const TensorView &xi = a.t(0), &xv = a.t(1), &y = a.t(2);
  const bool has_xi = a.i(0) != 0, has_xv = a.i(1) != 0;
  hk::Geo g = hk::geometry(y, xi, xv, has_xi, has_xv);
  if (y.numel() == 0 || g.parts == 0) return;
  dim3 grid;
  hk::launch_dims(g, y.shape[0] * y.shape[1], a.name, grid);
  const hk::BandMap bm = hk::band_map(a);
  dispatch_io((has_xv ? xv : xi).dtype, y.dtype, a.name, [&](auto ti, auto to) {
    using TI = decltype(ti);
    using TO = decltype(to);
    const float s2 = static_cast<float>(a.f(0)), s3 = static_cast<float>(a.f(1));
    std::function<void()> body = [&] {
      hk::synthesis_body<TI, TO>(xi.ptr<const TI>(), xv.ptr<const TI>(), y.ptr<TO>(), g, bm, s2, s3);
    };
    launch("_haar_synthesis_kernel", grid, dim3(hk::kTX, hk::kTY), 0, body);
  });
}

}  // namespace haar
}  // namespace lvemu
