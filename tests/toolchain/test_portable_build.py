"""The portable native build: one CPU module runs on any CPU of its architecture, with the best SIMD path
that CPU has, and a module built for features the CPU lacks is refused with its reason, never run.

- every SIMD path compiled into the CPU module that this CPU can run gives the reference's results, on
  every CPU kernel (forward and backward);
- the module's own feature detection agrees with what Linux reports;
- loading a module that records a feature the CPU lacks (a pretend CPU, a pretend module) is refused
  with the -march and the missing feature named, before any of its code runs;
- outside the code compiled per SIMD path, nothing in the module (static initialisers included: they
  run at import, whatever the CPU) uses an AVX/AVX-512 instruction;
- the CPU kernel sources build for aarch64 with the portable flags (where a cross compiler exists).
"""
import glob
import importlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess

import pytest
import torch
from helpers import assert_close

import leanvae_kernels as lk
from leanvae_kernels import _native

from helpers import ROOT  # noqa: E402


def _cpu_module():
    mod, reason = _native.module("cpu")
    if mod is None:
        pytest.skip(f"native CPU module unavailable: {reason}")
    return mod


def _path_params():
    mod, reason = _native.module("cpu")
    if mod is None:
        return [pytest.param("none", marks=pytest.mark.skip(reason=f"native CPU module unavailable: {reason}"))]
    return [pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=f"this CPU lacks {features}"))
            for name, features, ok in mod.cpu_paths()]


def _run_every_cpu_kernel(dtype):
    """Each CPU op (forward and backward) on small shapes with vector tails, against the reference."""
    torch.manual_seed(0)
    checks = []

    def check(name, fn, ref, *inputs):
        ins = [t.detach().clone().requires_grad_(t.is_floating_point() and t.requires_grad) for t in inputs]
        rins = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
        out, expected = fn(*ins), ref(*rins)
        outs = out if isinstance(out, tuple) else (out,)
        exps = expected if isinstance(expected, tuple) else (expected,)
        pairs = [(o, e) for o, e in zip(outs, exps) if o is not None and o.is_floating_point()]
        for k, (o, e) in enumerate(pairs):
            assert_close(o, e, dtype, msg=f"{name}: output {k}")
        grads = [torch.randn_like(o) for o, _ in pairs]
        torch.autograd.backward([o for o, _ in pairs], grads)
        torch.autograd.backward([e for _, e in pairs], [g.float() for g in grads])
        for k, (a, b) in enumerate(zip(ins, rins)):
            if a.requires_grad:
                assert_close(a.grad, b.grad, dtype, msg=f"{name}: grad of input {k}")
        checks.append(name)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    check("haar_patch", lambda x: lk.haar_patch(x, backend="cpu"), lk.haar_patch_reference, rnd(1, 3, 5, 10, 14))
    xi, xv = lk.haar_patch_reference(torch.randn(1, 3, 5, 10, 14))
    check("haar_unpatch", lambda a, b: lk.haar_unpatch(a, b, backend="cpu"), lk.haar_unpatch_reference,
          xi.to(dtype).requires_grad_(), xv.to(dtype).requires_grad_())
    # C = 37: the conv's channel blocks have a vector part and a tail.
    check("causal_dwconv3d",
          lambda x, w, b, c: lk.causal_dwconv3d(x, w, b, c, residual=True, backend="cpu"),
          lambda x, w, b, c: lk.causal_dwconv3d_reference(x, w, b, c, residual=True),
          rnd(1, 3, 5, 7, 37), rnd(37, 1, 3, 3, 3), rnd(37), rnd(1, 2, 5, 7, 37, grad=False))
    r, y, phi, w = rnd(37, 72), rnd(37, 19), rnd(19, 72) * 0.2, torch.full((1,), 0.3, dtype=dtype).requires_grad_()
    check("ista_step", lambda *a: lk.ista_step(*a, backend="cpu"), lk.ista_step_reference, r, y, phi, w)
    check("ista_residual_step", lambda *a: lk.ista_residual_step(*a, backend="cpu"), lk.ista_residual_step_reference,
          r, rnd(37, 72), y, phi, w)
    check("ista_init_step", lambda *a: lk.ista_init_step(*a, backend="cpu"), lk.ista_init_step_reference,
          y, rnd(72, 19) * 0.2, phi, w)
    check("soft_threshold", lambda x, t: lk.soft_threshold(x, t, backend="cpu"), lk.soft_threshold_reference,
          rnd(5, 67), torch.full((1,), 0.4, dtype=dtype).requires_grad_())
    check("geglu", lambda u: lk.geglu(u, backend="cpu"), lk.geglu_reference, rnd(37, 2 * 53))
    return checks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("path", _path_params())
