// Shared helpers for the CUDA kernels: float32 load/store for every storage dtype, dtype dispatch,
// error checking. Every launch is followed by LEANVAE_CUDA_CHECK_LAUNCH.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../common/kernel_args.h"

namespace leanvae {
namespace cuda {

inline void check(cudaError_t err, const std::string& where) {
  if (err != cudaSuccess) throw std::runtime_error(where + ": CUDA error: " + cudaGetErrorString(err));
}
#define LEANVAE_CUDA_CHECK(expr) ::leanvae::cuda::check((expr), std::string(__FILE__ ":") + std::to_string(__LINE__))
#define LEANVAE_CUDA_CHECK_LAUNCH(args) ::leanvae::cuda::check(cudaGetLastError(), (args).name + " launch")

template <class T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls f(T{}) with T the CUDA storage type for `dtype` (float64 is served by the other backends).
template <class F>
inline void dispatch_float(int dtype, const std::string& name, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(name + ": the cuda backend does not support dtype " + dtype_name(dtype));
  }
}

// Scalar parameter stored on the device (a learnable threshold, a step size), read by the kernel
// so that no host synchronisation is needed.
struct DeviceScalar {
  const void* ptr;
  int dtype;
  __device__ __forceinline__ float get() const {
    switch (dtype) {
      case kFloat16: return __half2float(*static_cast<const __half*>(ptr));
      case kBFloat16: return __bfloat162float(*static_cast<const __nv_bfloat16*>(ptr));
      case kFloat64: return static_cast<float>(*static_cast<const double*>(ptr));
      default: return *static_cast<const float*>(ptr);
    }
  }
};

// Makes `device` current for its scope and restores the caller's current device on exit (also when a
// launch throws), so that a kernel call on cuda:1 never leaves torch's thread on cuda:1.
// bindings.cpp holds one around every call into this module, so every launcher runs on args.device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    LEANVAE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) {
      LEANVAE_CUDA_CHECK(cudaSetDevice(device));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);  // a destructor must not throw; the next CUDA call reports errors
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

inline cudaStream_t stream_of(const KernelArgs& args) { return static_cast<cudaStream_t>(args.stream); }

}  // namespace cuda
}  // namespace leanvae
