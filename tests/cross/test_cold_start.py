"""Cold start: the first fused call on CPU tensors must not import Triton (nor
torch._dynamo, which imports Triton and cost ~0.9 s on the first call) unless a Triton kernel runs."""
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

PROBE = r"""
import json, sys, time
import torch
import leanvae_kernels as lk
x = torch.randn(1, 4, 5, 8, 8)
r, y, phi = torch.randn(6, 16, requires_grad=True), torch.randn(6, 4), torch.randn(4, 16)
t0 = time.perf_counter()
lk.haar_dwt3d(x)
lk.soft_threshold(r, torch.tensor([0.1])).sum().backward()
lk.ista_step(r, y, phi, torch.tensor(0.5)).sum().backward()
t1 = time.perf_counter()
print(json.dumps({"triton": "triton" in sys.modules, "dynamo": "torch._dynamo" in sys.modules,
                  "first_s": t1 - t0}))
"""


def _run(env_extra, code=PROBE):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LEANVAE_KERNELS_BACKEND")}
    env.update(env_extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("env", [{}, {"LEANVAE_KERNELS_BACKEND": "cpu"}, {"TRITON_INTERPRET": "1"}], ids=["auto", "cpu", "interp_auto"])
def test_first_fused_cpu_call_does_not_import_triton(env):
    got = _run(env)
    assert not got["triton"], "a fused CPU call imported triton"
    assert not got["dynamo"], "a fused CPU call imported torch._dynamo (which imports triton)"


def test_triton_is_imported_when_a_triton_kernel_runs():
    # The check above is not vacuous: the probe's modules do appear once a Triton kernel is really run.
    code = PROBE.replace("import leanvae_kernels as lk", "import leanvae_kernels as lk\nlk.set_backend('triton')")
    got = _run({"TRITON_INTERPRET": "1"}, code.replace("(1, 4, 5, 8, 8)", "(1, 1, 2, 2, 2)"))
    assert got["triton"]


def test_compile_after_a_cold_eager_call_still_works():
    # The eager calls skip torch's dynamo-disable wrapper only while torch._dynamo is unloaded; a later
    # torch.compile must still compile the same op and agree with eager.
    code = PROBE + r"""
f = torch.compile(lambda a: lk.soft_threshold(a, torch.tensor([0.1])) * 2, fullgraph=True, backend="aot_eager")
a = torch.randn(5, 7)
assert torch.equal(f(a), lk.soft_threshold(a, torch.tensor([0.1])) * 2)
assert torch.equal(lk.haar_dwt3d(x), lk.haar_dwt3d_reference(x))
print(json.dumps({"ok": True}))
"""
    assert _run({}, code)["ok"]
