#include <array>
#include <atomic>
#include <map>

#include "kernel_args.h"

#ifndef LEANVAE_CPU_PATHS
// "name:feature,feature;name:...", lowest path first, each path's features a superset of the one before
// (setup.py passes the portable build's list; a module built once has one path that needs nothing).
#define LEANVAE_CPU_PATHS "default:"
#endif

namespace leanvae {

namespace {

constexpr int kMaxCpuPaths = 8;
using Entry = std::array<KernelFn, kMaxCpuPaths>;

std::map<std::string, Entry>& registry() {
  static std::map<std::string, Entry> r;  // function-local: safe against static-init order
  return r;
}

// Whether the running CPU (and the OS, which must save the wider registers) has `feature`. Runs in this
// translation unit, which is compiled for the baseline: it is safe to call on any CPU.
bool cpu_supports(const std::string& feature) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#define LEANVAE_FEATURE(f) \
  if (feature == f) return __builtin_cpu_supports(f);
  LEANVAE_FEATURE("sse4.2")
  LEANVAE_FEATURE("popcnt")
  LEANVAE_FEATURE("avx")
  LEANVAE_FEATURE("avx2")
  LEANVAE_FEATURE("fma")
  LEANVAE_FEATURE("bmi")
  LEANVAE_FEATURE("bmi2")
  LEANVAE_FEATURE("avx512f")
  LEANVAE_FEATURE("avx512cd")
  LEANVAE_FEATURE("avx512bw")
  LEANVAE_FEATURE("avx512dq")
  LEANVAE_FEATURE("avx512vl")
#undef LEANVAE_FEATURE
#endif
  return false;  // a feature this check does not know is taken as missing: its path is never chosen
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(sep, start);
    if (end == std::string::npos) end = s.size();
    if (end > start) parts.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return parts;
}

const std::vector<CpuPath>& paths() {
  static const std::vector<CpuPath> list = [] {
    std::vector<CpuPath> out;
    for (const std::string& item : split(LEANVAE_CPU_PATHS, ';')) {
      const size_t colon = item.find(':');
      CpuPath p;
      p.name = item.substr(0, colon);
      p.features = colon == std::string::npos ? std::vector<std::string>{} : split(item.substr(colon + 1), ',');
      p.supported = true;
      for (const auto& f : p.features) p.supported = p.supported && cpu_supports(f);
      out.push_back(p);
    }
    if (out.empty() || out.size() > static_cast<size_t>(kMaxCpuPaths))
      throw std::logic_error("leanvae native: bad LEANVAE_CPU_PATHS list " LEANVAE_CPU_PATHS);
    return out;
  }();
  return list;
}

int best_path() {
  const auto& list = paths();
  int best = 0;  // path 0 needs only what the whole module was built for
  for (size_t i = 1; i < list.size(); ++i)
    if (list[i].supported) best = static_cast<int>(i);
  return best;
}

std::atomic<int> g_selected{-1};

}  // namespace

void register_kernel(const char* name, KernelFn fn, int cpu_path) {
  if (cpu_path < 0 || cpu_path >= kMaxCpuPaths)
    throw std::logic_error(std::string("leanvae native: bad SIMD path index for kernel ") + name);
  auto& r = registry();
  auto it = r.find(name);
  if (it == r.end()) it = r.emplace(name, Entry{}).first;
  if (it->second[cpu_path])
    throw std::logic_error(std::string("leanvae native: kernel registered twice: ") + name);
  it->second[cpu_path] = fn;
}

std::vector<CpuPath> cpu_paths() { return paths(); }

int cpu_path() {
  const int selected = g_selected.load(std::memory_order_relaxed);
  return selected >= 0 ? selected : best_path();
}

void set_cpu_path(int index) {
  const auto& list = paths();
  if (index < 0 || index >= static_cast<int>(list.size()))
    throw std::invalid_argument("set_cpu_path: no SIMD path " + std::to_string(index) + " in this module");
  if (!list[index].supported)
    throw std::invalid_argument("set_cpu_path: this CPU lacks a feature of SIMD path " + list[index].name);
  g_selected.store(index, std::memory_order_relaxed);
}

KernelFn find_kernel(const std::string& name) {
  auto& r = registry();
  auto it = r.find(name);
  if (it == r.end()) return nullptr;
  for (int p = cpu_path(); p >= 0; --p)
    if (it->second[p]) return it->second[p];
  return nullptr;
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
