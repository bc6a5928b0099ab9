"""GEGLU: `value * gelu(gate)` in one pass over `u = [value | gate]`, the feed-forward's activation.

    geglu(u) = u[..., :p] * gelu(u[..., p:])      u: (..., 2p) -> (..., p), exact (erf) GELU

The model's `GEGLU` module (`x, gate = x.chunk(2, -1); F.gelu(gate) * x`) reads the gate, writes gelu(gate),
reads it back with the value and writes the product: 2.5 half-widths of u moved; the fused op reads u once
and writes the result (1.5). The backward writes grad_u = [grad * gelu(gate) | grad * value * gelu'(gate)]
in one pass as well.

Chain of names (see CRAFT.md): `_geglu_{fwd,bwd}_kernel` (Triton) / `geglu_{fwd,bwd}_cpu` -> native kernels
"geglu_fwd" / "geglu_bwd" / Triton launchers `geglu_fwd` / `geglu_bwd` -> `torch.ops.leanvae.geglu`
(and `geglu_backward`) -> `geglu()` below -> the fused feed-forward (leanvae/fused/ffd.py).
"""
import torch
import torch.nn.functional as F

from .. import _native
from .._backend import OpBackends
from ._common import ALL_DTYPES, GPU_DTYPES, acc_dtype, check_tensor, describe, vjp
from ._define import Backward, define_op


def geglu_reference(u):
    """The spec: `u[..., :p] * gelu(u[..., p:])` (the model's expression), computed in float32 (float64 for
    float64) and rounded once to u's dtype. u: (..., 2p) -> contiguous (..., p)."""
    acc = acc_dtype(u.dtype)
    value, gate = u.to(acc).chunk(2, dim=-1)
    return (F.gelu(gate) * value).to(u.dtype).contiguous()


def _check_geglu(u):
    op = "geglu"
    check_tensor(op, "u", u)
    if u.ndim == 0:
        raise ValueError(f"{op}: u must have at least one dimension (..., 2p), got a 0-dim tensor")
    if u.shape[-1] % 2:
        raise ValueError(f"{op}: u's last dimension must be even (..., 2p) = [value | gate], got {describe(u)}")


def _rows(u):
    """u as a (N, 2p) view (a copy only where no such view exists) with unit column stride."""
    u2 = u.reshape(-1, u.shape[-1])
    if u2.shape[1] > 1 and u2.stride(1) != 1:
        u2 = u2.contiguous()  # e.g. a transposed view: copied once, never misread
    return u2


_fwd = OpBackends("geglu")
_bwd = OpBackends("geglu_backward")


@_fwd.register("reference", ALL_DTYPES)
def _(u):
    return geglu_reference(u)


@_bwd.register("reference", ALL_DTYPES)
def _(grad, u):
    (gu,) = vjp(geglu_reference, (u.to(acc_dtype(u.dtype)),), grad.to(acc_dtype(u.dtype)))
    return gu.to(u.dtype)


def _native_impls(backend, dtypes):
    @_fwd.register(backend, dtypes)
    def _(u):
        u2 = _rows(u)
        out = torch.empty(u2.shape[0], u2.shape[1] // 2, device=u.device, dtype=u.dtype)
        if out.numel():
            _native.run(backend, "geglu_fwd", [u2, out])
        return out

    @_bwd.register(backend, dtypes)
    def _(grad, u):
        u2 = _rows(u)
        grad_u = torch.empty(u2.shape, device=u.device, dtype=u.dtype)
        if grad_u.numel():
            _native.run(backend, "geglu_bwd", [_rows(grad), u2, grad_u])
        return grad_u


_native_impls("cpu", ALL_DTYPES)


@_fwd.register("triton", GPU_DTYPES)
def _(u):
    from ..triton.geglu import geglu_fwd

    return geglu_fwd(_rows(u))


@_bwd.register("triton", GPU_DTYPES)
def _(grad, u):
    from ..triton.geglu import geglu_bwd

    return geglu_bwd(_rows(grad), _rows(u))


def _geglu_impl(u, backend):
    out = _fwd(backend, u.device, u.dtype, u)
    return out.view(*u.shape[:-1], u.shape[-1] // 2)


def _geglu_backward_impl(grad, u, backend):
    return _bwd(backend, u.device, u.dtype, grad.to(u.dtype), u).view(u.shape)


_geglu = define_op(
    "geglu", "(Tensor u, str backend) -> Tensor",
    impl=_geglu_impl,
    fake=lambda u, backend: u.new_empty((*u.shape[:-1], u.shape[-1] // 2)),
    check=_check_geglu,
    backward=Backward(
        "(Tensor grad, Tensor u, str backend) -> Tensor",
        impl=_geglu_backward_impl,
        fake=lambda grad, u, backend: u.new_empty(u.shape),
        rule=lambda bwd, inputs, grad: (bwd(grad, *inputs),),
    ),
)


def geglu(u, *, backend=None):
    """`u[..., :p] * gelu(u[..., p:])` (exact erf GELU) in one pass. u: (..., 2p), any strides, float32,
    float16, bfloat16 or float64 (16-bit inputs computed in float32).

    Returns a contiguous (..., p) tensor of u's dtype. `backend`: None (the process setting), "auto",
    "cuda", "triton", "cpu" or "reference" (there is no CUDA C++ kernel: "auto" on a GPU runs Triton).
    """
    return _geglu(u, backend=backend)
