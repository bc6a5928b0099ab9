"""ISTA-Net+ bottleneck ops: the soft threshold and the gradient step.

    soft_threshold(x, theta) = sign(x) * relu(|x| - theta)        x: any shape, theta: one element
    ista_step(r, y, phi, w)  = r - w * ((r @ phi.T - y) @ phi)     r: (N, D), y: (N, d), phi: (d, D), w: one element

Chain of names (see CRAFT.md): `_soft_threshold_fwd_kernel` (Triton, CUDA) / `soft_threshold_fwd_cpu`
-> native kernel "soft_threshold_fwd" / Triton launcher `soft_threshold_fwd` -> `torch.ops.leanvae.soft_threshold`
-> `soft_threshold()` below -> the fused ISTA module.
"""
import torch
import torch.nn.functional as F

from .. import _native
from .._backend import OpBackends, resolve
from ._common import ALL_DTYPES, GPU_DTYPES, acc_dtype, check_same_device, check_scalar, check_tensor, vjp

# Elements per partial sum of grad_theta. Fixed, so the reduction order (and result) does not depend
# on the thread count or the backend's launch shape. Must match the kernels' argument.
THETA_PARTIAL_BLOCK = 4096


# ----------------------------------------------------------------------------------- soft threshold
def soft_threshold_reference(x, theta):
    """The spec: `sign(x) * relu(|x| - theta)`, computed in float32 (float64 for float64).

    Output dtype is `torch.result_type(x, theta)`, as in the model's expression (a float32 theta of
    shape (1,) promotes a bfloat16 x, as under autocast).
    """
    out_dtype = torch.result_type(x, theta)
    acc = acc_dtype(out_dtype)
    xf = x.to(acc)
    return torch.mul(torch.sign(xf), F.relu(torch.abs(xf) - theta.to(acc).reshape(()))).to(out_dtype)


def _check_soft_threshold(x, theta):
    op = "soft_threshold"
    check_tensor(op, "x", x)
    check_scalar(op, "theta", theta)
    check_same_device(op, [("x", x), ("theta", theta)])


def _promote(x, theta):
    """x in the output dtype, contiguous (a non-contiguous x is copied once)."""
    return x.to(torch.result_type(x, theta)).contiguous()


_st_fwd = OpBackends("soft_threshold")
_st_bwd = OpBackends("soft_threshold_backward")


@_st_fwd.register("reference", ALL_DTYPES)
def _(x, theta):
    return soft_threshold_reference(x, theta)


@_st_bwd.register("reference", ALL_DTYPES)
def _(grad, x, theta):
    gx, gt = vjp(soft_threshold_reference, (x, theta), grad)
    return gx.to(x.dtype), gt.to(theta.dtype)


