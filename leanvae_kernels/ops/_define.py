"""The one way an op of this library is defined: `define_op` turns a schema, the eager body, a fake, a
validator and a gradient rule into the registered forward and backward ops (`torch.ops.leanvae.<name>`
and `torch.ops.leanvae.<name>_backward`), their fakes, the autograd wiring and the hooks every op shares:

  * validation once per call: the public function (`OpDefinition.__call__`) validates and marks the call,
    the eager body then skips its own check; a direct `torch.ops.leanvae.<name>(...)` call is validated by
    the body; under tracing (FakeTensor, torch.compile) the fake validates;
  * forward-mode AD refused by name (torch.library's autograd kernel knows reverse mode only and would
    silently drop tangents);
  * double backward refused by name (the backward ops have no formula of their own);
  * no torch._dynamo import on the first eager call (cold start), while torch.compile still sees the
    implementation wrapped as torch.library wraps it.

Adding an op: a pure-PyTorch reference, the kernels (registered per backend on an `OpBackends`), and one
`define_op(...)` call. The last argument of every schema is `str backend` (a resolved backend name).
"""
import sys
import threading

import torch
import torch.autograd.forward_ad as _forward_ad

from .._backend import resolve

NAMESPACE = "leanvae"

# ------------------------------------------------------------------------------ validation once
# The public function validates, then names the op here; the op's eager body consumes the mark and skips
# its check. The mark is per thread and names one op, so a nested or concurrent direct call of another op
# (or of the same op from another thread) is still validated.
_validated = threading.local()


def _take_mark(name):
    if getattr(_validated, "name", None) == name:
        _validated.name = None
        return True
    return False


# ------------------------------------------------------------------------------ cross-cutting hooks
def forward_ad_error(op_name):
    return RuntimeError(
        f"{op_name}: forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad) is not "
        f"supported by the fused ops; use reverse mode (loss.backward(), torch.autograd.grad, torch.func.vjp, "
        f"torch.func.jacrev), or run the model without use_fused_kernels for forward-mode AD"
    )


