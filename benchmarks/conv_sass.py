"""Static SASS census of the CUDA causal-conv kernels for sm_90 (no GPU needed).

    python benchmarks/conv_sass.py [--source csrc/cuda/causal_conv.cu] [--rev GIT_REV] [--all]

Compiles the source with setup.py's nvcc flags (`-cubin`, sm_90), disassembles it with cuobjdump (the
pip wheels nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm, or the toolkit's), and prints one row per
kernel instantiation: ptxas registers / spill bytes, then, for the main frame loop (of the innermost loops, found from their backward
branches, those holding the most FFMA, and of these the shortest: the steady-state loop; for the weight
gradient, its steady frame loop inside the row loop), static counts of its
instructions: total, FFMA, global loads by width (LDG, and LDGSTS: cp.async), shared-memory loads and
stores, integer address arithmetic (IMAD.WIDE*, IADD3*, LEA*, IMAD.X, IMAD.SHL, SHF*), global bytes per
load (mean width), and non-FFMA instructions per FFMA. Static counts, not a profile: a loop body with two
copies of the tap code (the grad input's border and interior threads) counts both, cold branches count
as much as hot ones; the numbers are a prediction of cost until a GPU runs the kernels. `--rev`
compiles csrc/ as it was at a git revision (for a before/after table).
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from cuda_tools import CSRC, ROOT, find_nvcc, parse_ptxas, _demangle  # noqa: E402


def find_cuobjdump():
    """A cuobjdump that can disassemble: it runs nvdisasm, from its own folder or PATH. None if there is none."""
    candidates = []
    try:
        import nvidia

        base = os.path.dirname(list(nvidia.__path__)[0])
        candidates += [os.path.join(base, "nvidia", sub, "bin", "cuobjdump") for sub in ("cu13", "cu12", "cuda_cuobjdump")]
    except ImportError:
        pass
    nvcc = find_nvcc()
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(nvcc), "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    for path in candidates:
        if path and os.path.exists(path) and (
                os.path.exists(os.path.join(os.path.dirname(path), "nvdisasm")) or shutil.which("nvdisasm")):
            return path
    return None


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRA = re.compile(r"^(?:BRA|BRX)\b")
_ADDR_OPS = ("IMAD.WIDE", "IADD3", "LEA", "IMAD.X", "IMAD.SHL", "SHF")
_LDG_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def ldg_width(op):
    for part in op.split(".")[1:]:
        if part in _LDG_BYTES:
            return _LDG_BYTES[part]
    return 4


def parse_sass(text):
    """cuobjdump -sass text -> {mangled function: [(address, opcode, operands)]}."""
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _INSN.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return funcs


def frame_loop(insns):
    """The instructions of the main frame loop: of the innermost loops (backward branches) that hold FFMA
    (a loop holding another loop with FFMA, such as the weight gradient's row loop around its frame loops,
    is not one), those with the most FFMA, and of these the shortest (the reworked kernels run their steady
    frames in a lean loop of their own and the first and last frames in a general one; the original
    kernels have a single frame loop)."""
    loops = []
    for addr, op, args in insns:
        if not _BRA.match(op):
            continue
        m = re.search(r"0x([0-9a-f]+)", args)
        if not m or int(m.group(1), 16) > addr:
            continue
        lo = int(m.group(1), 16)
        body = [i for i in insns if lo <= i[0] <= addr]
        ffma = sum(i[1].startswith("FFMA") for i in body)
        if ffma:
            loops.append((lo, addr, ffma, body))
    inner = [l for l in loops if not any(o is not l and l[0] <= o[0] and o[1] <= l[1] for o in loops)]
    if not inner:
        return insns
    return max(inner, key=lambda l: (l[2], -len(l[3])))[3]


def census(body):
    c = collections.Counter()
    for _, op, _ in body:
        c["total"] += 1
        if op.startswith("FFMA"):
            c["ffma"] += 1
        elif op.startswith("LDG") and not op.startswith("LDGDEPBAR"):  # LDG, LDGSTS (cp.async)
            w = ldg_width(op)
            c[f"ldg{w}"] += 1
            c["ldg"] += 1
            c["ldg_bytes"] += w
        elif op.startswith("LDS"):
            c["lds"] += 1
        elif op.startswith("STS"):
            c["sts"] += 1
        elif op.startswith("STG"):
            c["stg"] += 1
        elif op.startswith("BAR"):
            c["bar"] += 1
        if op.startswith(_ADDR_OPS):
            c["addr"] += 1
    return c


def short_name(demangled):
    m = re.search(r"(_\w+_kernel)<([^>]*)>", demangled)
    if not m:
        return demangled.split("(")[0].split("::")[-1]
    args = [a.strip() for a in m.group(2).split(",")]
    dtype = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}.get(args[0], args[0])
    kind = m.group(1).replace("_causal_dwconv3d_", "").replace("_kernel", "") or "conv"
    flags = args[1:]
    if kind == "kernel" or kind == "":
        kind = "conv"
    if kind == "conv" and len(flags) == 2:
        kind = ("bwd_input" if flags[1] == "true" else "fwd") + ("/vec" if flags[0] == "true" else "/scalar")
    elif kind == "wgrad" and flags:
        kind += "/vec" if flags[0] == "true" else "/scalar"
    return f"{kind} {dtype}"


def compile_cubin(source, tmp, csrc=CSRC):
    nvcc = find_nvcc()
    if nvcc is None:
        raise SystemExit("nvcc not found")
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    cubin = os.path.join(tmp, "k.cubin")
    cmd = [nvcc, "-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-gencode", "arch=compute_90,code=sm_90",
           f"-I{csrc}", f"-I{os.path.join(home, 'include')}", "-Xptxas", "-v", "-cubin", source, "-o", cubin]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"nvcc failed:\n{proc.stderr[-4000:]}")
    return cubin, parse_ptxas(proc.stderr + proc.stdout)


def checkout_rev(rev, tmp):
    """csrc/ as of git revision `rev`, written under tmp; returns the path of its causal_conv.cu."""
    files = subprocess.run(["git", "-C", ROOT, "ls-tree", "-r", "--name-only", rev, "csrc"], capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        dst = os.path.join(tmp, f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as out:
            out.write(subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{f}"], capture_output=True, check=True).stdout)
    return os.path.join(tmp, "csrc", "cuda", "causal_conv.cu")


def table(source, include_all=False, rev=None):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if rev:
            source = checkout_rev(rev, tmp)
        elif not os.path.isabs(source):
            source = os.path.join(ROOT, source)
        # compiled against the csrc/ that holds the source (a revision's own headers)
        csrc = os.path.dirname(os.path.dirname(source))
        cubin, usage = compile_cubin(source, tmp, csrc if os.path.isdir(os.path.join(csrc, "common")) else CSRC)
        sass = subprocess.run([find_cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    funcs = parse_sass(sass)
    names = _demangle(list(funcs))
    for mangled, insns in funcs.items():
        name = short_name(names[mangled])
        if not include_all and "/vec" not in name and "/scalar" not in name:
            continue
        u = usage.get(mangled)
        c = census(frame_loop(insns))
        rows.append((name, u, c))
    rows.sort(key=lambda r: r[0])
    return rows


def print_table(rows, out=sys.stdout):
    hdr = ("kernel", "regs", "spill B", "loop insns", "FFMA", "LDG 16/8/4/2 B", "LDS", "STS", "addr", "B/LDG",
           "non-FFMA/FFMA")
    print("| " + " | ".join(hdr) + " |", file=out)
    print("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 1)) + "|", file=out)
    for name, u, c in rows:
        ldg = "/".join(str(c[f"ldg{w}"]) for w in (16, 8, 4, 2))
        bpl = f"{c['ldg_bytes'] / c['ldg']:.1f}" if c["ldg"] else "-"
        ratio = f"{(c['total'] - c['ffma']) / c['ffma']:.2f}" if c["ffma"] else "-"
        regs = str(u.registers) if u else "?"
        spill = str(u.spills + u.stack_frame) if u else "?"
        print(f"| {name} | {regs} | {spill} | {c['total']} | {c['ffma']} | {ldg} | {c['lds']} | {c['sts']} | "
              f"{c['addr']} | {bpl} | {ratio} |", file=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="csrc/cuda/causal_conv.cu")
    ap.add_argument("--rev", default=None, help="compile csrc/ as of this git revision instead of the work tree")
    ap.add_argument("--all", action="store_true", help="also list helper kernels (partial sums)")
    args = ap.parse_args()
    print_table(table(args.source, args.all, args.rev))


if __name__ == "__main__":
    main()
