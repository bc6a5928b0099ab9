"""Whether Triton kernels can run, and small helpers shared by the Triton launchers.

On CUDA tensors Triton compiles for the GPU. On CPU tensors it runs only through its interpreter
(`TRITON_INTERPRET=1`, read when a kernel is defined, so it must be set before the first Triton op
runs); tests use that to check the Triton kernels on machines without a GPU.
"""
import functools
import os


@functools.lru_cache(maxsize=None)
def _import():
    try:
        import triton  # noqa: F401

        return triton, None
    except Exception as exc:  # ImportError, or a broken install
        return None, f"triton is not importable ({exc.__class__.__name__}: {exc}); pip install triton"


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def status(device_type):
    triton, err = _import()
    if triton is None:
        return False, err
    if device_type == "cuda":
        if interpreting():
            return False, "TRITON_INTERPRET=1 is set, so Triton kernels run on the CPU interpreter only"
        return True, f"triton {triton.__version__}"
    if device_type == "cpu":
        if interpreting():
            return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1)"
        return False, "Triton runs on CPU tensors only through its interpreter (set TRITON_INTERPRET=1)"
    return False, f"triton does not run on {device_type} tensors"


def next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()
