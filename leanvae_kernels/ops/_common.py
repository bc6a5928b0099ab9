"""Helpers shared by the op definitions: input validation with clear errors, dtype sets, output checks."""
import contextlib

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # cuda/triton kernels; float64 -> reference
ALL_DTYPES = FLOAT_DTYPES


def _dtype_names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def describe(t):
    return f"shape {tuple(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}, device {t.device}"


def check_tensor(op, name, t, *, ndim=None, layout=None, dtypes=FLOAT_DTYPES, optional=False):
    """Raise TypeError/ValueError naming `op`, the argument `name` and what was expected."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: {name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        expected = f"a {ndim}-D tensor {layout}" if layout else f"a {ndim}-D tensor"
        raise ValueError(f"{op}: {name} must be {expected}, got {describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype {_dtype_names(dtypes)}, got {describe(t)}")


def check_same_device(op, named):
    """`named`: (name, tensor-or-None) pairs that must share one device."""
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for n, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {n} is on {t.device} but {first_name} is on {first.device}; all inputs must share a device")


def check_same_dtype(op, named):
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for n, t in present[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {n} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; they must match")


def check_scalar(op, name, t):
    """A learnable scalar parameter: a one-element floating tensor (shape () or (1,))."""
    check_tensor(op, name, t)
    if t.numel() != 1:
        raise ValueError(f"{op}: {name} must hold one element (shape () or (1,)), got {describe(t)}")


# Inside the implementation of a torch.library custom op the autograd dispatch keys are excluded, so tensors
# made there never require grad and torch.autograd.grad would find no graph (the reference backward
# silently returned zeros). `_autograd_enabled` lifts that exclusion for the reference's vjp only.
_AUTOGRAD_KEYS = (
    torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther, torch._C.DispatchKey.AutogradNestedTensor,
)


@contextlib.contextmanager
def _autograd_enabled():
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def vjp(fn, inputs, grads):
    """Gradients of `fn(*inputs)` w.r.t. every floating tensor input, by autograd through `fn`.

    The reference backward of every op: `fn` is the op's pure-PyTorch reference. Non-tensor inputs and
    None are passed through and get None. `grads` matches fn's outputs (a tensor or a tuple; None for
    an output that receives no gradient).
    """
    with _autograd_enabled():
        leaves = [t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = grads if isinstance(grads, tuple) else (grads,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        if not pairs:
            return [None if not (isinstance(t, torch.Tensor) and t.requires_grad) else torch.zeros_like(t) for t in leaves]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    it = iter(got)
    result = []
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            g = next(it)
            result.append(torch.zeros(t.shape, dtype=t.dtype, device=t.device) if g is None else g.contiguous())
        else:
            result.append(None)
    return result


def sm_count(device, default=1):
    """Streaming multiprocessors of a CUDA device (launch sizing); `default` for any other device (the
    Triton interpreter on a CPU has none, and its cost is per operation, so few programs suit it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return default
    return torch.cuda.get_device_properties(device).multi_processor_count


def acc_dtype(dtype):
    """Accumulation dtype of the references: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
