"""One tolerance table and the shared test helpers (case ids, strided inputs, comparisons, paths)."""
import os

import torch

# Test files live in subfolders of tests/ at various depths: locate the repository from here.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")

# Fused kernels accumulate in float32 and round once; references compute in float32 (float64 for
# float64). bfloat16 allows one ulp (2^-7): the Triton interpreter rounds float32->bfloat16 one ulp
# differently from torch on some values. atol is scaled by the reference's largest magnitude.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def case_id(dtype=None, **dims):
    """Readable test id: case_id(B=2, T=9, H=30, dtype=torch.bfloat16) -> 'B2_T9_H30_bf16'."""
    parts = [f"{k}{v}" for k, v in dims.items()]
    if dtype is not None:
        parts.append(DTYPE_IDS[dtype])
    return "_".join(parts)


def assert_close(actual, expected, dtype=None, msg=""):
    """Compare a fused result with a float32 (or float64) reference under the table's tolerance."""
    dtype = dtype or actual.dtype
    tol = TOL[dtype]
    exp = expected.to(torch.float64)
    scale = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    torch.testing.assert_close(
        actual.to(torch.float64), exp, rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=True, msg=msg or None
    )


def strided(t, kind="last"):
    """A non-contiguous tensor equal to `t`: 'last' steps by 2 in the last dim, 'transposed' swaps the
    last two dims of the storage, 'offset' starts at a non-zero storage offset of a larger buffer."""
    if kind == "last":
        out = torch.empty(t.shape + (2,), dtype=t.dtype, device=t.device)[..., 0]
    elif kind == "transposed":
        out = torch.empty(t.shape[:-2] + (t.shape[-1], t.shape[-2]), dtype=t.dtype, device=t.device).transpose(-1, -2)
    elif kind == "offset":
        out = torch.empty((t.numel() + 3,), dtype=t.dtype, device=t.device)[3:].view(t.shape)
    else:
        raise ValueError(kind)
    out.copy_(t)
    assert kind == "offset" or not out.is_contiguous()
    return out


def fill_disk_on_shard_write(monkeypatch, module, nth=1):
    """Make the `nth` shard file (a name ending in .safetensors.tmp) that `module` opens behave as on a full
    disk: its first write puts half of the bytes on disk, then raises OSError(ENOSPC). Returns the list of
    shard paths opened so far (it grows as `module` opens them)."""
    import errno

    opened = []

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def hooked_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if str(path).endswith(".safetensors.tmp"):
            opened.append(path)
            if len(opened) == nth:
                return Full(f)
        return f

    monkeypatch.setattr(module, "open", hooked_open, raising=False)
    return opened