def _native_impls(backend, dtypes):
    @_st_fwd.register(backend, dtypes)
    def _(x, theta):
        out = torch.empty_like(x)
        _native.run(backend, "soft_threshold_fwd", [x, theta, out])
        return out

    @_st_bwd.register(backend, dtypes)
    def _(grad, x, theta):
        grad_x = torch.empty_like(x)
        partials = torch.empty(max(1, -(-x.numel() // THETA_PARTIAL_BLOCK)), device=x.device, dtype=acc_dtype(x.dtype))
        _native.run(backend, "soft_threshold_bwd", [grad, x, theta, grad_x, partials], ints=[THETA_PARTIAL_BLOCK])
        return grad_x, partials.sum().neg().to(theta.dtype).reshape(theta.shape)


_native_impls("cpu", ALL_DTYPES)
_native_impls("cuda", GPU_DTYPES)


@_st_fwd.register("triton", GPU_DTYPES)
def _(x, theta):
    from ..triton.ista import soft_threshold_fwd

    return soft_threshold_fwd(x, theta)


@_st_bwd.register("triton", GPU_DTYPES)
def _(grad, x, theta):
    from ..triton.ista import soft_threshold_bwd

    grad_x, partials = soft_threshold_bwd(grad, x, theta, THETA_PARTIAL_BLOCK)
    return grad_x, partials.sum().neg().to(theta.dtype).reshape(theta.shape)


@torch.library.custom_op("leanvae::soft_threshold", mutates_args=())
def _soft_threshold_op(x: torch.Tensor, theta: torch.Tensor, backend: str) -> torch.Tensor:
    _check_soft_threshold(x, theta)
    x = _promote(x, theta)
    return _st_fwd(backend, x.device, x.dtype, x, theta)


@_soft_threshold_op.register_fake
def _(x, theta, backend):
    _check_soft_threshold(x, theta)
    return x.new_empty(x.shape, dtype=torch.result_type(x, theta))


@torch.library.custom_op("leanvae::soft_threshold_backward", mutates_args=())
def _soft_threshold_backward_op(
    grad: torch.Tensor, x: torch.Tensor, theta: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    xp = _promote(x, theta)
    grad_x, grad_theta = _st_bwd(backend, xp.device, xp.dtype, grad.to(xp.dtype).contiguous(), xp, theta)
    return grad_x.to(x.dtype), grad_theta


@_soft_threshold_backward_op.register_fake
def _(grad, x, theta, backend):
    return x.new_empty(x.shape), theta.new_empty(theta.shape)


def _st_setup(ctx, inputs, output):
    x, theta, backend = inputs
    ctx.save_for_backward(x, theta)
    ctx.backend = backend


def _st_backward(ctx, grad):
    x, theta = ctx.saved_tensors
    grad_x, grad_theta = torch.ops.leanvae.soft_threshold_backward(grad, x, theta, ctx.backend)
    return grad_x, grad_theta, None


_soft_threshold_op.register_autograd(_st_backward, setup_context=_st_setup)


def soft_threshold(x, theta, *, backend=None):
    """`sign(x) * relu(|x| - theta)` in one pass. x: any shape; theta: one element (learnable).

    Returns a contiguous tensor of dtype `torch.result_type(x, theta)`. `backend`: None (the process
    setting), "auto", "cuda", "triton", "cpu" or "reference".
    """
    _check_soft_threshold(x, theta)
    return torch.ops.leanvae.soft_threshold(x, theta, resolve(backend))


# --------------------------------------------------------------------------------------- ISTA step
def ista_step_reference(r, y, phi, w):
    """The spec: `r - w * ((r @ phi.T - y) @ phi)` in float32 (float64 for float64); dtype of r.

    r: (N, D), y: (N, d), phi: (d, D), w: one element.
    """
    acc = acc_dtype(r.dtype)
    rf, yf, pf = r.to(acc), y.to(acc), phi.to(acc)
    return (rf - w.to(acc).reshape(()) * ((rf @ pf.T - yf) @ pf)).to(r.dtype)


def _check_ista_step(r, y, phi, w):
    op = "ista_step"
    check_tensor(op, "r", r, ndim=2, layout="(N, D)")
    check_tensor(op, "y", y, ndim=2, layout="(N, d)")
    check_tensor(op, "phi", phi, ndim=2, layout="(d, D)")
    check_scalar(op, "w", w)
    check_same_device(op, [("r", r), ("y", y), ("phi", phi), ("w", w)])
    n, big_d = r.shape
    if phi.shape[1] != big_d:
        raise ValueError(f"ista_step: phi must be (d, D) with D = r.shape[1] = {big_d}, got phi shape {tuple(phi.shape)}")
    if tuple(y.shape) != (n, phi.shape[0]):
        raise ValueError(f"ista_step: y must be (N, d) = ({n}, {phi.shape[0]}), got shape {tuple(y.shape)}")
    for name, t in (("y", y), ("phi", phi)):
        if t.dtype != r.dtype:
            raise TypeError(f"ista_step: {name} has dtype {t.dtype} but r has dtype {r.dtype}; they must match")


_step_fwd = OpBackends("ista_step")
_step_bwd = OpBackends("ista_step_backward")


@_step_fwd.register("reference", ALL_DTYPES)
def _(r, y, phi, w):
    return ista_step_reference(r, y, phi, w)


@_step_bwd.register("reference", ALL_DTYPES)
def _(grad, r, y, phi, w):
    gr, gy, gphi, gw = vjp(ista_step_reference, (r, y, phi, w), grad)
    return gr.to(r.dtype), gy.to(y.dtype), gphi.to(phi.dtype), gw.to(w.dtype)


@torch.library.custom_op("leanvae::ista_step", mutates_args=())
def _ista_step_op(r: torch.Tensor, y: torch.Tensor, phi: torch.Tensor, w: torch.Tensor, backend: str) -> torch.Tensor:
    _check_ista_step(r, y, phi, w)
    return _step_fwd(backend, r.device, r.dtype, r, y, phi, w)


@_ista_step_op.register_fake
def _(r, y, phi, w, backend):
    _check_ista_step(r, y, phi, w)
    return r.new_empty(r.shape)


@torch.library.custom_op("leanvae::ista_step_backward", mutates_args=())
def _ista_step_backward_op(
    grad: torch.Tensor, r: torch.Tensor, y: torch.Tensor, phi: torch.Tensor, w: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_step_bwd(backend, r.device, r.dtype, grad, r, y, phi, w))


@_ista_step_backward_op.register_fake
def _(grad, r, y, phi, w, backend):
    return r.new_empty(r.shape), y.new_empty(y.shape), phi.new_empty(phi.shape), w.new_empty(w.shape)


def _step_setup(ctx, inputs, output):
    r, y, phi, w, backend = inputs
    ctx.save_for_backward(r, y, phi, w)
    ctx.backend = backend


def _step_backward(ctx, grad):
    r, y, phi, w = ctx.saved_tensors
    gr, gy, gphi, gw = torch.ops.leanvae.ista_step_backward(grad, r, y, phi, w, ctx.backend)
    return gr, gy, gphi, gw, None


_ista_step_op.register_autograd(_step_backward, setup_context=_step_setup)


def ista_step(r, y, phi, w, *, backend=None):
    """One ISTA gradient step `r - w * ((r @ phi.T - y) @ phi)`, fused per token.

    r: (N, D), y: (N, d), phi: (d, D) (same dtype as r), w: one element. Returns (N, D), dtype of r.
    """
    _check_ista_step(r, y, phi, w)
    return torch.ops.leanvae.ista_step(r, y, phi, w, resolve(backend))
