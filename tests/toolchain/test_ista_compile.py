"""The ISTA step's Triton kernels compiled for sm_90 by Triton's own compiler and ptxas (no GPU needed)."""
import os

import pytest


# ----------------------------------------------------------------------- Triton GPU code generation
_SM90_COMPILE = r'''
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from leanvae_kernels.triton import ista as TI

FLOAT32_PTRS = ("part_phi_ptr", "part_w_ptr", "grad_y_ptr", "w_ptr")

def compile_one(fn, dtype, consts):
    sig = {n: "constexpr" if n in consts else ("*fp32" if n in FLOAT32_PTRS else "*" + dtype) if n.endswith("_ptr")
           else "i32" for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=TI._LAUNCH)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    log = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Used (\d+) registers", log).group(1)), int(re.search(r"(\d+) bytes spill stores", log).group(1))

base = dict(BLOCK_N=TI._BLOCK_N, BLOCK_D=512, BLOCK_C=TI._BLOCK_C, BLOCK_K=16)
for dtype, fp32, modes in (("bf16", False, (0, 1, 2)), ("fp32", True, (1,))):
    for mode in modes:
        fwd = compile_one(TI._ista_step_fwd_kernel, dtype, dict(MODE=mode, FP32=fp32, **base))
        bwd = compile_one(TI._ista_step_bwd_kernel, dtype, dict(MODE=mode, FP32=fp32, INTERPRET=False, **base))
        print(dtype, mode, *fwd, *bwd)
'''


def test_triton_step_kernels_compile_for_sm90_without_spills():
    """The interpreter does not run Triton's GPU compiler: compile the step kernels for sm_90 (no GPU
    needed) at the model's D = 512, d = 16, in bfloat16 (tensor cores, every mode) and float32 (the
    heaviest mode), and check that no registers spill at the launch shape the launchers use."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split() for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 4, proc.stdout
    for dtype, mode, fwd_regs, fwd_spill, bwd_regs, bwd_spill in rows:
        assert fwd_spill == "0" and bwd_spill == "0", f"{dtype} mode {mode} spills: {proc.stdout}"
