"""The model's feed-forward (LayerNorm -> Linear(D, 2I) -> GEGLU -> Dropout -> Linear(I, D)), laid out for
fast GEMMs, with ResNAF's residual folded into the second GEMM.

The published inner width I = int(4 * 2/3 * D) is 1365 for D = 512 (341 for 128): GEMMs of N = 2730 or
K = 1365 fall on slow paths (on a 2-core AVX2 CPU, MKL runs the 512 -> 2730 product at 85 GFLOP/s and
the same product padded to N = 2752 at 137 GFLOP/s; in 16-bit dtypes such rows are not 16-byte aligned
for tensor-core GEMMs either). So each GEGLU half is padded with zero weight rows to a multiple of 32
(and the second weight with zero columns): the pad columns hold gelu(0) * 0 = 0 and add exact zeros, so
the function is unchanged and results equal the reference to float32 rounding. The residual `x + ffd(x)`
becomes one `addmm`. The weights are padded on every call (a copy of ~8 MB at D = 512, about 1% of the
GEMM time) instead of being cached, so autograd, weight updates and torch.compile need no special care.

Without autograd (inference) the tokens go through in chunks whose widest intermediate (the first GEMM's
output, 2I values a token) stays under CHUNK_BYTES, writing into one preallocated output: at 1080p that
intermediate is ~0.9 GB in bfloat16 for the whole clip, the model's largest tensor. On the CPU the budget
also keeps it under glibc's 32 MB mmap threshold, so the buffers are reused from the heap instead of being
page-faulted in on every call (measured here: a fresh 41 MB tensor costs ~20 ms of page faults, a reused
one ~2 ms to fill). Every token's arithmetic is the same in a chunk as in the whole.

The GEGLU between the GEMMs runs as one fused op (leanvae_kernels.geglu: reads the first GEMM's output once,
writes the activation once) when a fused backend of that op can run on the device and dtype; otherwise as the
torch expression `F.gelu(gate) * value`.

    ffd_apply(ffd, x, residual)     ffd(x), or x + ffd(x) when residual; fused when `ffd` is recognised

The feed-forward is a plain nn.Sequential, whose class is torch's: it is never patched itself; the fused
NAF/ResNAF forwards (leanvae/fused/peg3d.py) call ffd_apply on their `ffd_layer` children.
"""
import torch
import torch.nn.functional as F
from torch import nn

from leanvae_kernels import _backend, geglu
from leanvae_kernels.ops.geglu import _fwd as _geglu_backends

PAD = 32  # pad the GEGLU inner width to a multiple of this
CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 256 << 20}  # inference: budget for one chunk's first-GEMM output


def is_ffd(m):
    """The published feed-forward Sequential: LayerNorm, Linear(D, 2I, bias=False), GEGLU, Dropout,
    Linear(I, D, bias=False)."""
    if not isinstance(m, nn.Sequential) or len(m) != 5:
        return False
    ln, l1, geglu, drop, l2 = (m[i] for i in range(5))
    return (
        isinstance(ln, nn.LayerNorm) and isinstance(l1, nn.Linear) and isinstance(l2, nn.Linear)
        and isinstance(drop, nn.Dropout) and type(geglu).__name__ == "GEGLU" and not list(geglu.parameters())
        and l1.bias is None and l2.bias is None and ln.elementwise_affine
        and tuple(ln.normalized_shape) == (l1.in_features,) and l1.out_features == 2 * l2.in_features
        and l2.out_features == l1.in_features
    )


