// The interface between Python and every native kernel, CPU and CUDA alike.
//
// Python passes tensors as (data pointer, dtype code, shape, strides in elements); no torch headers are
// involved, so the module is not tied to one torch build's C++ ABI. Each kernel file registers its entry
// points by name with LEANVAE_REGISTER_KERNEL; the binding exposes one generic `call(name, ...)`.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_path.h"

namespace leanvae {

// Must match leanvae_kernels/_native.py: _DTYPE_CODES.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
constexpr int kMaxDims = 8;

const char* dtype_name(int dtype);

struct TensorView {
  void* data = nullptr;
  int dtype = kFloat32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t stride[kMaxDims] = {0};  // in elements

  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t st(int d) const { return stride[d < 0 ? d + ndim : d]; }
  bool is_contiguous() const {
    int64_t expected = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      if (shape[d] != 1 && stride[d] != expected) return false;
      expected *= shape[d];
    }
    return true;
  }
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
};

struct KernelArgs {
  std::string name;
  std::vector<TensorView> tensors;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  void* stream = nullptr;  // cudaStream_t for CUDA kernels
  int device = 0;          // CUDA device index
  int num_threads = 1;     // OpenMP threads for CPU kernels

  // Checked accessors: a wrong argument count is a bug in the Python launcher, reported by name.
  const TensorView& t(size_t i) const {
    if (i >= tensors.size()) fail("tensor", i, tensors.size());
    return tensors[i];
  }
  int64_t i(size_t k) const {
    if (k >= ints.size()) fail("int", k, ints.size());
    return ints[k];
  }
  double f(size_t k) const {
    if (k >= floats.size()) fail("float", k, floats.size());
    return floats[k];
  }
  [[noreturn]] void fail(const char* what, size_t idx, size_t have) const {
    throw std::invalid_argument(name + ": " + what + " argument " + std::to_string(idx) + " missing (got " +
                                std::to_string(have) + ")");
  }
};

using KernelFn = void (*)(const KernelArgs&);

// `cpu_path`: the SIMD path `fn` was compiled for (see cpu_path.h); 0 for a module built once.
void register_kernel(const char* name, KernelFn fn, int cpu_path);
// The kernel for the SIMD path in use: the selected path, or the best lower one the kernel has.
KernelFn find_kernel(const std::string& name);
std::vector<std::string> kernel_names();

// SIMD paths of this module (CPU kernels built by the portable build; a single path otherwise).
struct CpuPath {
  std::string name;
  std::vector<std::string> features;  // GCC/Clang __builtin_cpu_supports names, all needed
  bool supported;                     // by the running CPU
};
std::vector<CpuPath> cpu_paths();
int cpu_path();              // index of the path in use: the best supported one unless set_cpu_path chose
void set_cpu_path(int index);  // throws std::invalid_argument for an unknown or unsupported path

}  // namespace leanvae

#define LEANVAE_CONCAT_(a, b) a##b
#define LEANVAE_CONCAT(a, b) LEANVAE_CONCAT_(a, b)
// Registers `fn` under `name` (for this translation unit's SIMD path) when the module is loaded. The
// initialiser is a plain call with two constant pointers: nothing in it can use the path's instructions,
// so loading the module on a CPU without them is safe (tests/test_portable_build.py checks the binary).
#define LEANVAE_REGISTER_KERNEL(name, fn)                              \
  static const bool LEANVAE_CONCAT(leanvae_registered_, __LINE__) = \
      (::leanvae::register_kernel(name, fn, LEANVAE_CPU_PATH_INDEX), true)