def test_every_simd_path_matches_reference(path, dtype, monkeypatch):
    mod = _cpu_module()
    called = set()
    real_run = _native.run

    def recording_run(backend, kernel, *args, **kwargs):
        called.add(kernel)
        return real_run(backend, kernel, *args, **kwargs)

    monkeypatch.setattr(_native, "run", recording_run)
    previous = mod.set_cpu_path(path)
    try:
        assert mod.cpu_path() == path
        _run_every_cpu_kernel(dtype)
    finally:
        mod.set_cpu_path(previous)
    # The CUDA-emulation kernels are test machinery, checked by their own tests on the default path.
    kernels = {k for k in mod.kernels() if "cudaemu" not in k}
    assert kernels <= called, f"kernels not exercised on path {path}: {sorted(kernels - called)}"


def test_best_path_is_the_default_and_unknown_or_unsupported_paths_are_refused():
    mod = _cpu_module()
    paths = mod.cpu_paths()
    supported = [name for name, _, ok in paths if ok]
    assert paths[0][2], "path 0 is what the whole module was built for: it must run wherever the module loads"
    assert mod.cpu_path() == supported[-1]
    with pytest.raises(ValueError, match="no SIMD path named 'sse9'"):
        mod.set_cpu_path("sse9")
    for name, features, ok in paths:
        if not ok:
            with pytest.raises(ValueError, match=f"lacks a feature of SIMD path {name}"):
                mod.set_cpu_path(name)
    assert mod.cpu_path() == supported[-1]


# __builtin_cpu_supports names that Linux spells the same way in /proc/cpuinfo.
_SAME_NAME = {"avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "popcnt"}


def test_module_feature_detection_agrees_with_linux():
    mod = _cpu_module()
    have = _native.cpu_features()
    if have is None:
        pytest.skip("no /proc/cpuinfo here")
    checked = 0
    for name, features, ok in mod.cpu_paths():
        if set(features) <= _SAME_NAME:
            assert ok == (set(features) <= have), f"path {name} ({features}): module says {ok}"
            checked += 1
    assert checked == len(mod.cpu_paths())


def test_module_records_the_isa_it_requires_in_the_file():
    mod = _cpu_module()
    march, features = _native.required_isa(mod.__file__)
    assert mod.REQUIRED_ISA == f"{march}:{','.join(features)}"
    if "portable" in mod.BUILD_INFO and platform.machine() == "x86_64":
        # The portable x86-64 build needs what every x86-64 CPU has; the rest is chosen at run time.
        assert march == "x86-64" and set(features) <= {"mmx", "sse", "sse2", "fxsr"}, mod.REQUIRED_ISA


def test_module_needing_a_feature_the_cpu_lacks_is_refused_before_import(monkeypatch):
    mod = _cpu_module()
    march, features = _native.required_isa(mod.__file__)
    assert features, "the module records no feature: nothing to pretend away"
    lacking = features[-1]
    have = _native.cpu_features() or frozenset(features)
    monkeypatch.setattr(_native, "cpu_features", lambda: frozenset(have - {lacking}))
    imported = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name, *a))
    _native.module.cache_clear()
    try:
        got, reason = _native.module("cpu")
        built, text = _native.build_info("cpu")
    finally:
        _native.module.cache_clear()
    assert got is None
    assert f"-march={march}" in reason and f"lacks ({lacking})" in reason and "LEANVAE_KERNELS_CPU_ARCH" in reason
    assert built and text == reason
    assert _native._MODULES["cpu"] not in imported, "the module was imported before the ISA check refused it"
    monkeypatch.undo()
    assert _native.module("cpu")[0] is mod  # the real CPU has it: usable again


