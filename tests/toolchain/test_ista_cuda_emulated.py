"""The CUDA ISTA step kernels (csrc/cuda/ista_step_body.cuh, launched with the plan of ista_step_plan.h as
csrc/cuda/ista_step.cu does) run on the CPU by the test suite's emulation (tests/cuda_emu.py), against the
native CPU backend.

These kernels cooperate within a block (shared memory, __syncthreads, __syncthreads_or, warp shuffles):
the emulation runs a block's threads as fibers that meet at barriers and shuffles with the GPU's
semantics, and checks every shared-memory access for races (a report fails the call); dynamic shared
memory is poisoned, so a read of something never written is reported. Blocks run one after the other on
an emulated device of few SMs, so the grid-stride loops take several turns. What this checks: the
indexing, the reduce-scatter and warp-order sums, the shared-memory layout and its sizing by `plan`, the
vector/scalar load paths, the partial blocks of the backward, every mode, the absence of races. What it
cannot: device rounding of the 16-bit conversions (the CPU's are used), FMA contraction, timing.
Skipped without a host C++ compiler.
"""
import ctypes

import pytest
import torch
from cuda_emu import lib_or_skip, run
from helpers import DTYPE_IDS, TOL

from leanvae_kernels.ops import ista as ops

pytestmark = pytest.mark.racecheck
EMU_SMS = 3  # streaming multiprocessors of the emulated device: small, so blocks loop over their work
H200_SMS = 132


@pytest.fixture(scope="module")
def emu():
    return lib_or_skip()


def _call(lib, which, tensors, ints, sms=EMU_SMS):
    lib.emu_set_sms(ctypes.c_int(sms))
    try:
        run("ista_step_bwd" if which else "ista_step_fwd", tensors, ints)
    finally:
        lib.emu_set_sms(ctypes.c_int(EMU_SMS))


def emu_fwd(lib, mode, src, u, y, phi, w):
    """The CUDA launcher's forward, as ops/ista.py calls it (same tensors, same ints)."""
    out = torch.full((y.shape[0], phi.shape[1]), float("nan"), dtype=y.dtype)
    _call(lib, 0, [src, y, phi, w, out] + ([u] if mode == 1 else []), [mode])
    return out


def emu_bwd(lib, mode, grad, src, u, y, phi, w):
    grad_x = torch.full_like(grad, float("nan"))
    grad_y = torch.full(y.shape, float("nan"), dtype=torch.float32)
    rows = ops.ista_partial_rows(grad.shape[0], EMU_SMS)  # what the cuda backend passes on this device
    part_phi, part_w = ops._partials(grad.shape[0], phi.shape[0], phi.shape[1], grad.device, grad.dtype, rows)
    part_phi.fill_(float("nan"))
    part_w.fill_(float("nan"))
    _call(lib, 1, [grad, src, y, phi, w, grad_x, grad_y, part_phi, part_w] + ([u] if mode == 1 else []),
          [mode, rows])
    return (grad_x, grad_y) + ops._finish_grads(part_phi, part_w, phi, w)


def _inputs(mode, n, big_d, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn((big_d, d) if mode == 2 else (n, big_d), generator=g).to(dtype)
    u = torch.randn(n, big_d, generator=g).to(dtype) if mode == 1 else None
    y = torch.randn(n, d, generator=g).to(dtype)
    phi = (torch.randn(d, big_d, generator=g) / big_d ** 0.5).to(dtype)
    w = torch.tensor(0.7)
    grad = torch.randn(n, big_d, generator=g).to(dtype)
    return src, u, y, phi, w, grad


def _close(actual, expected, dtype, what):
    tol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{what}: {m}")


# (N, D, d): d = 4 and 16 (the two register specialisations of the backward, DMAX 4 and 16), one d in
# 17..64 (DMAX 64) and odd ones (padded DP); D not a multiple of 4 (the scalar path), more than one warp,
# N past one 256-row partial block and not a multiple of the row groups.
CASES = [(21, 24, 4), (37, 40, 16), (11, 36, 33), (300, 20, 3), (9, 130, 16), (13, 18, 5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}_D{c[1]}_d{c[2]}")
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["step", "residual", "init"])
def test_emulated_cuda_matches_cpu(emu, mode, case, dtype):
    n, big_d, d = case
    src, u, y, phi, w, grad = _inputs(mode, n, big_d, d, dtype, seed=n + d)
    out = emu_fwd(emu, mode, src, u, y, phi, w)
    ref = ops._step_fwd("cpu", y.device, dtype, mode, src, u, y, phi, w)
    # The kernels sum the d dot products in different orders (CUDA: warp reduce-scatter, CPU: vector
    # lanes): equal up to float32 rounding, then one rounding to the dtype (the table's tolerance).
    _close(out, ref, dtype, "forward")
    got = emu_bwd(emu, mode, grad, src, u, y, phi, w)
    exp = ops._step_bwd("cpu", y.device, dtype, mode, grad, src, u, y, phi, w)
    for name, a, e in zip(("grad_x", "grad_y", "grad_phi"), got, exp):
        assert not a.isnan().any(), f"{name}: an element was never written"
        _close(a, e, dtype if name != "grad_y" else torch.float32, name)
    # grad_w sums N*D products: compare relative to the sum of their magnitudes (test_ista_ops: check_grad_w)
    x = ops._x_of(mode, src, u, y).float()
    e_ = x @ phi.float().T - y.float()
    terms = ((e_ @ phi.float()).abs() * grad.float().abs()).sum().clamp_min(1.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got[3].float() - exp[3].float()).abs() / terms).item() < tol


