"""Loader of the native modules (`_C`: CPU kernels, `_C_cuda`: CUDA kernels) and the calling convention.

A missing, stale or broken module never breaks `import leanvae_kernels`: `module(backend)` returns
(None, reason) and the ops fall back to the next backend (`python -m leanvae info` prints the reason).
A build is stale when the sources under csrc/ changed after it was built (checked where the sources
are present, as in an editable install) or when its calling convention differs from this file's.
"""
import functools
import hashlib
import importlib
import importlib.util
import os

import torch

API_VERSION = 1  # must match kApiVersion in csrc/bindings.cpp
_MODULES = {"cpu": "leanvae_kernels._C", "cuda": "leanvae_kernels._C_cuda"}
# Must match csrc/common/kernel_args.h: DType.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def source_hash():
    """Hash of the sources under csrc/, computed as setup.py does; None when they are not present."""
    if not os.path.isdir(_CSRC):
        return None
    h = hashlib.sha256()
    paths = []
    for dirpath, dirs, files in os.walk(_CSRC):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # as glob("**/*") in setup.py
        paths += [os.path.join(dirpath, f) for f in files if not f.startswith(".")]
    for path in sorted(paths):
        h.update(os.path.relpath(path, _CSRC).replace(os.sep, "/").encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


_ISA_MARK = b"leanvae-required-isa="  # must match csrc/bindings.cpp: kRequiredIsaRecord


def cpu_features():
    """The running CPU's instruction-set features as Linux names them in /proc/cpuinfo ("flags" on x86,
    "Features" on arm64), or None where they cannot be read (another OS: then no module is refused)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def required_isa(path):
    """(march, [features]) recorded in the native module file `path`, or None if it records nothing."""
    with open(path, "rb") as f:
        data = f.read()
    start = data.find(_ISA_MARK)
    if start < 0:
        return None
    start += len(_ISA_MARK)
    march, _, features = data[start:data.find(b"\0", start)].decode("ascii", "replace").partition(":")
    return march, [f for f in features.split(",") if f]


def isa_refusal(name):
    """Why module `name` must not be loaded on this CPU (it was built for features the CPU lacks), or None.
    Decided from the file, before any of its code runs: a module built with -march=native may execute
    wide instructions in its static initialisers, which would kill the process with SIGILL."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None  # not built: the import reports it
    record, have = required_isa(spec.origin), cpu_features()
    if record is None or have is None:
        return None
    march, needed = record
    missing = [f for f in needed if f not in have]
    if not missing:
        return None
    return (f"{name} was built for -march={march} and needs CPU features this CPU lacks ({', '.join(missing)}); "
            "rebuild it here with the default portable build: unset LEANVAE_KERNELS_CPU_ARCH, `pip install -e .`")


@functools.lru_cache(maxsize=None)
def module(backend):
    """(module, reason) for "cpu" or "cuda"; module is None when it cannot be used."""
    if os.environ.get("LEANVAE_KERNELS_DISABLE_NATIVE", "") == "1":
        return None, "disabled by LEANVAE_KERNELS_DISABLE_NATIVE=1"
    name = _MODULES[backend]
    refusal = isa_refusal(name)
    if refusal is not None:
        return None, refusal
    try:
        mod = importlib.import_module(name)
    except ImportError as exc:
        if backend == "cuda" and "No module named" in str(exc):
            return None, "the CUDA kernels were not built (nvcc was not found at install time, or LEANVAE_KERNELS_BUILD_CUDA=0)"
        return None, f"{name} is not built or failed to load ({exc}); run `pip install -e .`"
    if getattr(mod, "API_VERSION", None) != API_VERSION:
        return None, f"{name} is stale (API {getattr(mod, 'API_VERSION', '?')}, expected {API_VERSION}); rebuild with `pip install -e .`"
    expected = source_hash()
    if expected is not None and mod.SOURCE_HASH != expected:
        return None, f"{name} is stale (built from sources {mod.SOURCE_HASH}, csrc/ is now {expected}); rebuild with `pip install -e .`"
    if backend == "cuda" and not torch.cuda.is_available():
        return None, "no CUDA device is visible to torch"
    return mod, f"{name} ({mod.BUILD_INFO})"


def build_info(backend):
    """What was built for `backend`, independent of whether it can run here: (built, text)."""
    refusal = isa_refusal(_MODULES[backend])
    if refusal is not None:
        return True, refusal
    try:
        mod = importlib.import_module(_MODULES[backend])
    except ImportError as exc:
        return False, str(exc)
    text = mod.BUILD_INFO
    if hasattr(mod, "REQUIRED_ISA"):
        text += f"; requires {mod.REQUIRED_ISA}"
    if hasattr(mod, "cpu_path"):
        text += f"; SIMD path {mod.cpu_path()} (of {', '.join(p[0] for p in mod.cpu_paths())})"
    if backend == "cuda":
        text += "; " + mod.cuda_runtime_info()
    return True, f"{text}; {len(mod.kernels())} kernels"


def has_kernel(backend, kernel):
    mod, _ = module(backend)
    return mod is not None and kernel in _kernel_names(backend)


@functools.lru_cache(maxsize=None)
def _kernel_names(backend):
    return frozenset(module(backend)[0].kernels())


def _view(t):
    return (t.data_ptr(), _DTYPE_CODES[t.dtype], tuple(t.shape), tuple(t.stride()))


def run(backend, kernel, tensors, ints=(), floats=()):
    """Run native `kernel` of `backend` on `tensors` (inputs and preallocated outputs, by position).

    CPU kernels get torch's intra-op thread count; CUDA kernels the tensors' device and current stream.
    """
    mod, reason = module(backend)
    if mod is None:
        raise RuntimeError(f"native {backend} kernels unavailable: {reason}")
    if backend == "cuda":
        device = next(t.device for t in tensors if t.is_cuda)
        stream = torch.cuda.current_stream(device).cuda_stream
        mod.call(kernel, [_view(t) for t in tensors], list(ints), list(floats), stream, device.index or 0, 1)
    else:
        mod.call(kernel, [_view(t) for t in tensors], list(ints), list(floats), 0, 0, torch.get_num_threads())
