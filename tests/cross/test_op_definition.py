"""The one op definition (ops/_define.py) and what every op gets from it: registration in one place,
validation once per call, each backend's own limits asked through OpBackends, and the op corners
(a one-element theta / w of any rank, a non-finite ISTA step size)."""
import os
import re
import warnings

import pytest
import torch
from conftest import kernel_backends

import leanvae_kernels as lk
from leanvae_kernels import BackendUnavailable
from leanvae_kernels.ops import ista

from helpers import ROOT  # noqa: E402


def _package_sources():
    for dirpath, _, files in os.walk(os.path.join(ROOT, "leanvae_kernels")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                yield os.path.relpath(path, ROOT), open(path).read()


@pytest.mark.parametrize("call", ["torch.library.custom_op", "register_autograd"])
def test_registration_happens_in_one_place(call):
    hits = [(path, n) for path, text in _package_sources() for n in [len(re.findall(re.escape(call) + r"\(", text))] if n]
    assert hits == [(os.path.join("leanvae_kernels", "ops", "_define.py"), 1)], hits


# ----------------------------------------------------------------------------- validation once per call
@pytest.fixture
def count_checks(monkeypatch):
    """Counts the validations of soft_threshold (its theta check) and ista_step (its w check)."""
    calls = []
    real = ista.check_scalar

    def counting(op, name, t):
        calls.append(op)
        return real(op, name, t)

    monkeypatch.setattr(ista, "check_scalar", counting)
    return calls


def test_eager_public_call_validates_once(count_checks):
    x, theta = torch.randn(4, 5, requires_grad=True), torch.tensor([0.2], requires_grad=True)
    lk.soft_threshold(x, theta).sum().backward()
    lk.soft_threshold(x.detach(), theta.detach(), backend="reference")
    r, y, phi, w = torch.randn(6, 8), torch.randn(6, 3), torch.randn(3, 8), torch.tensor(0.5)
    lk.ista_step(r, y, phi, w)
    assert count_checks == ["soft_threshold", "soft_threshold", "ista_step"]


def test_direct_op_call_is_validated_by_its_body(count_checks):
    x, theta = torch.randn(4, 5), torch.tensor([0.2])
    torch.ops.leanvae.soft_threshold(x, theta, "cpu")
    assert count_checks == ["soft_threshold"]
    with pytest.raises(ValueError, match="soft_threshold: theta must hold one element"):
        torch.ops.leanvae.soft_threshold(x, torch.ones(2), "cpu")


def test_fake_validates_under_tracing(count_checks):
    # Meta tensors run the fake kernel, as FakeTensorMode does when torch.compile traces.
    out = torch.ops.leanvae.soft_threshold(torch.empty(4, 5, device="meta"), torch.empty(1, device="meta"), "cpu")
    assert out.shape == (4, 5) and out.device.type == "meta"
    with pytest.raises(ValueError, match="theta must hold one element"):
        torch.ops.leanvae.soft_threshold(torch.empty(4, 5, device="meta"), torch.empty(3, device="meta"), "cpu")
    assert count_checks == ["soft_threshold", "soft_threshold"]


def test_a_failed_public_call_does_not_leave_a_validation_mark():
    # The public call's mark names its op and is cleared on the way out, so a later direct call is checked.
    with pytest.raises(ValueError):
        lk.soft_threshold(torch.randn(3), torch.ones(2))
    with pytest.raises(ValueError, match="theta must hold one element"):
        torch.ops.leanvae.soft_threshold(torch.randn(3), torch.ones(2), "reference")


# ----------------------------------------------------------------------------- backend limits
def _step_args(n, big_d, d):
    return (0, torch.randn(n, big_d), None, torch.randn(n, d), torch.randn(d, big_d), torch.ones(1))


def test_auto_and_explicit_backends_ask_the_kernels_limits():
    cpu = torch.device("cpu")
    assert ista._step_fwd.choose("auto", cpu, torch.float32, _step_args(5, 16, 4)) == "cpu"
    ok, why = ista._step_fwd.status("cpu", "cpu", torch.float32, _step_args(5, 16, 65))
    assert not ok and "d <= 64, got d = 65" in why
    assert ista._step_fwd.choose("auto", cpu, torch.float32, _step_args(5, 16, 65)) == "reference"
    with pytest.raises(BackendUnavailable, match="backend 'cpu' is not available: the fused kernels support d <= 64"):
        lk.ista_step(torch.randn(5, 16), torch.randn(5, 65), torch.randn(65, 16), torch.tensor(0.1), backend="cpu")


def test_cuda_shared_memory_limit_is_the_devices(monkeypatch):
    # The CUDA kernels' plan against the device's opt-in limit (asked per device), not a constant.
    supports = ista._step_support("cuda")
    args = _step_args(4, 4096, 64)
    need = ista._cuda_smem_bytes(0, 64, 4096)
    monkeypatch.setattr(ista, "_cuda_max_smem", lambda device: need)
    assert supports(*args) is None
    monkeypatch.setattr(ista, "_cuda_max_smem", lambda device: need - 1)
    assert f"needs {need} bytes, the device allows {need - 1}" in supports(*args)


# ----------------------------------------------------------------------------- op corners
RANKS = [0, 1, 2, 9]


def _one_element(value, rank, dtype=torch.float32):
    return torch.tensor(value, dtype=dtype).reshape([1] * rank)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
@pytest.mark.parametrize("rank", RANKS)
def test_soft_threshold_one_element_theta_of_any_rank(rank, backend):
    x = torch.randn(3, 5, 2)
    t_ref, t = _one_element(0.4, rank).requires_grad_(), _one_element(0.4, rank).requires_grad_()
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = torch.sign(xr) * torch.relu(xr.abs() - t_ref.reshape(()))
    got = lk.soft_threshold(xf, t, backend=backend)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected)
    g = torch.randn(x.shape)
    expected.backward(g)
    got.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad)
    assert t.grad.shape == t.shape
    torch.testing.assert_close(t.grad, t_ref.grad)


