"""The Haar transform's Triton kernels compiled for sm_90 by Triton's own compiler (no GPU needed)."""
import os

import pytest


# ----------------------------------------------------------------------- Triton GPU code generation
_SM90_COMPILE = r'''
import collections, re, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from leanvae_kernels.triton import haar as TH

def compile_one(fn, dtype, consts, divisible):
    sig = {}
    for n in fn.arg_names:
        sig[n] = ("constexpr" if n in consts else "*" + dtype if n.endswith("_ptr") else "fp32" if n.startswith("scale")
                  else "i64" if n.startswith("s") else "i32")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    return collections.Counter(re.findall(r"(ld|st)\.global\.(v\d\.)?b(\d+)", ptx))

identity = dict(S0=0, S1=1, S2=2, S3=3, S4=4, S5=5, S6=6, S7=7, MASK=255)
dropped = dict(S0=2, S1=-1, S2=0, S3=-1, S4=1, S5=-1, S6=-1, S7=-1, MASK=0x17)
for fn, unit in ((TH._haar_analysis_kernel, ("sxw", "siw", "svw")), (TH._haar_synthesis_kernel, ("siw", "svw", "syw"))):
    compile_one(fn, "fp32", dict(F0=0, BH=8, BW=32, **dropped), [])
    # A contiguous 1080p launch: unit W strides, other strides and W divisible by 16 (runtime specialisation).
    div = [n for n in fn.arg_names if n.endswith("_ptr") or n in ("W", "Wo") or (n[0] == "s" and n[1] in "xivy" and n not in unit)]
    counts = compile_one(fn, "bf16", dict(F0=1, BH=4, BW=64, **identity, **{u: 1 for u in unit}), div)
    wide = sum(c for (op, vec, bits), c in counts.items() if vec or int(bits) > 16)
    print(fn.__name__, dict(counts), "wide" if wide else "scalar-only")
'''


def test_triton_kernels_compile_for_sm90():
    """The interpreter does not run Triton's GPU compiler: compile both kernels for sm_90 (PTX and cubin,
    no GPU needed) and check that a contiguous bfloat16 launch gets wide (vector) global accesses."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith(" wide") for line in lines), proc.stdout
