"""Backend selection: which implementation (cuda, triton, cpu, reference) runs an op for a given tensor.

Three layers, innermost first:
  * `with use_backend(name):` scopes a choice to the current context: the calling thread (or asyncio
    task) only, for the duration of the block. It lives in a `contextvars.ContextVar` and is restored
    on exit by its token, so blocks in different threads may overlap and exit in any order without
    seeing each other's choice. A thread started inside a block does NOT inherit it (Python starts
    threads with an empty context), it sees the process default.
  * `set_backend(name)` sets the process default: what every thread and context without an active
    `use_backend` block uses. Called inside a `use_backend` block it changes the default, not the
    block's choice (which stays in force until the block exits).
  * the environment variable `LEANVAE_KERNELS_BACKEND`, read when neither of the above is set.
`"auto"` (the default) picks the fastest backend that can run the call (device, dtype and the op's own
limits, e.g. ISTA's d <= 64); when that skips a native module that should be there (missing, stale,
failed to load) the first such call warns once per process (`NativeUnavailableWarning`, with the reason
and the command that fixes it). An explicitly requested backend that cannot run raises
`BackendUnavailable` saying why.
Under `torch.compile` the setting is read when the graph is traced (a `use_backend` choice is baked
into the graph; a `set_backend` change makes Dynamo retrace).
"""
import contextlib
import contextvars
import os
import threading
import warnings

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "LEANVAE_KERNELS_BACKEND"

# Preference order for "auto", by device type. The Triton interpreter is never chosen automatically on
# the CPU: it exists to test the Triton kernels, not to run them fast.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this op on this input; the message says why."""


class NativeUnavailableWarning(RuntimeWarning):
    """"auto" could not use a native module that should be there (missing, stale or failed to load) and ran
    a slower backend; the message gives the reason and the command that fixes it. Issued once per process."""


_warned_native = set()  # backends already warned about in this process


def _warn_native_unavailable(backend):
    from . import _native

    problem = _native.expected_but_unusable(backend)
    if problem is None or backend in _warned_native:
        return
    _warned_native.add(backend)
    warnings.warn(f"leanvae_kernels: the native {backend} kernels cannot be used, so 'auto' runs a slower backend: "
                  f"{problem}", NativeUnavailableWarning, stacklevel=4)


def _validate(name, what="backend"):
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"{what} must be one of {CHOICES}, got {name!r}")
    return name


def _from_env():
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    return _validate(value, f"environment variable {ENV_VAR}")


_default = None  # process default from set_backend(); None: follow the environment variable
_default_lock = threading.Lock()
_scoped = contextvars.ContextVar("leanvae_kernels_backend", default=None)  # use_backend's choice, per context


def set_backend(name):
    """Set the process default backend ("auto", "cuda", "triton", "cpu" or "reference") that every thread
    and context without an active `use_backend` block uses; returns the previous default."""
    global _default
    name = _validate(name)
    with _default_lock:
        previous = _default if _default is not None else _from_env()
        _default = name
    return previous


def _scoped_choice():
    return _scoped.get()


# torch.compile cannot trace ContextVar.get(): this marks _scoped_choice as a constant that Dynamo reads
# once, when it traces (what torch.compiler.assume_constant_result does; set directly so that importing
# this module does not import torch._dynamo, a second of cold start). A graph traced inside a
# use_backend block keeps that block's choice; the process default is a global, guarded as usual.
_scoped_choice._dynamo_marked_constant = True


def get_backend():
    """The backend setting in force here: this context's `use_backend` choice, else the process default."""
    scoped = _scoped_choice()
    if scoped is not None:
        return scoped
    default = _default
    return default if default is not None else _from_env()


@contextlib.contextmanager
def use_backend(name):
    """`with use_backend("cpu"): ...` sets the backend for the block, in this thread/context only, and
    restores the previous choice on exit (also when blocks in other threads overlap or exit first)."""
    token = _scoped.set(_validate(name))
    try:
        yield
    finally:
        _scoped.reset(token)


def resolve(requested):
    """The backend name an op call should use: `requested`, or the process setting when None."""
    return get_backend() if requested is None else _validate(requested)


