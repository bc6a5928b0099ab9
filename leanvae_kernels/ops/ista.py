"""ISTA-Net+ bottleneck ops: the soft threshold and the gradient step.

    soft_threshold(x, theta) = sign(x) * relu(|x| - theta)        x: any shape, theta: one element
    ista_step(r, y, phi, w)  = r - w * ((r @ phi.T - y) @ phi)     r: (N, D), y: (N, d), phi: (d, D), w: one element
    ista_residual_step(r, u, y, phi, w) = ista_step(r + u, y, phi, w)      the model's residual add, fused
    ista_init_step(y, Q, phi, w)        = ista_step(y @ Q.T, y, phi, w)    the model's first step, Q: (D, d)

Chain of names (see CRAFT.md): `_soft_threshold_fwd_kernel` (Triton, CUDA) / `soft_threshold_fwd_cpu`
-> native kernel "soft_threshold_fwd" / Triton launcher `soft_threshold_fwd` -> `torch.ops.leanvae.soft_threshold`
-> `soft_threshold()` below -> the fused ISTA module (leanvae/fused/ista.py). The three step ops
share `_ista_step_{fwd,bwd}_kernel` (Triton, CUDA) / `ista_step_{fwd,bwd}_cpu` -> native kernels
"ista_step_fwd" / "ista_step_bwd" (an int `mode` selects the input) -> `torch.ops.leanvae.ista_*step`.
"""

import functools

import torch
import torch.nn.functional as F

from .. import _native
from .._backend import OpBackends
from ._common import (ALL_DTYPES, GPU_DTYPES, acc_dtype, check_same_device, check_scalar, check_tensor,
                      sm_count, vjp)
from ._define import Backward, define_op

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


def _soft_threshold_impl(x, theta, backend):
    xp = _promote(x, theta)
    # Elementwise: the kernels see one flat contiguous run and theta as one element, so any rank of either
    # works (the native shape/stride descriptions hold at most 8 dims).
    return _st_fwd(backend, xp.device, xp.dtype, xp.reshape(-1), theta.reshape(1)).view(xp.shape)


def _soft_threshold_backward_impl(grad, x, theta, backend):
    xp = _promote(x, theta)
    flat_grad = grad.to(xp.dtype).contiguous().reshape(-1)
    grad_x, grad_theta = _st_bwd(backend, xp.device, xp.dtype, flat_grad, xp.reshape(-1), theta.reshape(1))
    return grad_x.view(x.shape).to(x.dtype), grad_theta.reshape(theta.shape)


_soft_threshold = define_op(
    "soft_threshold", "(Tensor x, Tensor theta, str backend) -> Tensor",
    impl=_soft_threshold_impl,
    fake=lambda x, theta, backend: x.new_empty(x.shape, dtype=torch.result_type(x, theta)),
    check=_check_soft_threshold,
    backward=Backward(
        "(Tensor grad, Tensor x, Tensor theta, str backend) -> (Tensor, Tensor)",
        impl=_soft_threshold_backward_impl,
        fake=lambda grad, x, theta, backend: (x.new_empty(x.shape), theta.new_empty(theta.shape)),
        rule=lambda bwd, inputs, grad: bwd(grad, *inputs),
    ),
)


def soft_threshold(x, theta, *, backend=None):
    """`sign(x) * relu(|x| - theta)` in one pass. x: any shape; theta: one element (learnable), any rank.

    Returns a contiguous tensor of x's shape and dtype `torch.result_type(x, theta)`. `backend`: None (the
    process setting), "auto", "cuda", "triton", "cpu" or "reference".
    """
    return _soft_threshold(x, theta, backend=backend)


