#include <string>

#include "cuda_common.cuh"

namespace leanvae {

std::string cuda_runtime_info() {
  int runtime = 0, driver = 0, count = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaError_t derr = cudaDriverGetVersion(&driver);
  cudaError_t cerr = cudaGetDeviceCount(&count);
  std::string s = "runtime " + std::to_string(runtime / 1000) + "." + std::to_string((runtime % 1000) / 10);
  if (derr == cudaSuccess && driver > 0)
    s += ", driver " + std::to_string(driver / 1000) + "." + std::to_string((driver % 1000) / 10);
  else
    s += ", no CUDA driver";
  if (cerr == cudaSuccess) s += ", " + std::to_string(count) + " device(s)";
  else { s += std::string(", devices: ") + cudaGetErrorString(cerr); cudaGetLastError(); }
  return s;
}

// The module's one entry into the kernels (bindings.cpp): every launcher runs on args.device, and the
// caller's current device is restored afterwards, whatever the launcher did.
void call_on_device(KernelFn fn, const KernelArgs& args) {
  cuda::DeviceGuard guard(args.device);
  fn(args);
}

}  // namespace leanvae