def double_backward_error(op_name):
    return RuntimeError(
        f"{op_name}: double backward (a gradient of a gradient, e.g. create_graph=True then backward again) "
        f"is not supported by the fused ops; run the model without use_fused_kernels for higher-order gradients"
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


# The autograd kernel of a torch.library custom op sits at the "Autograd" alias key; a kernel at the
# device-specific keys takes precedence, refuses tangents by name, then runs that autograd kernel unchanged.
_FORWARD_AD_KEYS = ("AutogradCPU", "AutogradCUDA")
_libs = []  # the torch.library.Library objects must stay alive: dropping one unregisters its kernels


def _refuse_forward_ad(opdef):
    from torch._library.autograd import make_autograd_impl

    reverse = make_autograd_impl(opdef._opoverload, opdef)
    name = f"{NAMESPACE}::{opdef._name}"

    def kernel(keyset, *args, **kwargs):
        if _has_tangent(args) or _has_tangent(kwargs.values()):
            raise forward_ad_error(name)
        return reverse(keyset, *args, **kwargs)

    if not _libs:
        _libs.append(torch.library.Library(NAMESPACE, "IMPL"))
    for key in _FORWARD_AD_KEYS:
        _libs[0].impl(opdef._name, kernel, key, with_keyset=True)


# Cold start. custom_op wraps each implementation in torch._disable_dynamo, which imports torch._dynamo
# (and through it Triton) on the first call: about 0.9 s on a 2-core machine, paid by the first fused
# call on the CPU even though nothing is being compiled. While torch._dynamo has never been imported
# nothing can be compiling, so the implementation is called directly; from the first call after
# torch._dynamo is loaded (by torch.compile or anything else) torch's own disable wrapper is built and
# used, as before. torch caches that wrapper on the wrapped function as `__dynamo_disable`; where a
# torch version stores it differently this does nothing (only the cold start is slower).
_DISABLE_ATTR = "__dynamo_disable"


def _lazy_dynamo_disable(opdef):
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


# ------------------------------------------------------------------------------ definition
class Backward:
    """The backward half of an op definition.

    schema: of `<name>_backward` (last argument `str backend`); impl / fake: its eager body and fake.
    rule(bwd, inputs, *grads): the forward inputs' gradients (one per input before `backend`, None where
        there is none) from the forward's `inputs` (as kept) and the output gradients (None for an output
        that received none); `bwd` calls the backward op.
    keep(inputs): what the backward needs of the forward inputs, by position (default: all of them);
        e.g. a linear op keeps only an input's shape. Tensors among them are saved for backward.
    """

    def __init__(self, schema, impl, fake, rule, keep=None):
        self.schema, self.impl, self.fake, self.rule, self.keep = schema, impl, fake, rule, keep


class OpDefinition:
    """A defined op: `op` (the registered forward), `backward_op`, and the public call with validation."""

    def __init__(self, name, op, backward_op, check):
        self.name, self.op, self.backward_op, self.check = name, op, backward_op, check

    def __call__(self, *args, backend=None):
        """Validate `args` (the schema's arguments before `backend`) and run the op with `backend` resolved
        (None: the process setting)."""
        self.check(*args)
        return self.call_validated(*args, backend=backend)

    def call_validated(self, *args, backend=None):
        """Run the op on arguments the caller has just validated with `check` (the body skips its check)."""
        backend = resolve(backend)
        if torch.compiler.is_compiling():
            return self.op(*args, backend)  # the graph's op is validated by its fake when traced
        _validated.name = self.name
        try:
            return self.op(*args, backend)
        finally:
            _validated.name = None


def _custom_op(name, impl, fake, schema):
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def define_op(name, schema, *, impl, fake, check, backward):
    """Register `leanvae::<name>` and `leanvae::<name>_backward`; returns the `OpDefinition`.

    schema: "(Tensor x, ..., str backend) -> ..." of the forward; impl(*args) its eager body (args as in the
    schema, backend last; called after validation); fake(*args) its outputs' metadata (called after
    validation); check(*args without backend) raises a clear ValueError/TypeError for bad arguments;
    backward: a `Backward`.
    """
    def checked_impl(*args):
        if not _take_mark(name):
            check(*args[:-1])
        return impl(*args)

    def checked_fake(*args):
        check(*args[:-1])
        return fake(*args)

    op = _custom_op(name, checked_impl, checked_fake, schema)
    bwd = _custom_op(name + "_backward", backward.impl, backward.fake, backward.schema)
    n_args = len(op._opoverload._schema.arguments) - 1
    keep = backward.keep or (lambda inputs: inputs)

    def setup(ctx, inputs, output):
        kept = keep(inputs)
        ctx.tensor_pos = [i for i, a in enumerate(kept) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*(kept[i] for i in ctx.tensor_pos))
        ctx.kept = [None if isinstance(a, torch.Tensor) else a for a in kept]

    def gradient(ctx, *grads):
        inputs = list(ctx.kept)
        for i, t in zip(ctx.tensor_pos, ctx.saved_tensors):
            inputs[i] = t
        result = tuple(backward.rule(bwd, inputs, *grads))
        if len(result) != n_args:
            raise AssertionError(f"{name}: the gradient rule returned {len(result)} gradients for {n_args} inputs")
        return result + (None,)  # backend

    def refuse(ctx, *grads):
        raise double_backward_error(f"{NAMESPACE}::{name}_backward")

    for opdef, fn, ctx_setup in ((op, gradient, setup), (bwd, refuse, None)):
        opdef.register_autograd(fn, setup_context=ctx_setup)
        _refuse_forward_ad(opdef)
        _lazy_dynamo_disable(opdef)
    return OpDefinition(name, op, bwd, check)