# --------------------------------------------------------------------------------------- ISTA step
# Three ops share one kernel per backend, which differs only in where the step's input x comes from:
#   ista_step(r, y, phi, w)             x = r
#   ista_residual_step(r, u, y, phi, w) x = r + u  (the model's `recon_r + naf_out`, fused into the next step)
#   ista_init_step(y, Q, phi, w)        x = y @ Q.T (the model's first reconstruction, never stored)
# and then `x - w * ((x @ phi.T - y) @ phi)`. x is rounded to the input dtype before the step, as the
# unfused model stores it, so each fused op equals the unfused chain up to the step's own rounding.
_MODES = {"step": 0, "residual": 1, "init": 2}
ISTA_MAX_D = 64  # the kernels keep d per-token values on chip; larger d runs the reference
# Rows per partial sum of grad_phi and grad_w on the CPU. Fixed, so the reduction order (and result)
# does not depend on the thread count. Must match the kernels' argument.
ISTA_PARTIAL_ROWS = 256
# On a GPU (cuda and triton) each partial is one block/program, so the partials are sized from the SM
# count: about ISTA_PARTIALS_PER_SM per SM (a fixed 256 rows gave 79 blocks at 20,000 rows for an H100/H200's
# 132 SMs; these give 250, at most 2 per SM). Fixed for a given device and row count, so results are
# deterministic on a device and differ between GPU models only by float rounding.
ISTA_PARTIALS_PER_SM = 2
ISTA_ROW_MULTIPLE = 16  # the Triton kernel's BLOCK_N; the CUDA kernel needs a multiple of 4


