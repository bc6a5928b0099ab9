// The test suite's emulation library (built by tests/cuda_emu.py with one host compiler call): every
// CUDA kernel of csrc/cuda/ run on the CPU under the race checker of lv_emu.h, behind a C interface for
// ctypes. Kernels take the same arguments as the CUDA launchers of the same name.
#define LV_EMULATION 1
#include <map>
#include <string>

#include "emu_conv.h"
#include "emu_soft_threshold.h"
#include "emu_ista.h"
#include "emu_haar.h"

namespace leanvae {
const char* dtype_name(int dtype) {
  static const char* n[] = {"float32", "float16", "bfloat16", "float64"};
  return n[dtype & 3];
}
}  // namespace leanvae

namespace {

using Fn = std::function<void(const leanvae::KernelArgs&)>;

const std::map<std::string, Fn>& kernels() {
  namespace c = lvemu::conv;
  static const std::map<std::string, Fn> k = {
      // The conv: _cudaemu the scalar path, _cudaemu_vec the vector path (refusing what the launcher would
      // send to the scalar one), no suffix the launcher's choice.
      {"causal_dwconv3d_fwd", [](const leanvae::KernelArgs& a) { c::conv<false>(a, 2); }},
      {"causal_dwconv3d_bwd_input", [](const leanvae::KernelArgs& a) { c::conv<true>(a, 2); }},
      {"causal_dwconv3d_bwd_weight", [](const leanvae::KernelArgs& a) { c::wgrad(a, true); }},
      {"causal_dwconv3d_fwd_cudaemu", [](const leanvae::KernelArgs& a) { c::conv<false>(a, 0); }},
      {"causal_dwconv3d_bwd_input_cudaemu", [](const leanvae::KernelArgs& a) { c::conv<true>(a, 0); }},
      {"causal_dwconv3d_bwd_weight_cudaemu", [](const leanvae::KernelArgs& a) { c::wgrad(a, false); }},
      {"causal_dwconv3d_fwd_cudaemu_vec", [](const leanvae::KernelArgs& a) { c::conv<false>(a, 1); }},
      {"causal_dwconv3d_bwd_input_cudaemu_vec", [](const leanvae::KernelArgs& a) { c::conv<true>(a, 1); }},
      {"causal_dwconv3d_bwd_weight_cudaemu_vec", [](const leanvae::KernelArgs& a) { c::wgrad(a, true); }},
      {"soft_threshold_fwd", lvemu::soft_threshold::fwd},
      {"soft_threshold_bwd", lvemu::soft_threshold::bwd},
      {"ista_step_fwd", lvemu::ista::fwd},
      {"ista_step_bwd", lvemu::ista::bwd},
      {"haar_analysis", lvemu::haar::analysis},
      {"haar_synthesis", lvemu::haar::synthesis},
  };
  return k;
}

std::string g_text;

}  // namespace

extern "C" {

// Runs `name`; returns null, or "V<message>" (bad argument) / "R<message>" (any other error).
const char* emu_call(const char* name, int n, const void* const* ptrs, const int* dtypes, const int* ndims,
                     const int64_t* shapes, const int64_t* strides, const int64_t* ints, int nints, const double* floats,
                     int nfloats) {
  leanvae::KernelArgs a;
  a.name = name;
  for (int k = 0; k < n; ++k) {
    leanvae::TensorView v;
    v.data = const_cast<void*>(ptrs[k]);
    v.dtype = dtypes[k];
    v.ndim = ndims[k];
    for (int d = 0; d < v.ndim; ++d) v.shape[d] = shapes[8 * k + d], v.stride[d] = strides[8 * k + d];
    a.tensors.push_back(v);
  }
  a.ints.assign(ints, ints + nints);
  a.floats.assign(floats, floats + nfloats);
  try {
    auto it = kernels().find(name);
    if (it == kernels().end()) throw std::invalid_argument(std::string("no emulated kernel ") + name);
    it->second(a);
  } catch (const std::invalid_argument& e) {
    g_text = std::string("V") + e.what();
    return g_text.c_str();
  } catch (const std::exception& e) {
    g_text = std::string("R") + e.what();
    return g_text.c_str();
  }
  return nullptr;
}

// Streaming multiprocessors of the emulated device (ISTA launches size their grid by it).
void emu_set_sms(int n) { lvemu::ista::sms() = n; }

// Clears the reports and disables the sync point `mutation` ("" for none) from now on.
void emu_reset(const char* mutation) { lvemu::reset(mutation); }

int64_t emu_report_count() { return lvemu::S().n_reports; }
int64_t emu_mutation_hits() { return lvemu::S().mutation_hits; }

// The distinct reports since the last reset, one per line (at most 64).
const char* emu_reports() {
  g_text.clear();
  for (const auto& r : lvemu::S().reports) g_text += r + "\n";
  return g_text.c_str();
}

// The sync points executed so far in this process: "id<TAB>kind<TAB>file:line<TAB>hits" per line.
const char* emu_sites() {
  g_text.clear();
  for (const auto& [id, s] : lvemu::S().sites)
    g_text += id + "\t" + lvemu::kind_name(s.kind) + "\t" + lvemu::where(s.file.c_str(), s.line) + "\t" +
              std::to_string(s.hits) + "\n";
  return g_text.c_str();
}

}  // extern "C"