def test_refusal_names_every_missing_feature_of_a_native_build(tmp_path, monkeypatch):
    """A module built with -march=native on an AVX-512 machine, loaded on an AVX2 one."""
    fake = tmp_path / "_C_fake.so"
    fake.write_bytes(b"\x7fELF" + b"\0" * 64 + b"leanvae-required-isa=native:avx,avx2,avx512bw,avx512f,fma,sse2\0"
                     + b"\0" * 64)
    assert _native.required_isa(str(fake)) == ("native", ["avx", "avx2", "avx512bw", "avx512f", "fma", "sse2"])

    class Spec:
        origin = str(fake)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: Spec)
    monkeypatch.setattr(_native, "cpu_features", lambda: frozenset({"sse2", "avx", "avx2", "fma"}))
    reason = _native.isa_refusal("leanvae_kernels._C_fake")
    assert reason.startswith("leanvae_kernels._C_fake was built for -march=native and needs CPU features "
                             "this CPU lacks (avx512bw, avx512f)")
    monkeypatch.setattr(_native, "cpu_features", lambda: frozenset({"sse2", "avx", "avx2", "fma", "avx512f", "avx512bw"}))
    assert _native.isa_refusal("leanvae_kernels._C_fake") is None
    monkeypatch.setattr(_native, "cpu_features", lambda: None)  # another OS: nothing known, nothing refused
    assert _native.isa_refusal("leanvae_kernels._C_fake") is None
    fake.write_bytes(b"\x7fELF" + b"\0" * 64)  # built before modules recorded their ISA
    assert _native.required_isa(str(fake)) is None


_AVX = re.compile(r"%[yz]mm\d|%k[0-7]\b")  # AT&T operands: ymm/zmm/mask registers


def test_only_per_path_code_uses_avx():
    """Every function of the module outside the per-path code (the kernel files' anonymous namespaces and
    the path_* inline namespaces, compiled once per SIMD path) is baseline code: the static initialisers
    (what runs at import on any CPU: the kernel registrations), the registry, the binding, and the inline
    functions the linker keeps one copy of (libstdc++ templates, kernel_args.h), whichever path emitted
    them. None may contain a VEX/EVEX instruction or a ymm/zmm/mask register."""
    mod = _cpu_module()
    if platform.machine() != "x86_64":
        pytest.skip("x86-64 only")
    if "portable" not in mod.BUILD_INFO:
        pytest.skip(f"not the portable build ({mod.BUILD_INFO}): a -march build may use its ISA everywhere")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not found")
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", mod.__file__], check=True, capture_output=True,
                          text=True, timeout=120).stdout
    shared, initialisers, per_path_avx, bad, current = set(), 0, 0, {}, None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            current = head.group(1)
            per_path = "_GLOBAL__N_" in current or "path_" in current
            initialisers += current.startswith("_GLOBAL__sub_I")
            if not per_path:
                shared.add(current)
            continue
        if current is None or "\t" not in line:
            continue
        insn = line.split("\t", 1)[1].strip()
        if insn.startswith("v") or _AVX.search(insn):
            if per_path:
                per_path_avx += 1
            else:
                bad.setdefault(current, insn)
    paths = [name for name, _, _ in mod.cpu_paths()]
    assert initialisers >= len(paths), f"found {initialisers} static initialisers, expected one per kernel file and path"
    assert len(shared) > 100, f"only {len(shared)} shared functions found: is the module stripped?"
    if "avx2" in paths:
        assert per_path_avx > 1000, "the AVX paths contain no AVX instruction: the check sees nothing"
    assert not bad, "baseline code uses AVX:\n" + "\n".join(f"{k}: {v}" for k, v in list(bad.items())[:20])


def test_cpu_kernels_compile_for_aarch64_with_the_portable_flags():
    """The portable build on aarch64 compiles the kernels once for the compiler's default target (NEON)."""
    cross = shutil.which("aarch64-linux-gnu-g++")
    if cross is None:
        pytest.skip("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
    spec = importlib.util.spec_from_file_location("leanvae_setup", os.path.join(ROOT, "setup.py"))
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # defines the build plan; builds nothing (not __main__)

    base, paths, _, required = setup_py.cpu_build_plan(cross, None)
    assert base == [] and [p for p, _ in paths] == ["baseline"], (base, paths)
    # The kernels and the registry (whose CPU-feature check is x86-only code); the binding needs the target's
    # Python headers. -O0: the vector-extension code and OpenMP still lower to NEON, in a tenth of -O3's time.
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))) + [os.path.join(ROOT, "csrc", "common",
                                                                                           "registry.cpp")]
    procs = [subprocess.Popen([cross, "-std=c++17", "-O0", "-fopenmp", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                               "-Wno-psabi", *base, f"-I{os.path.join(ROOT, 'csrc')}", "-c", src, "-o", os.devnull],
                              stderr=subprocess.PIPE, text=True) for src in sources]
    errors = []
    for src, p in zip(sources, procs):
        _, err = p.communicate(timeout=300)
        if p.returncode != 0:
            errors.append(f"{os.path.relpath(src, ROOT)}:\n{err}")
    assert not errors, "\n".join(errors)
    assert required.startswith("default:")
