"""ISTA step ops (ista_step, ista_residual_step, ista_init_step): parity with the model's expression,
every gradient, float64 gradcheck, strided input, determinism, opcheck, compile, bad input. Also the
soft threshold's vectorised CPU backward on special values."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, kernel_backends
from helpers import DTYPE_IDS, TOL, assert_close, case_id

import leanvae_kernels as lk
from leanvae_kernels.ops import ista as ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["step", "residual", "init"]
# (N, D, d): one token; the model's D = 512 with d = 4 and 16; more rows than one partial block (256),
# with D not a multiple of 4 and an odd d; the largest d.
CASES = [(1, 512, 4), (37, 512, 16), (300, 130, 5), (20, 96, 64)]
FUSED = {"step": lk.ista_step, "residual": lk.ista_residual_step, "init": lk.ista_init_step}


def model_step(x, y, phi, w):
    """The published ISTA.recon step, verbatim."""
    return x - w * torch.mm(torch.mm(x, phi.t()) - y, phi)


def make_inputs(mode, n, big_d, d, dtype, device=DEVICE):
    """The op's inputs (in `dtype`) for `mode`, with values of the model's scale: phi ~ N(0, 1/D), Q = phi.T."""
    g = torch.Generator().manual_seed(1000 * n + 10 * big_d + d)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    phi = rnd(d, big_d, scale=big_d**-0.5)
    y = rnd(n, d)
    w = torch.tensor(0.9, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if mode == "init":
        return (y, rnd(big_d, d, scale=big_d**-0.5), phi, w)
    if mode == "residual":
        return (rnd(n, big_d), rnd(n, big_d), y, phi, w)
    return (rnd(n, big_d), y, phi, w)


def step_input(mode, inputs, acc):
    """(x, y) of the step in `acc`: as in the unfused model, x is stored in the input dtype first."""
    dtype = inputs[0].dtype
    if mode == "init":
        y, q = inputs[0], inputs[1]
        return torch.mm(y.to(acc), q.to(acc).t()).to(dtype).to(acc), y.to(acc)
    if mode == "residual":
        r, u, y = inputs[:3]
        return (r.to(acc) + u.to(acc)).to(dtype).to(acc), y.to(acc)
    return inputs[0].to(acc), inputs[1].to(acc)


def reference(mode, inputs):
    """The model's computation in float32 (float64 for float64) from the same (rounded) inputs."""
    acc = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    x, y = step_input(mode, inputs, acc)
    return model_step(x, y, inputs[-2].to(acc), inputs[-1].to(acc))


def leaves(inputs, acc=None):
    return [t.detach().to(acc or t.dtype).clone().requires_grad_() for t in inputs]


