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
