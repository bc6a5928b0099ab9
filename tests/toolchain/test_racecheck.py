"""The race checker of the CUDA emulation (tests/cuda_emu.py, tests/emulation/) proves itself on the shipped
kernels: for every sync point in csrc/cuda/ (each barrier, cp.async wait_group, shuffle and
__syncthreads_or, found in the sources by their LV_* macros), the kernel run with that one point disabled
(a barrier removed, a wait weakened by one group, a shuffle mask missing a lane, a __syncthreads_or
reduced to the thread's own predicate) must be reported by the checker or give a different result than
the intact kernel, which itself runs with zero reports. Plus the soft threshold kernels against the CPU.
"""
import os
import re

import pytest
import torch
from cuda_emu import CSRC, conv_fns, executed_sites, lib_or_skip, mutation, run, sync_points
from helpers import DTYPE_IDS

from leanvae_kernels.ops import ista as ista_ops

pytestmark = pytest.mark.racecheck


def _same(a, b):
    """Bit-for-bit equal (NaN payloads included), for tensors or tuples of them."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 8:
        return torch.equal(a.contiguous().view(torch.int64), b.contiguous().view(torch.int64))
    if a.element_size() == 4:
        return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))
    return torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


# ------------------------------------------------------------------------------------------ scenarios
# Each runs one kernel family at a small shape that reaches its sync points and returns its outputs.
def _conv(path, dtype=torch.bfloat16, shape=(1, 4, 5, 9, 32)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    w = torch.randn(shape[-1], 1, 3, 3, 3, generator=g) * 0.3
    b = torch.randn(shape[-1], generator=g)
    cache = torch.randn((shape[0], 2) + shape[2:], generator=g).to(dtype)
    fwd, bwd = conv_fns(path)
    y, nc = fwd(x, w, b, cache, True, 0)
    gy, gc = torch.randn(y.shape, generator=g).to(dtype), torch.randn(nc.shape, generator=g).to(dtype)
    return (y, nc) + bwd(gy, gc, x, w, b, cache, True, 0)


def conv_vector():
    return _conv("_cudaemu_vec")  # cp.async staging (T = 4: six steps through a ring of four slots)


def conv_scalar():
    return _conv("_cudaemu", torch.float32, (1, 3, 4, 7, 20))


def _soft_threshold(n=3000, dtype=torch.float32, block=1024):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, generator=g).to(dtype)
    theta = torch.tensor(0.4)
    out = torch.full_like(x, float("nan"))
    run("soft_threshold_fwd", [x, theta, out])
    grad = torch.randn(n, generator=g).to(dtype)
    grad_x = torch.full_like(x, float("nan"))
    partials = torch.full((-(-n // block),), float("nan"))
    run("soft_threshold_bwd", [grad, x, theta, grad_x, partials], ints=[block])
    return out, grad_x, partials


def soft_threshold():
    return _soft_threshold()


def _ista(mode=0, n=20, big_d=130, d=5, poke=None):
    """Forward and backward at D = 130 (two warps per block); poke(tensors) may edit the inputs."""
    g = torch.Generator().manual_seed(3)
    src = torch.randn((big_d, d) if mode == 2 else (n, big_d), generator=g)
    u = torch.randn(n, big_d, generator=g) if mode == 1 else None
    y = torch.randn(n, d, generator=g)
    phi = torch.randn(d, big_d, generator=g) / big_d ** 0.5
    w = torch.tensor(0.7)
    grad = torch.randn(n, big_d, generator=g)
    if poke is not None:
        poke(src, y, phi, grad)
    out = torch.full((n, big_d), float("nan"))
    run("ista_step_fwd", [src, y, phi, w, out] + ([u] if mode == 1 else []), [mode])
    rows = 8
    part_phi, part_w = ista_ops._partials(n, d, big_d, y.device, y.dtype, rows)
    grad_x, grad_y = torch.full_like(grad, float("nan")), torch.full(y.shape, float("nan"))
    part_phi.fill_(float("nan"))
    part_w.fill_(float("nan"))
    run("ista_step_bwd", [grad, src, y, phi, w, grad_x, grad_y, part_phi, part_w] + ([u] if mode == 1 else []),
        [mode, rows])
    return out, grad_x, grad_y, part_phi, part_w


def ista():
    return _ista()


def _one_bad_row(src, y, phi, grad):
    # y[1, 0] = -inf: e[1, 0] = +inf, so row 1's e . h is not finite and its share of grad_w takes the
    # reference's order, g . (e @ phi), over every thread's columns: +inf on the columns of the thread that
    # owns (row 1, k 0) in the e . h check (thread DP + 0 = 8: columns 32..35) and -inf on others, NaN in
    # all. A thread that does not learn of the bad row (no __syncthreads_or) adds its finite e . h instead.
    y[1, 0] = -float("inf")
    grad.abs_()
    phi[0].copy_(-phi[0].abs())
    phi[0, 32:36] = phi[0, 32:36].abs()


def ista_nonfinite():
    return _ista(poke=_one_bad_row)


# Every sync point in csrc/cuda/ -> the scenario that reaches it.
SCENARIOS = {
    "conv.ring_wait": conv_vector,
    "conv.step": conv_scalar,
    "conv.wgrad_reduce": conv_scalar,
    "soft_threshold.warp_sum": soft_threshold,
    "soft_threshold.block_sum": soft_threshold,
    "ista.reduce_scatter": ista,
    "ista.fwd_tables": ista,
    "ista.fwd_dots": ista,
    "ista.fwd_e": ista,
    "ista.bwd_tables": ista,
    "ista.bwd_dots": ista,
    "ista.bwd_eh": ista,
    "ista.bwd_nonfinite": ista_nonfinite,
    "ista.bwd_wacc": ista,
    "ista.bwd_wred": ista,
}
POINTS = sync_points()


def test_every_sync_point_has_a_mutation_test():
    ids = [p[0] for p in POINTS]
    assert len(ids) == len(set(ids)), f"sync point ids must be unique: {ids}"
    assert set(ids) == set(SCENARIOS), (f"sync points without a mutation scenario: {sorted(set(ids) - set(SCENARIOS))}; "
                                        f"scenarios of no sync point: {sorted(set(SCENARIOS) - set(ids))}")
    # Nothing synchronises outside the macros (lv_sync.cuh maps them to the CUDA constructs; cp.async waits
    # only in the conv's storage class, reached through LV_CP_WAIT).
    bare = re.compile(r"__syncthreads|__syncwarp|__shfl_\w+_sync|cp\.async\.wait_(group|all)|bar\.sync")
    for fname in sorted(os.listdir(os.path.join(CSRC, "cuda"))):
        if fname == "lv_sync.cuh":
            continue
        for lineno, line in enumerate(open(os.path.join(CSRC, "cuda", fname)), 1):
            if bare.search(line.split("//")[0]):
                assert fname == "causal_conv.cu" and "cp.async.wait_group" in line, f"{fname}:{lineno}: {line.strip()}"


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p[0])
def test_removed_sync_point_is_caught(point):
    sync_id, kind, where = point
    lib_or_skip()
    scenario = SCENARIOS[sync_id]
    clean = scenario()  # raises on any report
    with mutation(sync_id) as m:
        mutated = scenario()
    assert m["hits"] > 0, f"{sync_id} ({kind}, {where}) was not reached by {scenario.__name__}"
    assert m["count"] > 0 or not _same(clean, mutated), \
        f"removing {sync_id} ({kind}, {where}) went unnoticed: neither a report nor a different result"


def test_shipped_kernels_reach_every_sync_point():
    """Every sync point found in the sources ran (with zero reports) in the scenarios: the emulation
    executes the code the sources contain."""
    lib_or_skip()
    for scenario in set(SCENARIOS.values()):
        scenario()
    sites = executed_sites()
    for sync_id, kind, where in POINTS:
        assert sync_id in sites, f"{sync_id} ({where}) never ran"
        assert sites[sync_id][0] == kind and sites[sync_id][1] == where, (sync_id, sites[sync_id], kind, where)


# ------------------------------------------------------------------------------------------ soft threshold
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("n", [1, 37, 3000])
def test_emulated_soft_threshold_matches_cpu(n, dtype):
    """Vector packs and scalar tails, one and several blocks of the backward, partial warps, against the
    native CPU kernels; a view one element in (not 16-byte aligned) takes the scalar path, same bits."""
    out, grad_x, partials = _soft_threshold(n, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, generator=g).to(dtype)
    grad = torch.randn(n, generator=g).to(dtype)
    theta = torch.tensor(0.4)
    assert torch.equal(out, ista_ops._st_fwd("cpu", x.device, dtype, x, theta))
    gx_ref, gt_ref = ista_ops._st_bwd("cpu", x.device, dtype, grad, x, theta)
    assert torch.equal(grad_x, gx_ref)
    # Partial sums in another order than the CPU's: float32 rounding of a sum of n terms of size <= |grad|.
    torch.testing.assert_close(-partials.sum(), gt_ref.float(), rtol=0, atol=1e-5 * n * grad.abs().max().item())
    if n > 8:
        buf = torch.empty(n + 1, dtype=dtype)[1:]
        buf.copy_(x)
        out2 = torch.full_like(x, float("nan"))
        run("soft_threshold_fwd", [buf, theta, out2])
        assert torch.equal(out2, out)


def test_the_package_ships_no_emulation():
    """The emulation is test code: the module `import leanvae_kernels` loads registers no emulated kernel,
    and no Python module of the package refers to the emulation."""
    from leanvae_kernels import _native

    mod, reason = _native.module("cpu")
    assert mod is not None, reason
    assert not [k for k in mod.kernels() if "emu" in k]
    pkg = os.path.dirname(os.path.dirname(_native.__file__))
    for sub in ("leanvae_kernels", "leanvae"):
        for dirpath, _, files in os.walk(os.path.join(pkg, sub)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f)).read()
                    assert "cudaemu" not in text and "cuda_emu" not in text and "lv_emu" not in text, f
