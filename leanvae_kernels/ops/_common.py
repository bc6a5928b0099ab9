"""Helpers shared by the op definitions: input validation with clear errors, dtype sets, output checks."""
import contextlib

import torch
import torch.autograd.forward_ad as _forward_ad

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


# Inside a torch.library.custom_op implementation the autograd dispatch keys are excluded, so tensors
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


# ------------------------------------------------------------------ hooks on every registered op
# Applied once, by ops/__init__.py, to every op registered under the namespace (backward ops included),
# so no op module needs its own copy.
NAMESPACE = "leanvae"

# Forward-mode AD. torch.library.custom_op's autograd kernel only knows reverse mode: a dual tensor that
# does not require grad goes straight to the implementation and the output comes back without a tangent,
# which forward AD reads as a zero tangent (silently wrong). Our kernel at the device-specific autograd
# keys (which take precedence over the custom op's "Autograd" one) refuses tangents by name, then runs
# the custom op's own autograd kernel unchanged.
_FORWARD_AD_KEYS = ("AutogradCPU", "AutogradCUDA")
_hook_libs = []  # keep the torch.library.Library objects alive: dropping one unregisters its kernels


def forward_ad_error(op_name):
    return RuntimeError(
        f"{op_name}: forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad) is not "
        f"supported by the fused ops; use reverse mode (loss.backward(), torch.autograd.grad, torch.func.vjp, "
        f"torch.func.jacrev), or run the model without use_fused_kernels for forward-mode AD"
    )


def _has_tangent(args):
    # Every forward-mode entry point (forward_ad.dual_level, and torch.func.jvp/jacfwd, which open one)
    # raises the level from -1; outside one no tensor can carry a tangent (the fast path of every call).
    if _forward_ad._current_level < 0:
        return False
    for a in args:
        if isinstance(a, torch.Tensor):
            if _forward_ad.unpack_dual(a).tangent is not None:
                return True
        elif isinstance(a, (list, tuple)) and _has_tangent(a):
            return True
    return False


def _refuse_forward_ad(opdef, lib):
    from torch._library.autograd import make_autograd_impl

    reverse = make_autograd_impl(opdef._opoverload, opdef)
    name = f"{NAMESPACE}::{opdef._name}"

    def kernel(keyset, *args, **kwargs):
        if _has_tangent(args) or _has_tangent(kwargs.values()):
            raise forward_ad_error(name)
        return reverse(keyset, *args, **kwargs)

    for key in _FORWARD_AD_KEYS:
        lib.impl(opdef._name, kernel, key, with_keyset=True)


# Cold start. custom_op wraps each implementation in torch._disable_dynamo, which imports torch._dynamo
# (and through it Triton) on the first call: about 0.9 s on a 2-core machine, paid by the first fused
# call on the CPU even though nothing is being compiled. While torch._dynamo has never been imported
# nothing can be compiling, so the implementation is called directly; from the first call after
# torch._dynamo is loaded (by torch.compile or anything else) torch's own disable wrapper is built and
# used, as before. torch caches that wrapper on the wrapped function as `__dynamo_disable`; where a
# torch version stores it differently this does nothing (only the cold start is slower).
_DISABLE_ATTR = "__dynamo_disable"


def _lazy_dynamo_disable(opdef):
    import sys

    for wrapper in opdef._backend_fns.values():
        raw = getattr(wrapper, "__wrapped__", None)
        if raw is None or getattr(raw, _DISABLE_ATTR, None) is not None:
            continue

        def direct_until_dynamo_loads(*args, _raw=raw, **kwargs):
            if "torch._dynamo" in sys.modules:
                import torch._dynamo

                real = torch._dynamo.disable(_raw, True, wrapping=False)
                setattr(_raw, _DISABLE_ATTR, real)
                return real(*args, **kwargs)
            return _raw(*args, **kwargs)

        setattr(raw, _DISABLE_ATTR, direct_until_dynamo_loads)


def double_backward_error(op_name):
    return RuntimeError(
        f"{op_name}: double backward (a gradient of a gradient, e.g. create_graph=True then backward again) "
        f"is not supported by the fused ops; run the model without use_fused_kernels for higher-order gradients"
    )


def _refuse_double_backward(opdef):
    """A backward op has no formula of its own: differentiating it is a clear error, not torch's advice
    to register one."""
    name = f"{NAMESPACE}::{opdef._name}"

    def backward(ctx, *grads):
        raise double_backward_error(name)

    opdef.register_autograd(backward)


def install_op_hooks():
    """Forward-AD refusal, the double-backward error and the lazy dynamo wrapper on every op of the
    namespace not yet hooked."""
    from torch._library.custom_ops import OPDEFS

    lib = None
    for qualname, opdef in OPDEFS.items():
        if not qualname.startswith(NAMESPACE + "::") or getattr(opdef, "_leanvae_hooked", False):
            continue
        if lib is None:
            lib = torch.library.Library(NAMESPACE, "IMPL")
            _hook_libs.append(lib)
        if opdef._backward_fn is None:
            _refuse_double_backward(opdef)
        _refuse_forward_ad(opdef, lib)
        _lazy_dynamo_disable(opdef)
        opdef._leanvae_hooked = True
