"""Compile-time checks of the CUDA kernels without a GPU: ptxas resource usage per kernel.

`ptxas_usage("csrc/cuda/causal_conv.cu")` compiles one source for sm_90 with `-Xptxas -v`, with the
flags setup.py uses, and returns {demangled kernel name: Usage}. Tests use it to assert that no kernel
path spills registers to local memory (a spill on sm_90 costs an L1/L2 round trip per access).
"""
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


@dataclasses.dataclass(frozen=True)
class Usage:
    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int

    @property
    def spills(self):
        return self.spill_stores + self.spill_loads


def find_nvcc():
    """Path of nvcc (CUDA_HOME, PATH, /usr/local/cuda), or None."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return dict(zip(names, names))
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log):
    """ptxas -v output -> {mangled kernel name: Usage} (entry functions only)."""
    usage, current, frame = {}, None, (0, 0, 0)
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current, frame = m.group(1), (0, 0, 0)
            continue
        m = _FRAME.search(line)
        if m and current:
            frame = tuple(int(v) for v in m.groups())
            continue
        m = _REGS.search(line)
        if m and current:
            usage[current] = Usage(int(m.group(1)), *frame)
            current = None
    return usage


def ptxas_usage(source, arch="90", defines=()):
    """Compile csrc/cuda/<source> for sm_<arch> and return {demangled kernel name: Usage}."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    path = source if os.path.isabs(source) else os.path.join(ROOT, source)
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
               f"-I{CSRC}", f"-I{os.path.join(home, 'include')}", "-Xptxas", "-v", *defines,
               "-c", path, "-o", os.path.join(tmp, "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{proc.stderr[-4000:]}")
    usage = parse_ptxas(proc.stderr + proc.stdout)
    names = _demangle(list(usage))
    return {names[k]: v for k, v in usage.items()}


# For the host emulations (tests/test_*_cuda_emulated.py): opens namespace leanvae::cuda with what
# csrc/cuda/cuda_common.cuh gives the kernels there (dtype conversions, dispatch), mapped to the CPU types.
# The including shim defines __half / __nv_bfloat16 first and closes both namespaces after its own additions.
EMU_CUDA_NAMESPACE = r"""namespace leanvae {
const char* dtype_name(int dtype) { static const char* n[] = {"float32", "float16", "bfloat16", "float64"}; return n[dtype & 3]; }
namespace cuda {
template <class T> inline float to_float(T v) { return leanvae::cpu::to_float(v); }
template <class T> inline T from_float(float v) { return leanvae::cpu::from_float<T>(v); }
template <class F> inline void dispatch_float(int dtype, const std::string& name, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(name + ": the cuda backend does not support dtype " + dtype_name(dtype));
  }
}
"""


def build_host_emulation(tmp_dir, name, source, std="c++17", flags=()):
    """Compile `source` (a CUDA file rewritten to run on the host, see tests/test_*_cuda_emulated.py) into a
    shared library in tmp_dir and load it: (ctypes library, None), or (None, why) when no host C++ compiler
    exists. A compile error raises, with the compiler's message."""
    import ctypes

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no host C++ compiler to emulate the CUDA kernels with"
    cpp, so = os.path.join(tmp_dir, f"{name}.cpp"), os.path.join(tmp_dir, f"{name}.so")
    with open(cpp, "w") as f:
        f.write(source)
    out = subprocess.run([cxx, f"-std={std}", "-O1", "-shared", "-fPIC", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
                          *flags, f"-I{CSRC}", cpp, "-o", so], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"host compile of {name} failed:\n{out.stderr[-3000:]}")
    return ctypes.CDLL(so), None
