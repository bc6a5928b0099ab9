"""The GEGLU Triton kernels compiled for sm_90 by Triton's own compiler and ptxas (no GPU needed)."""
import os

import pytest


# ----------------------------------------------------------------------- Triton GPU code generation
_SM90_COMPILE = r'''
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from leanvae_kernels.triton import geglu as TG

def compile_one(fn, dtype, block):
    sig = {n: "constexpr" if n == "BLOCK" else ("*" + dtype if n.endswith("_ptr") else "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index("BLOCK"),): block})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    log = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True, check=True).stderr
    return int(re.search(r"(\d+) bytes spill stores", log).group(1))

for dtype in ("bf16", "fp32", "fp16"):
    for fn in (TG._geglu_fwd_kernel, TG._geglu_bwd_kernel):
        print(dtype, fn.fn.__name__, compile_one(fn, dtype, TG._BLOCK))
'''


def test_triton_kernels_compile_for_sm90_without_spills():
    """The interpreter does not run Triton's GPU compiler (nor libdevice's erf): compile both kernels for
    sm_90 in every GPU dtype (no GPU needed) and check that nothing spills."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.split()
    spills = [int(v) for v in lines[2::3]]
    assert len(spills) == 6 and spills == [0] * 6, proc.stdout
