// Haar wavelet transforms on CUDA: one analysis and one synthesis kernel serve every op (as on the CPU;
// same arguments, see csrc/cpu/haar.cpp).
//
//   haar_analysis   x (B, C, T, H, W) -> xi (B, 4C, 1, Ho, Wo) (frame 0, 2-D) and/or xv (B, n*C, To, Ho, Wo)
//   haar_synthesis  xi and/or xv -> y (B, C, T, H, W); for odd sizes the reflected sample N of a block is
//                   gathered into sample N-2 (the adjoint of the reflect padding).
//
// The kernel bodies and the launch geometry live in haar_body.cuh (also compiled for the test suite's
// emulation); here the __global__ wrappers and the launchers.
#include <cstdint>

#include "cuda_common.cuh"
#include "haar_body.cuh"

namespace leanvae {
namespace cuda {
namespace {

using namespace haar_kernels;  // Geo, BandMap, kTX, kTY, geometry, band_map, launch_dims

template <class TI, class TO>
__global__ void _haar_analysis_kernel(const TI* __restrict__ x, TO* __restrict__ xi, TO* __restrict__ xv, Geo g,
                                      BandMap bm, float s2, float s3) {
  analysis_body<TI, TO>(x, xi, xv, g, bm, s2, s3);
}

template <class TI, class TO>
__global__ void _haar_synthesis_kernel(const TI* __restrict__ xi, const TI* __restrict__ xv, TO* __restrict__ y, Geo g,
                                       BandMap bm, float s2, float s3) {
  synthesis_body<TI, TO>(xi, xv, y, g, bm, s2, s3);
}

// ----------------------------------------------------------------------------------------- launchers
// Input and output of one dtype, or float32 beside float16/bfloat16 (csrc/cpu/haar.cpp: dispatch_io).
template <class F>
void dispatch_io(int in, int out, const std::string& name, F&& f) {
  if (in == out) {
    dispatch_float(in, name, [&](auto tag) { f(tag, tag); });
  } else if (out == kFloat32 && (in == kFloat16 || in == kBFloat16)) {
    dispatch_float(in, name, [&](auto tag) { f(tag, float{}); });
  } else if (in == kFloat32 && (out == kFloat16 || out == kBFloat16)) {
    dispatch_float(out, name, [&](auto tag) { f(float{}, tag); });
  } else {
    throw std::invalid_argument(name + ": input dtype " + dtype_name(in) + " with output dtype " + dtype_name(out) +
                                " is not supported (same dtype, or float32 with float16/bfloat16)");
  }
}

void haar_analysis_cuda(const KernelArgs& a) {
  const TensorView &x = a.t(0), &xi = a.t(1), &xv = a.t(2);
  const bool has_xi = a.i(0) != 0, has_xv = a.i(1) != 0;
  Geo g = geometry(x, xi, xv, has_xi, has_xv);
  if (x.numel() == 0 || g.parts == 0) return;
  dim3 grid;
  launch_dims(g, x.shape[0] * x.shape[1], a.name, grid);
  const BandMap bm = band_map(a);
  dispatch_io(x.dtype, (has_xv ? xv : xi).dtype, a.name, [&](auto ti, auto to) {
    using TI = decltype(ti);
    using TO = decltype(to);
    _haar_analysis_kernel<TI, TO><<<grid, dim3(kTX, kTY), 0, stream_of(a)>>>(
        x.ptr<const TI>(), xi.ptr<TO>(), xv.ptr<TO>(), g, bm, static_cast<float>(a.f(0)), static_cast<float>(a.f(1)));
    LEANVAE_CUDA_CHECK_LAUNCH(a);
  });
}

void haar_synthesis_cuda(const KernelArgs& a) {
  const TensorView &xi = a.t(0), &xv = a.t(1), &y = a.t(2);
  const bool has_xi = a.i(0) != 0, has_xv = a.i(1) != 0;
  Geo g = geometry(y, xi, xv, has_xi, has_xv);
  if (y.numel() == 0 || g.parts == 0) return;
  dim3 grid;
  launch_dims(g, y.shape[0] * y.shape[1], a.name, grid);
  const BandMap bm = band_map(a);
  dispatch_io((has_xv ? xv : xi).dtype, y.dtype, a.name, [&](auto ti, auto to) {
    using TI = decltype(ti);
    using TO = decltype(to);
    _haar_synthesis_kernel<TI, TO><<<grid, dim3(kTX, kTY), 0, stream_of(a)>>>(
        xi.ptr<const TI>(), xv.ptr<const TI>(), y.ptr<TO>(), g, bm, static_cast<float>(a.f(0)), static_cast<float>(a.f(1)));
    LEANVAE_CUDA_CHECK_LAUNCH(a);
  });
}

}  // namespace

LEANVAE_REGISTER_KERNEL("haar_analysis", haar_analysis_cuda);
LEANVAE_REGISTER_KERNEL("haar_synthesis", haar_synthesis_cuda);

}  // namespace cuda
}  // namespace leanvae