def check_grad_w(got, expected, terms_abs_sum, dtype):
    """grad_w sums over every token and d: compare relative to the sum of the magnitudes of its terms."""
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    assert abs(got.item() - expected.item()) <= tol * max(1.0, terms_abs_sum)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", CASES, ids=lambda c: case_id(N=c[0], D=c[1], d=c[2]))
@pytest.mark.parametrize("mode", MODES)
def test_forward_backward_parity(mode, case, dtype, backend):
    inputs = make_inputs(mode, *case, dtype)
    fused_in = leaves(inputs)
    out = FUSED[mode](*fused_in, backend=backend)
    ref_in = leaves(inputs, torch.float32)
    ref = reference(mode, ref_in)
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert_close(out, ref, dtype)

    grad = torch.randn(out.shape, device=DEVICE).to(dtype)
    out.backward(grad)
    ref.backward(grad.float())
    for name, a, b in zip(("0", "1", "2", "3", "4"), fused_in[:-1], ref_in[:-1]):
        assert a.grad.dtype == a.dtype
        assert_close(a.grad, b.grad, dtype, msg=f"grad of input {name}")
    # grad_w = -sum over tokens of e . h: bound by the sum of |e_k h_k|.
    with torch.no_grad():
        x, y = step_input(mode, ref_in, torch.float32)
        phi = ref_in[-2]
        terms = ((x @ phi.t() - y) * (grad.float() @ phi.t())).abs().sum().item()
    check_grad_w(fused_in[-1].grad, ref_in[-1].grad, terms, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_float64_and_gradcheck_cpu(mode):
    inputs = make_inputs(mode, 5, 13, 3, torch.float64, device="cpu")
    ins = leaves(inputs)
    assert_close(FUSED[mode](*inputs, backend="cpu"), reference(mode, inputs), torch.float64)
    assert torch.autograd.gradcheck(lambda *a: FUSED[mode](*a, backend="cpu"), ins)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("mode", MODES)
def test_strided_rows_read_correctly(mode, backend):
    """Row-strided views (slices of wider tensors) and transposed storage give the contiguous result exactly."""
    inputs = make_inputs(mode, 40, 130, 16, torch.float32)
    grad = torch.randn(40, 130, device=DEVICE)

    def run(ins, g):
        ins = leaves(ins)
        out = FUSED[mode](*ins, backend=backend)
        out.backward(g)
        return [out.detach()] + [t.grad for t in ins]

    def row_strided(t):
        wide = torch.full((t.shape[0], t.shape[1] + 7), float("nan"), device=t.device, dtype=t.dtype)
        wide[:, 3 : 3 + t.shape[1]] = t
        return wide[:, 3 : 3 + t.shape[1]]

    def transposed(t):
        return t.t().contiguous().t()

    expected = run(inputs, grad)
    for make in (row_strided, transposed):
        strided_in = [make(t) if t.ndim == 2 else t for t in inputs]
        assert any(not t.is_contiguous() for t in strided_in)
        got = run(strided_in, make(grad))
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", kernel_backends())
def test_fused_residual_equals_add_then_step(backend):
    """ista_residual_step(r, u) is ista_step(r + u) with r + u stored in the dtype: bit for bit. (The
    Triton interpreter rounds float32 to bfloat16 toward zero, unlike torch and GPUs, so Triton is checked
    in float16 on CPU-only machines.)"""
    dtype = torch.float16 if backend == "triton" and DEVICE.type == "cpu" else torch.bfloat16
    r, u, y, phi, w = make_inputs("residual", 45, 512, 16, dtype)
    grad = torch.randn(45, 512, device=DEVICE).to(dtype)
    a = leaves([r, u, y, phi, w])
    out = lk.ista_residual_step(*a, backend=backend)
    out.backward(grad)
    b = leaves([r + u, y, phi, w])
    ref = lk.ista_step(*b, backend=backend)
    ref.backward(grad)
    assert torch.equal(out, ref)
    assert torch.equal(a[0].grad, b[0].grad) and torch.equal(a[1].grad, b[0].grad)
    for x, z in zip(a[2:], b[1:]):
        assert torch.equal(x.grad, z.grad)


def test_cpu_results_do_not_depend_on_thread_count():
    inputs = make_inputs("step", 700, 512, 16, torch.float32)
    grad = torch.randn(700, 512)
    results = []
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ins = leaves(inputs)
            out = lk.ista_step(*ins, backend="cpu")
            out.backward(grad)
            results.append([out.detach()] + [t.grad for t in ins])
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", kernel_backends())
def test_nan_propagates_like_the_model(backend):
    r, y, phi, w = make_inputs("step", 6, 64, 4, torch.float32)
    r[2, 5] = float("nan")
    y[4, 1] = float("inf")
    out = lk.ista_step(r, y, phi, w, backend=backend)
    torch.testing.assert_close(out, model_step(r, y, phi, w), equal_nan=True, rtol=1e-5, atol=1e-5)
    assert out[2].isnan().all() and out[4].isinf().any()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the Triton interpreter check runs on CPU-only machines")
def test_triton_tensor_core_path_matches_fp32_path():
    """FP32=False (tensor cores, hi/lo split) against FP32=True. The interpreter's bf16 tl.dot multiplies
    raw bit patterns, so the path is exercised in float16 here; on GPUs it serves bfloat16."""
    pytest.importorskip("triton")
    from leanvae_kernels.triton.ista import ista_step_bwd, ista_step_fwd

    for mode, m in (("step", 0), ("residual", 1), ("init", 2)):
        ins = make_inputs(mode, 40, 130, 5, torch.float16)
        src, u, y, phi, w = {0: (ins[0], None, *ins[1:]), 1: ins, 2: (ins[1], None, ins[0], *ins[2:])}[m]
        a = ista_step_fwd(m, src, u, y, phi, w, fp32=True)
        b = ista_step_fwd(m, src, u, y, phi, w, fp32=False)
        assert_close(b, a.float(), torch.float16)
        grad = torch.randn(40, 130).half()
        for ga, gb in zip(ista_step_bwd(m, grad, src, u, y, phi, w, 256, fp32=True),
                          ista_step_bwd(m, grad, src, u, y, phi, w, 256, fp32=False)):
            assert_close(gb, ga.float(), torch.float16)


@pytest.mark.parametrize("sms", [1, 3, 108, 132, 144])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 300, 20000, 20001, 1_000_003])
def test_gpu_partial_rows_sized_from_sm_count(n, sms):
    """Issue 13: the GPU backward's partials (one block/program each) are sized from the SM count, a pure
    function of (rows, SMs): a multiple of 16 rows, at most ISTA_PARTIALS_PER_SM partials per SM, and
    (where there are enough rows) at least one per SM, so no SM idles. At 20,000 rows on 132 SMs a fixed
    256 rows gave 79 blocks."""
    rows = ops.ista_partial_rows(n, sms)
    blocks = -(-n // rows)
    assert rows % ops.ISTA_ROW_MULTIPLE == 0 and rows >= ops.ISTA_ROW_MULTIPLE
    assert blocks <= ops.ISTA_PARTIALS_PER_SM * sms
    if n >= 2 * ops.ISTA_ROW_MULTIPLE * ops.ISTA_PARTIALS_PER_SM * sms:
        assert blocks >= sms, (rows, blocks)
    assert ops.ista_partial_rows(n, sms) == rows  # deterministic
    if (n, sms) == (20000, 132):
        assert (rows, blocks) == (80, 250)


def test_gpu_partial_rows_bad_sm_count():
    with pytest.raises(ValueError, match="sms"):
        ops.ista_partial_rows(100, 0)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the Triton interpreter check runs on CPU-only machines")
def test_triton_backward_partials_do_not_change_the_result():
    """The Triton backward at different rows per partial (16, 32, 48: one compile, ROWS is a runtime
    argument): grad_x and grad_y are per-row (bit-identical); grad_phi and grad_w are the same sums
    regrouped, equal to float32 rounding (float32 tolerance of the table)."""
    pytest.importorskip("triton")
    from leanvae_kernels.triton.ista import ista_step_bwd

    src, y, phi, w = make_inputs("step", 70, 40, 5, torch.float32)
    grad = torch.randn(70, 40)
    outs = []
    for rows in (16, 32, 48):
        gx, gy, part_phi, part_w = ista_step_bwd(0, grad, src, None, y, phi, w, rows)
        assert part_phi.shape[0] == -(-70 // rows)
        outs.append((gx, gy) + ops._finish_grads(part_phi, part_w, phi, w))
    for other in outs[1:]:
        assert torch.equal(other[0], outs[0][0]) and torch.equal(other[1], outs[0][1])
        for a, b in zip(other[2:], outs[0][2:]):
            assert_close(a, b, torch.float32)


def test_large_d_falls_back_or_raises():
    inputs = make_inputs("step", 5, 32, 65, torch.float32)
    with pytest.raises(lk.BackendUnavailable, match="support d <= 64, got d = 65"):
        lk.ista_step(*inputs, backend="cpu")
    assert_close(lk.ista_step(*inputs, backend="auto"), reference("step", inputs), torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_empty_token_batch(mode):
    ins = leaves(make_inputs(mode, 0, 64, 4, torch.float32))
    out = FUSED[mode](*ins, backend="cpu")
    assert out.shape == (0, 64)
    out.sum().backward()
    assert all(t.grad is not None and not t.grad.abs().sum() for t in ins)


def test_explicit_cuda_on_cpu_tensors_raises():
    with pytest.raises(lk.BackendUnavailable, match="cuda backend runs on CUDA tensors"):
        lk.ista_step(*make_inputs("step", 3, 16, 4, torch.float32, device="cpu"), backend="cuda")


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    inputs = make_inputs(mode, 7, 24, 4, torch.float32, device="cpu")
    op = {"step": "ista_step", "residual": "ista_residual_step", "init": "ista_init_step"}[mode]
    for backend in ("cpu", "reference"):
        args = tuple(t.clone().requires_grad_() for t in inputs) + (backend,)
        torch.library.opcheck(getattr(torch.ops.leanvae, op).default, args)
        grad = torch.randn(7, 24)
        torch.library.opcheck(getattr(torch.ops.leanvae, op + "_backward").default, (grad,) + tuple(inputs) + (backend,))


def test_compile_fullgraph():
    r, u, y, phi, w = make_inputs("residual", 12, 64, 4, torch.float32, device="cpu")
    q = phi.t().contiguous()
    theta = torch.tensor([0.05])

    def f(r, u, y, q, phi, w, theta):
        a = lk.ista_init_step(y, q, phi, w, backend="cpu")
        b = lk.ista_residual_step(a, u, y, phi, w, backend="cpu")
        return lk.soft_threshold(lk.ista_step(b * 2, y, phi, w, backend="cpu"), theta, backend="cpu") + r

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [r, u, y, q, phi, w, theta]
    ea, ca = leaves(args), leaves(args)
    out_e, out_c = f(*ea), compiled(*ca)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    out_e.sum().backward()
    out_c.sum().backward()
    for a, b in zip(ca, ea):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def _bad(**over):
    r, y, phi, w = make_inputs("step", 4, 16, 4, torch.float32, device="cpu")
    args = dict(r=r, y=y, phi=phi, w=w)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, err, match",
    [
        (dict(r=None), TypeError, "ista_step: r must be a tensor"),
        (dict(r=torch.randn(4, 16, 1)), ValueError, r"r must be a 2-D tensor \(N, D\)"),
        (dict(phi=torch.randn(4, 15)), ValueError, r"phi must be \(d, D\) with D = r.shape\[1\] = 16"),
        (dict(y=torch.randn(4, 5)), ValueError, r"y must be \(N, d\) = \(4, 4\)"),
        (dict(y=torch.randn(3, 4)), ValueError, r"y must be \(N, d\) = \(4, 4\)"),
        (dict(y=torch.randn(4, 4, dtype=torch.float64)), TypeError, "y has dtype torch.float64 but r has dtype torch.float32"),
        (dict(w=torch.tensor([0.5, 0.5])), ValueError, "w must hold one element"),
        (dict(w=0.5), TypeError, "w must be a torch.Tensor"),
        (dict(r=torch.ones(4, 16, dtype=torch.int32)), TypeError, "r must have dtype"),
        (dict(y=torch.randn(4, 4, device="meta")), ValueError, "y is on meta but r is on cpu"),
    ],
    ids=["r_none", "r_3d", "phi_D", "y_d", "y_N", "y_dtype", "w_two", "w_float", "r_int", "y_device"],
)
def test_bad_input_step(over, err, match):
    with pytest.raises(err, match=match):
        lk.ista_step(**_bad(**over))


def test_bad_input_residual_and_init():
    r, u, y, phi, w = make_inputs("residual", 4, 16, 4, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"ista_residual_step: u must be \(N, D\) = \(4, 16\)"):
        lk.ista_residual_step(r, u[:, :8], y, phi, w)
    with pytest.raises(TypeError, match="ista_residual_step: u has dtype torch.bfloat16"):
        lk.ista_residual_step(r, u.bfloat16(), y, phi, w)
    with pytest.raises(ValueError, match=r"ista_init_step: Q must be \(D, d\) = \(16, 4\)"):
        lk.ista_init_step(y, phi, phi, w)
    with pytest.raises(ValueError, match=r"ista_init_step: Q must be a 2-D tensor \(D, d\)"):
        lk.ista_init_step(y, phi.t().reshape(-1), phi, w)


# ----------------------------------------------------------------- soft threshold, special values
def test_soft_threshold_cpu_backward_special_values():
    """The vectorised CPU backward against autograd of the model's expression: zeros, exact threshold,
    NaN, infinities, a negative theta, and a length that leaves a tail after the 16-lane tiles."""
    x = torch.randn(1000)
    x[::7] = 0.0
    x[1::11] = 0.3
    x[2::13] = -0.3
    x[5], x[6], x[7] = float("nan"), float("inf"), -float("inf")
    g = torch.randn(1000)
    g[9] = float("inf")
    for theta_value in (0.3, -0.2):
        theta = torch.tensor([theta_value])
        xr, tr = x.clone().requires_grad_(), theta.clone().requires_grad_()
        torch.mul(torch.sign(xr), F.relu(torch.abs(xr) - tr)).backward(g)
        xf, tf = x.clone().requires_grad_(), theta.clone().requires_grad_()
        lk.soft_threshold(xf, tf, backend="cpu").backward(g)
        torch.testing.assert_close(xf.grad, xr.grad, equal_nan=True, **TOL[torch.float32])
        torch.testing.assert_close(tf.grad, tr.grad, equal_nan=True, **TOL[torch.float32])


@pytest.mark.parametrize("mode", MODES)
def test_reference_backend_gradients(mode):
    """The reference backend's backward runs autograd inside a registered op, where the dispatcher turns
    autograd off; it must still give the true gradients (it once returned zeros)."""
    inputs = make_inputs(mode, 37, 64, 16, torch.float32, device="cpu")
    grad = torch.randn(37, 64)
    fused_in, ref_in = leaves(inputs), leaves(inputs)
    FUSED[mode](*fused_in, backend="reference").backward(grad)
    reference(mode, ref_in).backward(grad)
    for a, b in zip(fused_in, ref_in):
        assert b.grad.abs().sum() > 0
        assert_close(a.grad, b.grad, torch.float32)
    x, theta = torch.randn(50, requires_grad=True), torch.tensor([0.3], requires_grad=True)
    lk.soft_threshold(x, theta, backend="reference").backward(grad[0, :50])
    xr, tr = x.detach().clone().requires_grad_(), theta.detach().clone().requires_grad_()
    torch.mul(torch.sign(xr), F.relu(torch.abs(xr) - tr)).backward(grad[0, :50])
    assert torch.equal(x.grad, xr.grad) and torch.allclose(theta.grad, tr.grad)