_STEP = {
    "step": (lk.ista_step, lambda t: (t["r"], t["y"], t["phi"])),
    "residual": (lk.ista_residual_step, lambda t: (t["r"], t["u"], t["y"], t["phi"])),
    "init": (lk.ista_init_step, lambda t: (t["y"], t["Q"], t["phi"])),
}


def _ista_tensors(n=7, big_d=12, d=3):
    g = torch.Generator().manual_seed(3)
    shapes = {"r": (n, big_d), "u": (n, big_d), "y": (n, d), "phi": (d, big_d), "Q": (big_d, d)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _run(fn, inputs, grad, backend):
    leaves = [t.clone().requires_grad_() for t in inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's "invalid value" warnings from the Triton interpreter
        out = fn(*leaves, backend=backend)
        out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("mode", sorted(_STEP))
def test_ista_one_element_w_of_any_rank(mode, rank, backend):
    fn, data = _STEP[mode]
    t = _ista_tensors()
    inputs = list(data(t)) + [_one_element(0.3, rank)]
    grad = torch.randn(7, 12)
    ref_out, ref_grads = _run(fn, inputs, grad, "reference")
    out, grads = _run(fn, inputs, grad, backend)
    torch.testing.assert_close(out, ref_out)
    assert grads[-1].shape == inputs[-1].shape
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()))


def _pattern(t):
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("w", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("mode", sorted(_STEP))
def test_ista_nonfinite_step_size_matches_the_reference_pattern(mode, w, backend):
    fn, data = _STEP[mode]
    t = _ista_tensors()
    t["phi"][0, 3] = 0.0  # an inf * 0 in the reference's products
    inputs = list(data(t)) + [torch.tensor(w)]
    grad = torch.randn(7, 12, generator=torch.Generator().manual_seed(5))
    grad[2, 4] = 0.0
    ref_out, ref_grads = _run(fn, inputs, grad, "reference")
    out, grads = _run(fn, inputs, grad, backend)
    assert torch.equal(_pattern(out), _pattern(ref_out)), "forward"
    assert not ref_out.isfinite().all()
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert torch.equal(_pattern(a), _pattern(e)), f"gradient of input {i}"
        finite = e.isfinite()
        scale = max([1.0] + e[finite].abs().tolist())
        torch.testing.assert_close(a[finite], e[finite], rtol=1e-5, atol=1e-5 * scale)
