// The pybind11 module: one generic entry point `call`, plus facts for `python -m leanvae info`.
// Compiled twice: into leanvae_kernels._C (CPU kernels) and leanvae_kernels._C_cuda (CUDA kernels).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

#include "common/kernel_args.h"
#include "cuda/ista_step_shape.h"

#ifndef LEANVAE_MODULE_NAME
#error "LEANVAE_MODULE_NAME must be defined by the build"
#endif
#ifndef LEANVAE_SOURCE_HASH
#define LEANVAE_SOURCE_HASH "unknown"
#endif
#ifndef LEANVAE_BUILD_INFO
#define LEANVAE_BUILD_INFO ""
#endif
#ifndef LEANVAE_REQUIRED_ISA
#define LEANVAE_REQUIRED_ISA "unknown:"
#endif

namespace py = pybind11;
using namespace leanvae;

// Bumped whenever the Python <-> native calling convention changes; _native.py checks it.
static constexpr int kApiVersion = 1;

// What the CPU must have for any code of this module to run: "<-march value>:<feature>,<feature>,..."
// (features as Linux names them in /proc/cpuinfo). The loader must know it BEFORE importing the module
// (a module built with -march=native may run wide instructions in its static initialisers), so it is
// also stored as a marked string that leanvae_kernels/_native.py finds by reading the file's bytes.
__attribute__((used)) static const char kRequiredIsaRecord[] = "leanvae-required-isa=" LEANVAE_REQUIRED_ISA;

using PyTensor = std::tuple<uintptr_t, int, std::vector<int64_t>, std::vector<int64_t>>;

#ifdef LEANVAE_WITH_CUDA
namespace leanvae {
std::string cuda_runtime_info();                          // defined in cuda/runtime_info.cu
void call_on_device(KernelFn fn, const KernelArgs& args);  // likewise: runs fn under a device guard
}
#endif

static TensorView to_view(const PyTensor& t, size_t index, const std::string& name) {
  TensorView v;
  v.data = reinterpret_cast<void*>(std::get<0>(t));
  v.dtype = std::get<1>(t);
  const auto& shape = std::get<2>(t);
  const auto& stride = std::get<3>(t);
  if (shape.size() != stride.size() || shape.size() > static_cast<size_t>(kMaxDims))
    throw std::invalid_argument(name + ": tensor " + std::to_string(index) + " has a bad shape/stride description");
  if (v.dtype < kFloat32 || v.dtype > kFloat64)
    throw std::invalid_argument(name + ": tensor " + std::to_string(index) + " has unsupported dtype code " +
                                std::to_string(v.dtype));
  v.ndim = static_cast<int>(shape.size());
  for (int d = 0; d < v.ndim; ++d) {
    v.shape[d] = shape[d];
    v.stride[d] = stride[d];
  }
  return v;
}

PYBIND11_MODULE(LEANVAE_MODULE_NAME, m) {
  m.doc() = "leanvae-kernels native kernels (see leanvae_kernels/_native.py)";
  m.attr("API_VERSION") = kApiVersion;
  m.attr("SOURCE_HASH") = LEANVAE_SOURCE_HASH;
  m.attr("BUILD_INFO") = LEANVAE_BUILD_INFO;
  m.attr("REQUIRED_ISA") = kRequiredIsaRecord + sizeof("leanvae-required-isa=") - 1;
  m.def("kernels", &kernel_names, "Names of the kernels in this module.");
  m.def(
      "cuda_ista_launch",
      [](int mode, int d, int D) {
        namespace is = leanvae::cuda::ista;
        if (mode < is::kStep || mode > is::kInit || d < 1 || D < 1)
          throw std::invalid_argument("cuda_ista_launch: needs mode 0..2, d >= 1, D >= 1");
        return std::make_tuple(is::block_threads(D), is::fwd_smem(mode, d, D), is::bwd_smem(mode, d, D));
      },
      py::arg("mode"), py::arg("d"), py::arg("D"),
      "The CUDA ISTA step kernels' launch shape for (mode, d, D): (threads per block, forward shared memory "
      "bytes, backward shared memory bytes); csrc/cuda/ista_step_shape.h, the definition the launchers use.");
  m.def(
      "call",
      [](const std::string& name, const std::vector<PyTensor>& tensors, const std::vector<int64_t>& ints,
         const std::vector<double>& floats, uintptr_t stream, int device, int num_threads) {
        KernelFn fn = find_kernel(name);
        if (!fn) throw std::invalid_argument("leanvae native: no kernel named '" + name + "' in this module");
        KernelArgs args;
        args.name = name;
        args.tensors.reserve(tensors.size());
        for (size_t i = 0; i < tensors.size(); ++i) args.tensors.push_back(to_view(tensors[i], i, name));
        args.ints = ints;
        args.floats = floats;
        args.stream = reinterpret_cast<void*>(stream);
        args.device = device;
        args.num_threads = num_threads < 1 ? 1 : num_threads;
        py::gil_scoped_release release;
#ifdef LEANVAE_WITH_CUDA
        call_on_device(fn, args);
#else
        fn(args);
#endif
      },
      py::arg("name"), py::arg("tensors"), py::arg("ints"), py::arg("floats"), py::arg("stream"), py::arg("device"),
      py::arg("num_threads"));
#ifdef LEANVAE_WITH_CUDA
  m.def("cuda_runtime_info", &cuda_runtime_info, "CUDA runtime version and visible devices, as text.");
#else
  m.def(
      "cpu_paths",
      [] {
        std::vector<std::tuple<std::string, std::vector<std::string>, bool>> out;
        for (const auto& p : cpu_paths()) out.emplace_back(p.name, p.features, p.supported);
        return out;
      },
      "SIMD paths of the CPU kernels, lowest first: (name, CPU features it needs, supported here).");
  m.def("cpu_path", [] { return cpu_paths()[cpu_path()].name; }, "The SIMD path the CPU kernels run.");
  m.def(
      "set_cpu_path",
      [](const std::string& name) {
        const auto list = cpu_paths();
        const std::string previous = list[cpu_path()].name;
        for (size_t i = 0; i < list.size(); ++i)
          if (list[i].name == name) {
            set_cpu_path(static_cast<int>(i));
            return previous;
          }
        throw std::invalid_argument("set_cpu_path: no SIMD path named '" + name + "' in this module");
      },
      py::arg("name"),
      "Runs the CPU kernels on SIMD path `name` from now on, in every thread (for tests and benchmarks); "
      "returns the previous path's name.");
#endif
}
