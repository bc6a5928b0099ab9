// Shared by the emulated launchers (tests/emulation/emu_*.h).
#pragma once
#include <functional>
#include <string>

#include "cuda/lv_sync.cuh"

namespace lvemu {

template <class T>
inline float to_f(T v) { return leanvae::cpu::to_float(v); }
template <class T>
inline T from_f(float v) { return leanvae::cpu::from_float<T>(v); }

inline int64_t& vec_violations() {
  static int64_t n = 0;
  return n;
}

// Calls f(T{}) with T the emulated CUDA storage type for `dtype` (what leanvae::cuda::dispatch_float does).
template <class F>
inline void dispatch_gpu_float(int dtype, const std::string& name, F&& f) {
  switch (dtype) {
    case leanvae::kFloat32: f(float{}); break;
    case leanvae::kFloat16: f(__half{}); break;
    case leanvae::kBFloat16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(name + ": the cuda backend does not support dtype " + leanvae::dtype_name(dtype));
  }
}

}  // namespace lvemu
