"""`leanvae_kernels.check()` / `python -m leanvae check`: every op on every fused backend of a device, against
the pure-PyTorch reference, forward and backward, at small, odd and strided shapes, in seconds.

Which backends: on a CUDA device, "cuda" and "triton"; on the CPU, "cpu" (the native module) and "triton"
only when TRITON_INTERPRET=1 is set (Triton's interpreter: slow, and meant for testing the Triton kernels,
which is what this is). A backend that cannot run here (module not built, no Triton) is listed as skipped
with its reason, not as a failure; `python -m leanvae info` says how to fix it.

Bounds (per dtype, relative to the output's scale), the test suite's tolerance table: the kernels
accumulate in float32 and round once to the output dtype, as the reference does, so a fused result and
the reference differ by float32 summation order plus at most one ulp of the output dtype where the two
roundings straddle a boundary (float16: 2^-10 ~ 9.8e-4, bfloat16: 2^-7 ~ 7.8e-3). The error of an
output is max|fused - reference| / max(1, max|reference|); its bound is the table's rtol + atol
(float32 1.1e-5, float16 2e-3, bfloat16 1.6e-2), twice the worst rounding difference. Shapes are small,
so reductions (weight, theta and w gradients) sum few terms and float32 order effects stay far below.
"""
import dataclasses
import math

import torch

from . import _backend
from . import ops as _ops

BOUNDS = {torch.float32: 1e-5 + 1e-6, torch.float16: 1e-3 + 1e-3, torch.bfloat16: 8e-3 + 8e-3, torch.float64: 1e-10 + 1e-12}
DEFAULT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


@dataclasses.dataclass
class Row:
    """One line of the check: op, backend, dtype, direction ("fwd"/"bwd"), the worst error over the cases
    and outputs, its bound, and whether it passed. `note` says why a backend was skipped (then passed is
    True and max_error is None)."""
    op: str
    backend: str
    dtype: str
    direction: str
    max_error: float | None
    bound: float | None
    passed: bool
    note: str = ""


def _strided(t):
    """The same values through a non-contiguous view (every other element of a wider buffer)."""
    out = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)[..., ::2]
    out.copy_(t)
    return out