def test_emulated_cuda_strided_rows_and_misaligned_views(emu):
    # Row strides > D and a view starting one element in: the launchers fall back from the 4-element
    # vector path; results must not change.
    n, big_d, d = 10, 32, 4
    src, u, y, phi, w, grad = _inputs(1, n, big_d, d, torch.float32, seed=5)
    wide = torch.randn(n, big_d + 5)
    wide[:, 1:big_d + 1] = src
    src_view = wide[:, 1:big_d + 1]
    out = emu_fwd(emu, 1, src_view, u, y, phi, w)
    _close(out, ops._step_fwd("cpu", y.device, torch.float32, 1, src, u, y, phi, w), torch.float32, "strided forward")
    got = emu_bwd(emu, 1, grad, src_view, u, y, phi, w)
    exp = ops._step_bwd("cpu", y.device, torch.float32, 1, grad, src, u, y, phi, w)
    for a, e in zip(got[:3], exp[:3]):
        _close(a, e, torch.float32, "strided backward")


def test_emulated_grid_covers_the_work_whatever_the_sm_count(emu):
    # The same call on 1, 3 and 64 emulated SMs (grid-stride loops of different trip counts) gives the
    # same bits: every block's work is a fixed function of its index.
    src, u, y, phi, w, grad = _inputs(0, 70, 24, 4, torch.float32, seed=9)
    outs = []
    for sms in (1, 3, 64):
        out = torch.full((70, 24), float("nan"))
        _call(emu, 0, [src, y, phi, w, out], [0], sms=sms)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_backward_grid_fills_the_gpu():
    # Issue 13: at 20,000 rows the backward launched 79 blocks (one per 256-row partial) for the 132 SMs
    # of an H100/H200. The partials are sized from the SM count: every SM gets work, at most
    # ISTA_PARTIALS_PER_SM blocks each, at that size and others.
    rows = ops.ista_partial_rows(20000, H200_SMS)
    blocks = -(-20000 // rows)
    assert H200_SMS <= blocks <= ops.ISTA_PARTIALS_PER_SM * H200_SMS
    part_phi, _ = ops._partials(20000, 4, 16, torch.device("cpu"), torch.float32, rows)
    assert part_phi.shape[0] == blocks


def test_emulated_partials_one_per_cuda_block(emu):
    # The partial rows the launcher is given decide the partial layout: 300 rows -> 5 partials of 64 rows,
    # each equal to the sum over its own rows (the emulated kernel against per-block CPU sums).
    n, big_d, d = 300, 20, 4
    src, u, y, phi, w, grad = _inputs(0, n, big_d, d, torch.float32, seed=2)
    part_phi, part_w = ops._partials(n, d, big_d, y.device, y.dtype, 64)
    _call(emu, 1, [grad, src, y, phi, w, torch.empty_like(grad), torch.empty(n, d), part_phi, part_w], [0, 64])
    assert part_phi.shape[0] == 5
    e = src @ phi.T - y
    h = grad @ phi.T
    for b in range(5):
        rows = slice(64 * b, min(n, 64 * (b + 1)))
        expected = e[rows].T @ grad[rows] + h[rows].T @ src[rows]
        torch.testing.assert_close(part_phi[b], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(part_w[b], (e[rows] * h[rows]).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("d", [1, 4, 16])
@pytest.mark.parametrize("mode,arg", [(0, "src"), (0, "y"), (1, "u"), (2, "y"), (2, "src"), (0, "phi"), (2, "phi")],
                         ids=["step-r", "step-y", "residual-u", "init-y", "init-Q", "step-phi", "init-phi"])
def test_emulated_cuda_nonfinite_data_like_reference(emu, mode, arg, d, value):
    # Issue 10 item 10 on the CUDA kernels: +Inf, -Inf and NaN in the data or phi give the reference's NaN/Inf
    # pattern in the output and every gradient (grad_w included: rows in the reference's order).
    from test_ieee_ops import assert_same_ieee, poke

    n, big_d = 70, 24
    src, u, y, phi, w, grad = _inputs(mode, n, big_d, d, torch.float32, seed=d)
    named = {"src": src, "u": u, "y": y, "phi": phi}
    named[arg] = poke(named[arg], [value])  # alone: grad_w sums everything, another NaN would hide it
    src, u, y, phi = named["src"], named["u"], named["y"], named["phi"]
    out = emu_fwd(emu, mode, src, u, y, phi, w)
    ref = ops._step_fwd("reference", y.device, torch.float32, mode, src, u, y, phi, w)
    assert_same_ieee(out, ref, "forward")
    got = emu_bwd(emu, mode, grad, src, u, y, phi, w)
    exp = ops._step_bwd("reference", y.device, torch.float32, mode, grad, src, u, y, phi, w)
    for name, a, e in zip(("grad_x", "grad_y", "grad_phi", "grad_w"), got, exp):
        assert_same_ieee(a, e.float(), name)