def ista_partial_rows(n, sms):
    """Rows per partial for n rows on a GPU with `sms` SMs: a multiple of ISTA_ROW_MULTIPLE, so that
    ceil(n / rows) <= ISTA_PARTIALS_PER_SM * sms partials (as many as that allows)."""
    if sms < 1:
        raise ValueError(f"ista_partial_rows: sms must be >= 1, got {sms}")
    target = ISTA_PARTIALS_PER_SM * sms
    rows = -(-max(n, 1) // target)
    return -(-rows // ISTA_ROW_MULTIPLE) * ISTA_ROW_MULTIPLE


def ista_step_reference(r, y, phi, w):
    """The spec: `r - w * ((r @ phi.T - y) @ phi)` in float32 (float64 for float64); dtype of r.

    r: (N, D), y: (N, d), phi: (d, D), w: one element.
    """
    acc = acc_dtype(r.dtype)
    rf, yf, pf = r.to(acc), y.to(acc), phi.to(acc)
    return (rf - w.to(acc).reshape(()) * ((rf @ pf.T - yf) @ pf)).to(r.dtype)


def ista_residual_step_reference(r, u, y, phi, w):
    """`ista_step(r + u, ...)`, with `r + u` rounded to the dtype of r. r, u: (N, D)."""
    acc = acc_dtype(r.dtype)
    return ista_step_reference((r.to(acc) + u.to(acc)).to(r.dtype), y, phi, w)


def ista_init_step_reference(y, Q, phi, w):
    """`ista_step(y @ Q.T, y, phi, w)`, with `y @ Q.T` rounded to the dtype of y. y: (N, d), Q: (D, d)."""
    acc = acc_dtype(y.dtype)
    return ista_step_reference((y.to(acc) @ Q.to(acc).T).to(y.dtype), y, phi, w)


def _check_rows(op, name, t, n, big_d):
    check_tensor(op, name, t, ndim=2, layout="(N, D)")
    if tuple(t.shape) != (n, big_d):
        raise ValueError(f"{op}: {name} must be (N, D) = ({n}, {big_d}), got shape {tuple(t.shape)}")


def _check_step(op, y, phi, w, rows=(), q=None):
    """Shared checks. rows: (name, tensor) pairs of (N, D) inputs; q: Q for ista_init_step."""
    check_tensor(op, "y", y, ndim=2, layout="(N, d)")
    check_tensor(op, "phi", phi, ndim=2, layout="(d, D)")
    check_scalar(op, "w", w)
    named = list(rows) + [("y", y), ("phi", phi), ("w", w)] + ([("Q", q)] if q is not None else [])
    for name, t in rows:
        check_tensor(op, name, t, ndim=2, layout="(N, D)")
    if q is not None:
        check_tensor(op, "Q", q, ndim=2, layout="(D, d)")
    check_same_device(op, named)
    d, big_d = phi.shape
    n = y.shape[0]
    if rows:
        first_name, first = rows[0]
        n = first.shape[0]
        if first.shape[1] != big_d:
            raise ValueError(f"{op}: phi must be (d, D) with D = {first_name}.shape[1] = {first.shape[1]}, got phi shape {tuple(phi.shape)}")
        for name, t in rows[1:]:
            _check_rows(op, name, t, n, big_d)
    if tuple(y.shape) != (n, d):
        raise ValueError(f"{op}: y must be (N, d) = ({n}, {d}), got shape {tuple(y.shape)}")
    if q is not None and tuple(q.shape) != (big_d, d):
        raise ValueError(f"{op}: Q must be (D, d) = ({big_d}, {d}), got shape {tuple(q.shape)}")
    ref_name, ref = rows[0] if rows else ("y", y)
    for name, t in named:
        if name not in ("w", ref_name) and t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


def _check_ista_step(r, y, phi, w):
    _check_step("ista_step", y, phi, w, rows=[("r", r)])


def _check_ista_residual_step(r, u, y, phi, w):
    _check_step("ista_residual_step", y, phi, w, rows=[("r", r), ("u", u)])


def _check_ista_init_step(y, Q, phi, w):
    _check_step("ista_init_step", y, phi, w, q=Q)


# Backend implementations: fwd(mode, src, u, y, phi, w) -> out and
# bwd(mode, grad, src, u, y, phi, w) -> (grad_x, grad_y, grad_phi, grad_w), where src is r (modes step
# and residual) or Q (init), u is None outside the residual mode, grad_x is the gradient of x, and
# grad_y covers only y's role as the measurement (the init mode's y @ Q.T term is added by the caller);
# grad_y is returned in the accumulation dtype, so that sum is rounded once.
_step_fwd = OpBackends("ista_step")
_step_bwd = OpBackends("ista_step_backward")
_REFERENCE_STEP = {0: ista_step_reference, 1: ista_residual_step_reference, 2: ista_init_step_reference}


def _mode_inputs(mode, src, u, y, phi, w):
    """Arguments of the mode's reference, in its order."""
    return {0: (src, y, phi, w), 1: (src, u, y, phi, w), 2: (y, src, phi, w)}[mode]


@_step_fwd.register("reference", ALL_DTYPES)
def _(mode, src, u, y, phi, w):
    return _REFERENCE_STEP[mode](*_mode_inputs(mode, src, u, y, phi, w))


def _x_of(mode, src, u, y):
    """The step's input x as the fused kernels see it (used by the reference backward of mode 2)."""
    acc = acc_dtype(y.dtype)
    if mode == 2:
        return (y.to(acc) @ src.to(acc).T).to(y.dtype)
    if mode == 1:
        return (src.to(acc) + u.to(acc)).to(src.dtype)
    return src


@_step_bwd.register("reference", ALL_DTYPES)
def _(mode, grad, src, u, y, phi, w):
    x = _x_of(mode, src, u, y)
    acc = acc_dtype(y.dtype)
    gx, gy, gphi, gw = vjp(ista_step_reference, (x.to(acc), y.to(acc), phi.to(acc), w), grad.to(acc))
    return gx.to(x.dtype), gy, gphi.to(phi.dtype), gw.to(w.dtype)


def _finish_grads(partials_phi, partials_w, phi, w):
    """grad_phi = -w * sum(partials_phi), grad_w = -sum(partials_w), summed in a fixed order."""
    wf = w.to(partials_phi.dtype).reshape(())
    grad_phi = (partials_phi.sum(0) * -wf).to(phi.dtype)
    return grad_phi, partials_w.sum().neg().to(w.dtype).reshape(w.shape)


def _partials(n, d, big_d, device, dtype, rows=ISTA_PARTIAL_ROWS):
    blocks = max(1, -(-n // rows))
    acc = acc_dtype(dtype)
    return torch.empty(blocks, d, big_d, device=device, dtype=acc), torch.empty(blocks, device=device, dtype=acc)


def _cuda_max_smem(device):
    """The device's opt-in shared memory per block, in bytes (what the CUDA launcher checks against)."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


@functools.lru_cache(maxsize=None)
def _cuda_smem_bytes(mode, d, big_d):
    """Shared memory of the larger of the CUDA forward and backward launches for (mode, d, D), as the native
    module computes it for its launchers (csrc/cuda/ista_step_shape.h, asked through `cuda_ista_launch`, not
    re-derived here). The launcher checks the same figure against the device and raises if it does not fit."""
    # Both native modules carry the function (the CPU one too, so the plan can be asked without a GPU).
    mod = _native.module("cuda")[0] or _native.module("cpu")[0]
    if mod is None:
        raise RuntimeError("the CUDA ISTA launch plan needs a native module of leanvae-kernels; none is loaded")
    _, fwd, bwd = mod.cuda_ista_launch(mode, d, big_d)
    return max(fwd, bwd)


def _step_support(backend):
    """`supports` of the step kernels of `backend`: None, or why they cannot run this (d, D) on this device."""
    def supports(mode, *args):
        phi = args[-2]
        d, big_d = phi.shape
        if d > ISTA_MAX_D:
            return f"the fused kernels support d <= {ISTA_MAX_D}, got d = {d}"
        if backend == "triton" and big_d > 4096:
            return f"the triton kernels hold a token row on chip and support D <= 4096, got D = {big_d}"
        if backend == "cuda":
            if big_d > 4096:
                return f"the cuda kernels give each of at most 1024 threads 4 columns: D <= 4096, got D = {big_d}"
            smem, limit = _cuda_smem_bytes(mode, d, big_d), _cuda_max_smem(phi.device)
            if smem > limit:
                return (f"the cuda kernels hold phi{' and Q' if mode == 2 else ''} in shared memory: d = {d}, "
                        f"D = {big_d} needs {smem} bytes, the device allows {limit}")
        return None

    return supports


def _native_step_impls(backend, dtypes):
    @_step_fwd.register(backend, dtypes, supports=_step_support(backend))
    def _(mode, src, u, y, phi, w):
        out = torch.empty(y.shape[0], phi.shape[1], device=y.device, dtype=y.dtype)
        tensors = [src, y, phi, w, out] + ([u] if mode == 1 else [])
        _native.run(backend, "ista_step_fwd", tensors, ints=[mode])
        return out

    @_step_bwd.register(backend, dtypes, supports=_step_support(backend))
    def _(mode, grad, src, u, y, phi, w):
        grad_x = torch.empty_like(grad)
        grad_y = torch.empty(y.shape, device=y.device, dtype=acc_dtype(y.dtype))
        rows = ista_partial_rows(grad.shape[0], sm_count(grad.device)) if backend == "cuda" else ISTA_PARTIAL_ROWS
        part_phi, part_w = _partials(grad.shape[0], phi.shape[0], phi.shape[1], grad.device, grad.dtype, rows)
        tensors = [grad, src, y, phi, w, grad_x, grad_y, part_phi, part_w] + ([u] if mode == 1 else [])
        _native.run(backend, "ista_step_bwd", tensors, ints=[mode, rows])
        return (grad_x, grad_y) + _finish_grads(part_phi, part_w, phi, w)


_native_step_impls("cpu", ALL_DTYPES)
_native_step_impls("cuda", GPU_DTYPES)


@_step_fwd.register("triton", GPU_DTYPES, supports=_step_support("triton"))
def _(mode, src, u, y, phi, w):
    from ..triton.ista import ista_step_fwd

    return ista_step_fwd(mode, src, u, y, phi, w)


@_step_bwd.register("triton", GPU_DTYPES, supports=_step_support("triton"))
def _(mode, grad, src, u, y, phi, w):
    from ..triton.ista import ista_step_bwd

    rows = ista_partial_rows(grad.shape[0], sm_count(grad.device))
    grad_x, grad_y, part_phi, part_w = ista_step_bwd(mode, grad, src, u, y, phi, w, rows)
    return (grad_x, grad_y) + _finish_grads(part_phi, part_w, phi, w)


def _mm_acc(a, b):
    """a @ b with the result in the accumulation dtype (float32 from 16-bit inputs without an extra copy on
    CUDA), never in an autocast dtype (a backward run inside torch.autocast would otherwise round it)."""
    acc = acc_dtype(a.dtype)
    with torch.autocast(a.device.type, enabled=False):
        if a.dtype == acc:
            return torch.mm(a, b)
        if a.is_cuda:
            return torch.mm(a, b, out_dtype=acc)
        return torch.mm(a.to(acc), b.to(acc))


def _prepare(t):
    """Rows may have any row stride; elements within a row must be unit-stride (else copied once)."""
    return t if t.stride(-1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


def _is_empty(y, phi):
    return min(y.shape[0], phi.shape[0], phi.shape[1]) == 0


def _run_fwd(backend, mode, src, u, y, phi, w):
    if _is_empty(y, phi):
        backend = "reference"  # nothing for a kernel to do: the reference returns the right shapes
    elif backend != "reference":
        src = src.contiguous() if mode == 2 else _prepare(src)
        u = _prepare(u) if u is not None else None
        y, phi = _prepare(y), phi.contiguous()
    # w as one element of any rank: the kernels read one value (native shape descriptions hold <= 8 dims).
    return _step_fwd(backend, y.device, y.dtype, mode, src, u, y, phi, w.reshape(1))


def _nonfinite_on_host(w):
    # Read without a device synchronisation only where w lives on the host (the cpu backend, Triton's
    # interpreter); a GPU backward keeps its own association (see `ista_step`).
    return w.device.type == "cpu" and not bool(torch.isfinite(w).all())


def _run_bwd(backend, mode, grad, src, u, y, phi, w):
    grad = grad.to(y.dtype)
    if _is_empty(y, phi) or _nonfinite_on_host(w):
        # Empty: nothing to launch. A non-finite w: the kernels apply w after the (g @ phi^T) product,
        # autograd applies it to g first (w * g, then the products: NaN for inf * 0 and for mixed signs),
        # so the reference's NaN/Inf pattern needs the reference's order.
        backend = "reference"
    elif backend != "reference":
        src = src.contiguous() if mode == 2 else _prepare(src)
        u = _prepare(u) if u is not None else None
        grad, y, phi = _prepare(grad), _prepare(y), phi.contiguous()
    gx, gy, gphi, gw = _step_bwd(backend, y.device, y.dtype, mode, grad, src, u, y, phi, w.reshape(1))
    return gx, gy, gphi, gw.reshape(w.shape)


def _step_fake(rows_like, phi):
    return rows_like.new_empty((rows_like.shape[0], phi.shape[1]))


def _step_grads_fake(grad, first, second, phi, w):
    return first.new_empty(first.shape), second.new_empty(second.shape), phi.new_empty(phi.shape), w.new_empty(w.shape)


# ------------------------------------------------------------------ ista_step: the registered op
def _ista_step_backward_impl(grad, r, y, phi, w, backend):
    gr, gy, gphi, gw = _run_bwd(backend, 0, grad, r, None, y, phi, w)
    return gr, gy.to(y.dtype), gphi, gw


_ista_step = define_op(
    "ista_step", "(Tensor r, Tensor y, Tensor phi, Tensor w, str backend) -> Tensor",
    impl=lambda r, y, phi, w, backend: _run_fwd(backend, 0, r, None, y, phi, w),
    fake=lambda r, y, phi, w, backend: r.new_empty(r.shape),
    check=_check_ista_step,
    backward=Backward(
        "(Tensor grad, Tensor r, Tensor y, Tensor phi, Tensor w, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
        impl=_ista_step_backward_impl,
        fake=lambda grad, r, y, phi, w, backend: _step_grads_fake(grad, r, y, phi, w),
        rule=lambda bwd, inputs, grad: bwd(grad, *inputs),
    ),
)


def ista_step(r, y, phi, w, *, backend=None):
    """One ISTA gradient step `r - w * ((r @ phi.T - y) @ phi)`, fused per token.

    r: (N, D), y: (N, d), phi: (d, D) (same dtype as r), w: one element (any rank). Returns (N, D), dtype
    of r. A non-finite w gives the reference's NaN/Inf pattern forward, and backward where w is on the
    CPU; a GPU backward applies w after its sums, so there a non-finite w may give +-Inf where the
    reference gives NaN (both non-finite).
    """
    return _ista_step(r, y, phi, w, backend=backend)


# --------------------------------------------------------- ista_residual_step: residual add + step
def _ista_residual_step_backward_impl(grad, r, u, y, phi, w, backend):
    """Returns (grad_x, grad_y, grad_phi, grad_w); grad_x is the gradient of both r and u."""
    gx, gy, gphi, gw = _run_bwd(backend, 1, grad, r, u, y, phi, w)
    return gx, gy.to(y.dtype), gphi, gw


def _residual_rule(bwd, inputs, grad):
    r, u, y, phi, w, backend = inputs
    gx, gy, gphi, gw = bwd(grad, *inputs)
    return gx, gx.to(u.dtype), gy, gphi, gw


_ista_residual_step = define_op(
    "ista_residual_step", "(Tensor r, Tensor u, Tensor y, Tensor phi, Tensor w, str backend) -> Tensor",
    impl=lambda r, u, y, phi, w, backend: _run_fwd(backend, 1, r, u, y, phi, w),
    fake=lambda r, u, y, phi, w, backend: r.new_empty(r.shape),
    check=_check_ista_residual_step,
    backward=Backward(
        "(Tensor grad, Tensor r, Tensor u, Tensor y, Tensor phi, Tensor w, str backend) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        impl=_ista_residual_step_backward_impl,
        fake=lambda grad, r, u, y, phi, w, backend: _step_grads_fake(grad, r, y, phi, w),
        rule=_residual_rule,
    ),
)


def ista_residual_step(r, u, y, phi, w, *, backend=None):
    """The residual add and the next ISTA step in one pass: `ista_step(r + u, y, phi, w)`.

    r, u: (N, D) (the model's `recon_r` and NAF output), y: (N, d), phi: (d, D), all of one dtype;
    w: one element. `r + u` is rounded to the dtype before the step, as the unfused model stores it.
    """
    return _ista_residual_step(r, u, y, phi, w, backend=backend)


# -------------------------------------------------------------- ista_init_step: y @ Q.T + step
def _ista_init_step_backward_impl(grad, y, Q, phi, w, backend):
    """Returns (grad_y, grad_Q, grad_phi, grad_w)."""
    gx, gy, gphi, gw = _run_bwd(backend, 2, grad, Q, None, y, phi, w)
    # x = y @ Q.T: its gradient reaches y and Q through two thin GEMMs over the (N, D) grad_x, with float32
    # results, so that each gradient is rounded once.
    gy = (gy + _mm_acc(gx, Q.to(gx.dtype))).to(y.dtype)
    gq = _mm_acc(gx.t(), y.to(gx.dtype)).to(Q.dtype)
    return gy, gq, gphi, gw


_ista_init_step = define_op(
    "ista_init_step", "(Tensor y, Tensor Q, Tensor phi, Tensor w, str backend) -> Tensor",
    impl=lambda y, Q, phi, w, backend: _run_fwd(backend, 2, Q, None, y, phi, w),
    fake=lambda y, Q, phi, w, backend: _step_fake(y, phi),
    check=_check_ista_init_step,
    backward=Backward(
        "(Tensor grad, Tensor y, Tensor Q, Tensor phi, Tensor w, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
        impl=_ista_init_step_backward_impl,
        fake=lambda grad, y, Q, phi, w, backend: _step_grads_fake(grad, y, Q, phi, w),
        rule=lambda bwd, inputs, grad: bwd(grad, *inputs),
    ),
)


def ista_init_step(y, Q, phi, w, *, backend=None):
    """The model's first reconstruction and first ISTA step in one pass: `ista_step(y @ Q.T, y, phi, w)`.

    y: (N, d), Q: (D, d), phi: (d, D), all of one dtype; w: one element. Returns (N, D). `y @ Q.T` is
    rounded to the dtype before the step, as the unfused model stores it; it never goes through memory.
    """
    return _ista_init_step(y, Q, phi, w, backend=backend)