def _padded_weights(l1, l2, inner):
    p = -(-inner // PAD) * PAD
    w1, w2 = l1.weight, l2.weight
    if p != inner:
        d = w1.shape[1]
        w1 = F.pad(w1.view(2, inner, d), (0, 0, 0, p - inner)).view(2 * p, d)
        w2 = F.pad(w2, (0, p - inner))
    return w1, w2, p


def _geglu_backend(requested, device_type, dtype):
    """The fused backend for the GEGLU op, or None (then the torch expression runs). requested: "auto" picks
    the first fused backend available for the device and dtype; an explicit fused backend is used where the
    op has it and it can run ("cuda" has no GEGLU kernel: the torch expression then); "reference" -> None."""
    if device_type == "cpu" and dtype in (torch.float32, torch.float64):
        # Measured on the 2-core CPU (benchmarks/NOTES.md, GEGLU): inside the feed-forward's 16 MB chunks the op
        # is compute-bound and ran at 0.77-0.83x the speed of torch's vectorised GELU + mul_ in float32 (one
        # thread), and the fused float32 encode + decode at 0.98x with it; so the torch expression there. The
        # op is kept for 16-bit CPU inputs (1.28-1.30x) and on GPUs (one pass over U instead of two and a half).
        return None
    if requested == "auto":  # the op's own choice (and its warning when a native module should be there)
        chosen = _geglu_backends.choose("auto", device_type, dtype)
        return None if chosen == "reference" else chosen
    if requested != "reference" and _geglu_backends.status(requested, device_type, dtype)[0]:
        return requested
    return None


# A pure function of its arguments and the build: torch.compile evaluates it once when tracing (as
# _backend._scoped_choice) instead of tracing the loader behind status().
_geglu_backend._dynamo_marked_constant = True


def _geglu(u, p, backend, inplace=False):
    """value * gelu(gate) of u = [value | gate] (N, 2p), fused when a backend can run it; `inplace`: the torch
    expression multiplies into gelu's output (no autograd), saving a buffer."""
    fused = _geglu_backend(_backend.resolve(backend), u.device.type, u.dtype)
    if fused is not None:
        return geglu(u, backend=fused)
    g = F.gelu(u[..., p:])
    return g.mul_(u[..., :p]) if inplace else g * u[..., :p]


def ffd_apply(ffd, x, residual=False, chunk_bytes=None, backend=None):
    """ffd(x) (or x + ffd(x)), with padded GEMMs and the residual in the second GEMM when `ffd` is the
    published feed-forward and its dropout is inactive; otherwise the module itself. Without autograd,
    tokens run in chunks of at most `chunk_bytes` (default CHUNK_BYTES[device]) of first-GEMM output.
    backend: for the GEGLU op (None: the process setting)."""
    if not is_ffd(ffd) or (ffd[3].training and ffd[3].p > 0):
        return x + ffd(x) if residual else ffd(x)
    ln, l1, l2 = ffd[0], ffd[1], ffd[4]
    d = x.shape[-1]
    w1, w2, p = _padded_weights(l1, l2, l2.in_features)
    autocast = torch.is_autocast_enabled(x.device.type)
    lead = x.shape[:-1]
    xt = x.reshape(-1, d)
    n = xt.shape[0]
    budget = chunk_bytes if chunk_bytes is not None else CHUNK_BYTES.get(x.device.type, CHUNK_BYTES["cuda"])
    rows = max(1, budget // (2 * p * x.element_size()))
    if torch.is_grad_enabled() or autocast or n <= rows:
        return _ffd_rows(ln, w1, w2, p, xt, residual, autocast, backend=backend).view(*lead, d)
    out = torch.empty(n, d, dtype=x.dtype, device=x.device)
    for i in range(0, n, rows):
        _ffd_rows(ln, w1, w2, p, xt[i : i + rows], residual, False, out=out[i : i + rows], backend=backend)
    return out.view(*lead, d)


def _ffd_rows(ln, w1, w2, p, x, residual, autocast, out=None, backend=None):
    """The feed-forward of token rows x (N, D): LayerNorm, padded GEMM, GEGLU, GEMM (+ x folded in)."""
    h = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    u = F.linear(h, w1)
    if out is not None:  # chunked inference (no autograd, never under autocast): one buffer fewer
        g = _geglu(u, p, backend, inplace=True)
        return torch.addmm(x, g, w2.t(), out=out) if residual else torch.mm(g, w2.t(), out=out)
    g = _geglu(u, p, backend)
    if residual and not autocast:
        return torch.addmm(x, g, w2.t())
    # Under autocast the model adds a float32 x to a low-precision ffd output; addmm would do it in the
    # autocast dtype, so keep the addition separate there.
    y = F.linear(g, w2)
    return x + y if residual else y
