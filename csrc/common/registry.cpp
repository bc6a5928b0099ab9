#include <map>

#include "kernel_args.h"

namespace leanvae {

static std::map<std::string, KernelFn>& registry() {
  static std::map<std::string, KernelFn> r;  // function-local: safe against static-init order
  return r;
}

void register_kernel(const char* name, KernelFn fn) {
  auto& r = registry();
  if (r.count(name)) throw std::logic_error(std::string("leanvae native: kernel registered twice: ") + name);
  r[name] = fn;
}

KernelFn find_kernel(const std::string& name) {
  auto& r = registry();
  auto it = r.find(name);
  return it == r.end() ? nullptr : it->second;
}

std::vector<std::string> kernel_names() {
  std::vector<std::string> names;
  for (auto& kv : registry()) names.push_back(kv.first);
  return names;
}

const char* dtype_name(int dtype) {
  switch (dtype) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kFloat64: return "float64";
    default: return "unknown";
  }
}

}  // namespace leanvae
