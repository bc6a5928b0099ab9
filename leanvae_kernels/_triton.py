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
    except Exception as exc:  # ImportError, or a broken install
        return None, f"triton is not importable ({exc.__class__.__name__}: {exc}); pip install triton"
    if interpreting():
        _interpreter_bool_masks()
    return triton, None


def _interpreter_bool_masks():
    """Triton's interpreter (seen in 3.6 and 3.9) stores `tensor_mask & scalar_condition` as int32 data
    although its type is int1; 3.9 then rejects it as a load/store mask ("mask has unsupported dtype").
    On a GPU such a mask is i1. Give the interpreter's masked load/store the boolean they expect (nonzero
    is true, as for i1); bool masks pass through untouched. Only under TRITON_INTERPRET=1."""
    try:
        import numpy as np
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except Exception:  # another interpreter layout: leave it alone
        return
    if getattr(InterpreterBuilder, "_leanvae_bool_masks", False):
        return

    def as_bool(mask):
        if isinstance(mask, TensorHandle) and mask.data.dtype != np.bool_:
            return TensorHandle(mask.data != 0, mask.dtype)
        return mask

    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def create_masked_load(self, ptrs, mask, *args, **kwargs):
        return load(self, ptrs, as_bool(mask), *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        return store(self, ptrs, value, as_bool(mask), *args, **kwargs)

    InterpreterBuilder.create_masked_load = create_masked_load
    InterpreterBuilder.create_masked_store = create_masked_store
    InterpreterBuilder._leanvae_bool_masks = True


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
