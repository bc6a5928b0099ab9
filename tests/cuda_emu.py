"""The CUDA kernels of csrc/cuda/ run on the CPU under a race checker (tests/emulation/), for the tests.

The kernel bodies (csrc/cuda/*_body.cuh) are compiled for the host together with the emulation runtime
(tests/emulation/lv_emu.h: every thread of a block a fiber, shared memory behind a race-checking shadow,
cp.async landing at its wait_group, barriers and shuffles with GPU semantics) into one shared library,
built once per test session (one host compiler call) and loaded with ctypes.

`run(name, tensors, ints, floats)` calls an emulated kernel with the arguments of the CUDA launcher of the
same name and fails (`RaceReport`) if the checker reported anything: every test that runs an emulated
kernel is a race check of it. `mutation(id)` is a context in which the sync point `id` is disabled and
reports are collected instead of raised (the mutation tests). `SYNC_POINTS` lists every sync point in the
sources of csrc/cuda/.
"""
import contextlib
import ctypes
import functools
import os
import re
import shutil
import subprocess
import tempfile

from leanvae_kernels import _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMU_DIR = os.path.join(ROOT, "tests", "emulation")
BUILD_FLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare")


class RaceReport(AssertionError):
    """The race checker reported a problem in an emulated kernel."""


@functools.lru_cache(maxsize=None)
def library():
    """(ctypes library, None), or (None, why) without a host C++ compiler. A compile error raises."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no host C++ compiler to emulate the CUDA kernels with"
    tmp = tempfile.mkdtemp(prefix="lv_cuda_emu_")
    so = os.path.join(tmp, "lv_cuda_emu.so")
    cmd = [cxx, *BUILD_FLAGS, f"-I{CSRC}", f"-I{EMU_DIR}", os.path.join(EMU_DIR, "emu_main.cpp"), "-o", so]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"host compile of the CUDA emulation failed:\n{out.stderr[-4000:]}")
    lib = ctypes.CDLL(so)
    lib.emu_call.restype = ctypes.c_char_p
    lib.emu_reports.restype = ctypes.c_char_p
    lib.emu_sites.restype = ctypes.c_char_p
    lib.emu_report_count.restype = ctypes.c_int64
    lib.emu_mutation_hits.restype = ctypes.c_int64
    lib.emu_reset.argtypes = [ctypes.c_char_p]
    return lib, None


def lib_or_skip():
    import pytest

    lib, why = library()
    if lib is None:
        pytest.skip(why)
    return lib


_collecting = []  # reports gathered inside mutation() contexts


def _call(lib, name, tensors, ints, floats):
    n, i64 = len(tensors), ctypes.c_int64
    shapes, strides = [0] * (8 * n), [0] * (8 * n)
    for k, t in enumerate(tensors):
        shapes[8 * k:8 * k + t.ndim] = list(t.shape)
        strides[8 * k:8 * k + t.ndim] = list(t.stride())
    floats = list(floats)
    err = lib.emu_call(name.encode(), n, (ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors]),
                       (ctypes.c_int * n)(*[_native._DTYPE_CODES[t.dtype] for t in tensors]),
                       (ctypes.c_int * n)(*[t.ndim for t in tensors]), (i64 * (8 * n))(*shapes),
                       (i64 * (8 * n))(*strides), (i64 * max(1, len(ints)))(*ints), len(ints),
                       (ctypes.c_double * max(1, len(floats)))(*floats), len(floats))
    if err:
        msg = err.decode()
        raise (ValueError if msg[0] == "V" else RuntimeError)(msg[1:])


def run(name, tensors, ints=(), floats=()):
    """Emulated CUDA kernel `name` on CPU tensors (inputs and preallocated outputs, by position); raises
    RaceReport on any report of the checker (outside a mutation() context)."""
    lib = lib_or_skip()
    if not _collecting:
        lib.emu_reset(b"")
    _call(lib, name, tensors, [int(i) for i in ints], floats)
    if not _collecting and lib.emu_report_count():
        raise RaceReport(f"race checker, {name}:\n" + lib.emu_reports().decode())


def native_run(backend, kernel, tensors, ints=(), floats=()):
    """Drop-in for leanvae_kernels._native.run (the backend is ignored: always the emulation)."""
    run(kernel, tensors, ints, floats)


@contextlib.contextmanager
def mutation(sync_id):
    """Runs the block with sync point `sync_id` disabled; yields a dict filled on exit with "reports" (the
    checker's distinct reports, a list of lines), "count" and "hits" (how often the point was reached)."""
    lib = lib_or_skip()
    lib.emu_reset(sync_id.encode())
    _collecting.append(sync_id)
    result = {}
    try:
        yield result
    finally:
        _collecting.pop()
        result["reports"] = [r for r in lib.emu_reports().decode().splitlines() if r]
        result["count"] = lib.emu_report_count()
        result["hits"] = lib.emu_mutation_hits()
        lib.emu_reset(b"")


def executed_sites():
    """{sync id: (kind, "file:line", hits)} of the sync points the emulation has run in this process."""
    lib = lib_or_skip()
    sites = {}
    for line in lib.emu_sites().decode().splitlines():
        sid, kind, where, hits = line.split("\t")
        sites[sid] = (kind, where, int(hits))
    return sites


_SYNC_MACRO = re.compile(r"\b(LV_SYNC|LV_SYNC_OR|LV_SHFL_XOR|LV_SHFL_DOWN|LV_CP_WAIT)\(\s*\"([^\"]+)\"")
KINDS = {"LV_SYNC": "barrier", "LV_SYNC_OR": "syncthreads_or", "LV_SHFL_XOR": "shuffle", "LV_SHFL_DOWN": "shuffle",
         "LV_CP_WAIT": "cp.async.wait_group"}


def sync_points():
    """[(id, kind, "file:line")] of every sync point in the sources of csrc/cuda/ (lv_sync.cuh defines them)."""
    found = []
    for fname in sorted(os.listdir(os.path.join(CSRC, "cuda"))):
        if fname == "lv_sync.cuh" or not fname.endswith((".cu", ".cuh")):
            continue
        with open(os.path.join(CSRC, "cuda", fname)) as f:
            for lineno, line in enumerate(f, 1):
                for m in _SYNC_MACRO.finditer(line):
                    found.append((m.group(2), KINDS[m.group(1)], f"{fname}:{lineno}"))
    return found


def conv_fns(suffix=""):
    """(forward, backward) of the causal conv like the cuda backend's, on the emulated CUDA kernels:
    suffix "_cudaemu" the scalar access path, "_cudaemu_vec" the vector path (refusing, with a ValueError,
    inputs that the CUDA launcher sends to the scalar path), "" the launcher's own choice."""
    from leanvae_kernels.ops.causal_conv import _native_fns

    return _native_fns("cpu", suffix, tile="cuda", run=native_run)
