"""Test-wide setup: which backends run here, the Triton interpreter on CPU-only machines, helpers.

Without a GPU, Triton kernels run on CPU tensors through the interpreter; TRITON_INTERPRET must be set
before any Triton kernel is defined, hence here, before the package is imported by the tests.
"""
import os
import sys

import pytest
import torch

# Test modules import shared helpers from each other across the folders (e.g. the model tests reuse
# test_published_parity's seeded weights): every test folder is importable whichever file runs alone.
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _dir, _subdirs, _files in os.walk(_TESTS):
    _subdirs[:] = sorted(d for d in _subdirs if not d.startswith((".", "_")) and d not in ("data", "emulation"))
    if _dir != _TESTS and any(f.startswith("test_") for f in _files) and _dir not in sys.path:
        sys.path.append(_dir)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from leanvae_kernels import _native, _triton  # noqa: E402

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

# Under pytest-xdist (`-n N`) every worker is a process of its own: share the cores among the workers
# instead of giving each of them all of torch's threads (OpenMP threads spinning on shared cores slow
# everyone). Tests that need a thread count set it themselves.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _XDIST_WORKERS))
# The processes that tests start (pytest runs of their own: the GPU suite's dry run, the encode benchmark)
# are not xdist workers: they must not inherit the worker's variables (pytest-benchmark then writes nothing).
for _var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
    os.environ.pop(_var, None)


def native_required():
    """The CPU native module must be present for the suite: a missing build is a failure, not a skip."""
    mod, reason = _native.module("cpu")
    if mod is None and os.environ.get("LEANVAE_KERNELS_ALLOW_NO_NATIVE") != "1":
        pytest.fail(f"native CPU module unavailable ({reason}); set LEANVAE_KERNELS_ALLOW_NO_NATIVE=1 to run without it")
    return mod is not None


def kernel_backends(device=None):
    """The fused backends that can run on `device` in this environment, as pytest params."""
    device = torch.device(device or DEVICE)
    params = []
    if device.type == "cpu":
        params.append(pytest.param("cpu", id="cpu"))
        ok, reason = _triton.status("cpu")
        params.append(pytest.param("triton", id="triton", marks=() if ok else pytest.mark.skip(reason=reason)))
    else:
        ok, reason = _native.module("cuda")[0] is not None, _native.module("cuda")[1]
        params.append(pytest.param("cuda", id="cuda", marks=() if ok else pytest.mark.skip(reason=reason)))
        ok, reason = _triton.status("cuda")
        params.append(pytest.param("triton", id="triton", marks=() if ok else pytest.mark.skip(reason=reason)))
    return params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _require_native():
    native_required()


# ------------------------------------------------------------------------------------ the `gpu` marker
_KERNEL_PARAMS = ("backend", "provider")
_GPU_BACKENDS = ("cuda", "triton")


def _runs_gpu_kernels(item):
    """True for a test that runs the cuda or triton kernels: parametrised with backend/provider "cuda" or
    "triton", or with a CUDA device. On a GPU machine those run on the GPU; on a CPU the Triton ones run
    through the interpreter (what the suite's dry run uses) and the cuda ones skip."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    for name, value in callspec.params.items():
        if name in _KERNEL_PARAMS and value in _GPU_BACKENDS:
            return True
        if isinstance(value, torch.device) and value.type == "cuda":
            return True
    return False


def pytest_configure(config):
    # pytest-xdist registers this itself; without it the mark is inert and must not warn.
    config.addinivalue_line("markers", "xdist_group(name): tests run by one worker under --dist loadgroup")


# ------------------------------------------------------------------------------ the `toolchain` marker
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _checks_the_toolchain(item):
    """True for a test of the native toolchain rather than of numbers: everything under tests/toolchain/
    (nvcc and ptxas builds, SASS, Triton's sm_90 compiler) and the CUDA kernels' host emulation and ptxas
    files at the top level (test_*_cuda_emulated.py, test_*_ptxas.py)."""
    rel = os.path.relpath(str(item.path), _TESTS_DIR)
    name = os.path.basename(rel)
    return rel.startswith("toolchain" + os.sep) or name.endswith(("_cuda_emulated.py", "_ptxas.py"))


# -------------------------------------------------------------------------- pytest-xdist groups
# Under `--dist loadgroup`, the tests of one group run on one worker, one after the other:
# - "processes": the files whose tests start several processes of their own (torchrun, spawned gloo ranks,
#   the GPU suite's dry run, which runs pytest itself) or wait on wall-clock deadlines, so that two of them
#   never compete with each other for the cores;
# - one group per file for the tests that use a module-scoped fixture (a build, an encoded dataset), so the
#   fixture is made once, not once per worker.
_SERIAL_FILES = ("test_parallel.py", "test_encode.py", "test_gpu_suite_script.py")


def _xdist_group(item):
    name = os.path.basename(str(item.path))
    if name in _SERIAL_FILES:
        return "processes"
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        if defs and str(defs[-1].scope) in ("module", "Scope.Module"):
            return os.path.relpath(str(item.path), _TESTS_DIR)
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """`pytest -m gpu` (benchmarks/gpu_suite.sh's correctness stage) selects exactly the tests that run
    GPU kernels: those marked explicitly and those `_runs_gpu_kernels` recognises. `pytest -m toolchain`
    selects the toolchain checks (`_checks_the_toolchain`), `-m "not toolchain"` leaves them out."""
    for item in items:
        if item.get_closest_marker("gpu") is None and _runs_gpu_kernels(item):
            item.add_marker(pytest.mark.gpu)
        if item.get_closest_marker("toolchain") is None and _checks_the_toolchain(item):
            item.add_marker(pytest.mark.toolchain)
        group = _xdist_group(item) if item.get_closest_marker("xdist_group") is None else None
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