# ------------------------------------------------------------------------------------ availability
def triton_status(device_type):
    """(available, reason) for running Triton kernels on tensors of `device_type`."""
    from . import _triton

    return _triton.status(device_type)


def native_status(backend):
    """(available, reason) for the native module behind `backend` ("cpu" or "cuda")."""
    from . import _native

    mod, reason = _native.module(backend)
    return mod is not None, reason


def backend_status(backend, device_type):
    """(available, reason) for `backend` on tensors of `device_type`, independent of any op."""
    if backend == "reference":
        return True, "pure PyTorch"
    if backend == "triton":
        return triton_status(device_type)
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, not {device_type}"
        return native_status("cpu")
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, not {device_type}"
        return native_status("cuda")
    return False, f"unknown backend {backend!r}"


ALL_OPS = []  # every OpBackends, in definition order (for `python -m leanvae info`)


class OpBackends:
    """The implementations of one op, by backend, and the one choice among them for a call.

    Each implementation is registered with the dtypes it supports and, where its kernels have limits of
    their own, `supports(*args) -> None or reason` (the implementation's arguments; e.g. ISTA's d <= 64):

        fwd = OpBackends("soft_threshold")
        @fwd.register("cpu", dtypes=ALL_FLOAT)
        def _(x, theta): ...
    """

    def __init__(self, name):
        self.name = name
        self.impls = {}
        self._supports = {}
        ALL_OPS.append(self)

    def register(self, backend, dtypes, supports=None):
        if backend not in BACKENDS:
            raise ValueError(f"{self.name}: unknown backend {backend!r}")

        def deco(fn):
            self.impls[backend] = (fn, frozenset(dtypes))
            self._supports[backend] = supports
            return fn

        return deco

    def status(self, backend, device_type, dtype=None, args=None):
        """(available, reason): can `backend` run this op for tensors of `device_type`/`dtype`, and, when
        `args` (the implementation's arguments) are given, for these arguments? If not, why."""
        if backend not in self.impls:
            return False, f"{self.name} has no {backend} implementation"
        ok, reason = backend_status(backend, device_type)
        if not ok:
            return ok, reason
        dtypes = self.impls[backend][1]
        if dtype is not None and dtype not in dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
            return False, f"{self.name} on {backend} supports {names}, not {str(dtype).replace('torch.', '')}"
        supports = self._supports.get(backend)
        if args is not None and supports is not None:
            why = supports(*args)
            if why:
                return False, why
        return True, reason

    def choose(self, requested, device, dtype, args=None):
        """The backend name to run for a tensor on `device` with `dtype` (and `args`), per `requested`."""
        device_type = device.type if isinstance(device, torch.device) else str(device)
        if requested == "auto":
            for backend in _AUTO_ORDER.get(device_type, ("reference",)):
                if self.status(backend, device_type, dtype, args)[0]:
                    return backend
                if backend in ("cpu", "cuda") and backend == device_type:
                    _warn_native_unavailable(backend)
            raise BackendUnavailable(f"{self.name}: no backend can run on {device_type} {dtype}")
        ok, reason = self.status(requested, device_type, dtype, args)
        if not ok:
            raise BackendUnavailable(f"{self.name}: backend {requested!r} is not available: {reason}")
        return requested

    def select(self, requested, device, dtype, args=None):
        """The implementation to call for a tensor on `device` with `dtype` (and `args`), per `requested`."""
        return self.impls[self.choose(requested, device, dtype, args)][0]

    def __call__(self, requested, device, dtype, *args):
        fn = self.select(requested, device, dtype, args)
        device_type = device.type if isinstance(device, torch.device) else str(device)
        with contextlib.ExitStack() as stack:
            if device_type == "cuda":
                # The one device guard of the op library: Triton launchers and torch calls inside an
                # implementation run on the tensors' device (cuda:1 while cuda:0 is current), and the
                # caller's current device is restored on the way out.
                stack.enter_context(torch.cuda.device(device))
            # Each implementation fixes its own precision (inputs' dtype, float32 accumulation): the
            # caller's autocast must not reach the torch ops inside (the references' matmuls and convolutions).
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args)