def _cases(device, dtype):
    """op name -> (public function, [(args, kwargs), ...]): an odd-sized case and the same with its first
    tensor strided. Values are seeded, of order one."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)

    lk = _ops
    table = {
        "haar_dwt3d": (lk.haar_dwt3d, [((rnd(1, 3, 5, 6, 7),), {})]),
        "haar_dwt2d": (lk.haar_dwt2d, [((rnd(2, 3, 1, 5, 7),), {})]),
        "haar_idwt3d": (lk.haar_idwt3d, [((rnd(1, 16, 2, 3, 5),), {})]),
        "haar_idwt2d": (lk.haar_idwt2d, [((rnd(1, 12, 1, 3, 5),), {})]),
        "haar_patch": (lk.haar_patch, [((rnd(1, 3, 5, 6, 7),), {})]),
        "haar_unpatch": (lk.haar_unpatch, [((rnd(1, 12, 1, 3, 5), rnd(1, 24, 2, 3, 5)), {})]),
        "haar_latent_compress": (lk.haar_latent_compress, [((rnd(1, 3, 4, 8, 12), 2), {})]),
        "haar_latent_decompress": (lk.haar_latent_decompress, [((rnd(1, 12, 1, 2, 3), 2), {})]),
        "causal_dwconv3d": (lk.causal_dwconv3d, [
            ((rnd(2, 3, 5, 6, 7), rnd(7, 1, 3, 3, 3, scale=0.3), rnd(7), rnd(2, 2, 5, 6, 7)), {"residual": True}),
            ((rnd(1, 5, 4, 5, 3), rnd(3, 1, 3, 3, 3, scale=0.3), None, None), {"group_size": 2}),
        ]),
        "ista_step": (lk.ista_step, [((rnd(37, 24), rnd(37, 5), rnd(5, 24, scale=0.3), rnd(1, scale=0.2)), {})]),
        "ista_residual_step": (lk.ista_residual_step, [
            ((rnd(37, 24), rnd(37, 24), rnd(37, 5), rnd(5, 24, scale=0.3), rnd(1, scale=0.2)), {})]),
        "ista_init_step": (lk.ista_init_step, [
            ((rnd(37, 5), rnd(24, 5, scale=0.3), rnd(5, 24, scale=0.3), rnd(1, scale=0.2)), {})]),
        "soft_threshold": (lk.soft_threshold, [((rnd(5, 7, 3), rnd(1, scale=0.3).abs()), {})]),
        "geglu": (lk.geglu, [((rnd(5, 26),), {})]),
    }
    for name, (fn, cases) in table.items():
        args, kwargs = cases[0]
        first = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        strided = list(args)
        strided[first] = _strided(args[first])
        cases.append((tuple(strided), kwargs))
    return table


def _outputs(out):
    out = out if isinstance(out, tuple) else (out,)
    return [o for o in out if isinstance(o, torch.Tensor)]


def _run(fn, args, kwargs, backend, grads=None):
    """(outputs, input gradients) of fn(*args, backend=backend); gradients for `grads` (one per output)."""
    leaves = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
    with torch.enable_grad():  # also when called under torch.no_grad()
        outs = _outputs(fn(*leaves, backend=backend, **kwargs))
    if grads is None:
        g = torch.Generator(device="cpu").manual_seed(1)
        grads = [torch.randn(o.shape, generator=g).to(o) for o in outs]
    wrt = [t for t in leaves if isinstance(t, torch.Tensor)]
    got = torch.autograd.grad(outs, wrt, grads, allow_unused=True)
    return [o.detach() for o in outs], [x for x in got if x is not None], grads


def _error(actual, expected):
    """max|actual - expected| / max(1, max|expected|), in float64; equal non-finite values count as equal,
    any other non-finite difference is inf."""
    a, e = actual.double(), expected.double()
    if a.shape != e.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    same = (a == e) | (a.isnan() & e.isnan())
    diff = torch.where(same, torch.zeros_like(a), (a - e).abs())
    finite = e[e.isfinite()]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    worst = diff.max().item()
    return math.inf if math.isnan(worst) else worst / scale


def _fused_backends(device_type):
    if device_type == "cuda":
        return ("cuda", "triton")
    import os

    return ("cpu", "triton") if os.environ.get("TRITON_INTERPRET") == "1" else ("cpu",)


# The three ISTA step ops share one set of kernels, registered as "ista_step".
_SHARED_KERNELS = {"ista_residual_step": "ista_step", "ista_init_step": "ista_step"}


def _ops_by_name():
    by_name = {op.name: op for op in _backend.ALL_OPS}
    return {name: by_name[_SHARED_KERNELS.get(name, name)] for name in list(by_name) + list(_SHARED_KERNELS)}


def resolve_device(device):
    """A torch.device for `device` (None: the current GPU when there is one, else the CPU), or ValueError."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is visible to torch")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def check(device=None, dtypes=DEFAULT_DTYPES, ops=None, backends=None):
    """Run every op (or those named in `ops`) on every fused backend available for `device` (or those in
    `backends`) against the reference backend, forward and backward, for each dtype in `dtypes`.

    device: None (the GPU when there is one, else the CPU), "cpu", "cuda", "cuda:N" or a torch.device.
    Returns a list of `Row` (op, backend, dtype, direction, max_error, bound, passed, note).
    """
    dev = resolve_device(device)
    for dt in dtypes:
        if dt not in BOUNDS:
            raise TypeError(f"dtypes must be among float32, float16, bfloat16, float64, got {dt!r}")
    registry = _ops_by_name()
    rows = []
    per_dtype = {dt: _cases(dev, dt) for dt in dtypes}
    names = list(per_dtype[dtypes[0]]) if dtypes else []
    if ops is not None:
        unknown = sorted(set(ops) - set(names))
        if unknown:
            raise ValueError(f"ops must name ops among {names}, got unknown {unknown}")
        names = [n for n in names if n in ops]
    for name in names:
        for backend in backends or _fused_backends(dev.type):
            for dt in dtypes:
                dname = _DTYPE_NAMES[dt]
                ok, why = registry[name].status(backend, dev.type, dt)
                if not ok:
                    rows.append(Row(name, backend, dname, "fwd+bwd", None, None, True, f"skipped: {why}"))
                    continue
                fn, cases = per_dtype[dt][name]
                err = {"fwd": 0.0, "bwd": 0.0}
                note = ""
                for args, kwargs in cases:
                    try:
                        ref_out, ref_grads, grads = _run(fn, args, kwargs, "reference")
                        out, got_grads, _ = _run(fn, args, kwargs, backend, grads)
                    except Exception as exc:  # a kernel that raises is a failure of this row, not of the check
                        err = {"fwd": math.inf, "bwd": math.inf}
                        note = f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        break
                    fwd_errs = [_error(a, e) for a, e in zip(out, ref_out)]
                    bwd_errs = [_error(a, e) for a, e in zip(got_grads, ref_grads)]
                    if len(out) != len(ref_out):
                        fwd_errs.append(math.inf)
                    if len(got_grads) != len(ref_grads):
                        bwd_errs.append(math.inf)
                    err["fwd"] = max([err["fwd"]] + fwd_errs)
                    err["bwd"] = max([err["bwd"]] + bwd_errs)
                for direction in ("fwd", "bwd"):
                    bound = BOUNDS[dt]
                    rows.append(Row(name, backend, dname, direction, err[direction], bound, err[direction] <= bound, note))
    return rows


def format_rows(rows, quiet=False):
    """One aligned line per op and backend: the worst error relative to its bound over dtypes and directions,
    then PASS or FAIL (the failing dtype/direction named); skipped backends with their reason. quiet: only
    failures and the summary line."""
    groups = {}
    for r in rows:
        groups.setdefault((r.op, r.backend), []).append(r)
    width = max([len(op) for op, _ in groups] + [2])
    lines = []
    failed = 0
    for (op, backend), rs in groups.items():
        ran = [r for r in rs if r.max_error is not None]
        skipped = [r for r in rs if r.max_error is None]
        bad = [r for r in ran if not r.passed]
        failed += bool(bad)
        if not ran:
            if not quiet:
                lines.append(f"{op:<{width}}  {backend:<7} skip  {skipped[0].note}")
            continue
        if bad:
            shown, verdict, rel = bad[0], "FAIL", ">  bound"
            where = ", ".join(f"{r.dtype} {r.direction}" for r in bad)
        else:
            shown, verdict, rel = max(ran, key=lambda r: r.max_error / r.bound), "pass", "<= bound"
            where = f"{shown.dtype} {shown.direction}"
        text = (f"{op:<{width}}  {backend:<7} {verdict}  max error {shown.max_error:9.2e} {rel} {shown.bound:7.1e}"
                f"  ({where})")
        if bad and shown.note:
            text += f": {shown.note}"
        if skipped:
            text += f"   [{', '.join(r.dtype for r in skipped)} skipped]"
        if bad or not quiet:
            lines.append(text)
    checked = sum(1 for rs in groups.values() if any(r.max_error is not None for r in rs))
    lines.append(f"{checked - failed} of {checked} op/backend pairs passed" + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)
