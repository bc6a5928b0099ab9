"""`leanvae_kernels.check()` and `python -m leanvae check`: every op on every backend of the device against the
reference; a wrong kernel is reported as FAIL with exit status 1; a bad device is a one-line error."""
import os
import subprocess
import sys

import pytest
import torch

import leanvae_kernels as lk
from leanvae.cli import main
from leanvae_kernels import _selfcheck
from leanvae_kernels.ops import ista

from helpers import ROOT  # noqa: E402
PUBLIC_OPS = ("haar_dwt3d", "haar_dwt2d", "haar_idwt3d", "haar_idwt2d", "haar_patch", "haar_unpatch",
              "haar_latent_compress", "haar_latent_decompress", "causal_dwconv3d", "ista_step", "ista_residual_step",
              "ista_init_step", "soft_threshold", "geglu")


@pytest.fixture(autouse=True)
def _native_backends_only(monkeypatch):
    # tests/conftest.py sets TRITON_INTERPRET=1 on CPU-only machines; the check then adds the Triton
    # interpreter, minutes here (the Triton kernels have their own tests). Read per call, so this suffices.
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_every_registered_forward_op_is_checked():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("leanvae::")}
    assert {n for n in registered if not n.endswith("_backward")} == set(PUBLIC_OPS)


def test_check_on_cpu_passes_every_op_forward_and_backward(capsys):
    assert main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for op in PUBLIC_OPS:
        line = next(ln for ln in out.splitlines() if ln.startswith(op + " ") and " cpu " in ln)
        assert " pass " in line and "max error" in line and "bound" in line, line
    assert "FAIL" not in out
    assert "14 of 14 op/backend pairs passed" in out


def test_check_table_rows():
    rows = lk.check("cpu", dtypes=(torch.float32, torch.bfloat16), ops=["soft_threshold", "haar_dwt3d"])
    assert {(r.op, r.dtype, r.direction) for r in rows if r.backend == "cpu"} == {
        (op, dt, d) for op in ("soft_threshold", "haar_dwt3d") for dt in ("float32", "bfloat16") for d in ("fwd", "bwd")}
    for r in rows:
        if r.backend == "cpu":
            assert r.passed and 0 <= r.max_error <= r.bound == _selfcheck.BOUNDS[getattr(torch, r.dtype)]


def test_a_wrong_cpu_kernel_is_reported_as_fail_with_exit_status_1(monkeypatch, capsys):
    fn, dtypes = ista._st_fwd.impls["cpu"]

    def perturbed(x, theta):
        out = fn(x, theta)
        return out + 1e-2 * out.abs().max()  # well above every dtype's bound

    monkeypatch.setitem(ista._st_fwd.impls, "cpu", (perturbed, dtypes))
    real = lk.check
    monkeypatch.setattr(lk, "check", lambda device: real(device, dtypes=(torch.float32,)))  # one dtype: faster
    assert main(["check", "--device", "cpu", "-q"]) == 1
    out = capsys.readouterr().out
    fails = [ln for ln in out.splitlines() if " FAIL " in ln]
    assert len(fails) == 1 and fails[0].startswith("soft_threshold ") and "fwd" in fails[0], out
    assert "13 of 14 op/backend pairs passed, 1 FAILED" in out


def test_a_kernel_that_raises_is_a_failed_row_not_a_crash(monkeypatch):
    fn, dtypes = ista._st_bwd.impls["cpu"]

    def broken(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(ista._st_bwd.impls, "cpu", (broken, dtypes))
    rows = lk.check("cpu", dtypes=(torch.float32,), ops=["soft_threshold"], backends=["cpu"])
    assert [r.passed for r in rows] == [False, False] and "kernel exploded" in rows[0].note


def test_bad_device_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "leanvae", "check", "--device", "gpu0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines == ["leanvae check: device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"]


@pytest.mark.parametrize("device", ["cuda:99", "meta", ""])
def test_other_bad_devices_are_one_line_errors(device, capsys):
    assert main(["check", "--device", device]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("leanvae check: ") and "device" in lines[0]


def test_bad_arguments_of_the_function():
    with pytest.raises(ValueError, match="device must be"):
        lk.check("tpu")
    with pytest.raises(TypeError, match="dtypes"):
        lk.check("cpu", dtypes=(torch.int32,))
    with pytest.raises(ValueError, match="ops must name"):
        lk.check("cpu", ops=["not_an_op"])
