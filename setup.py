"""Builds the native modules of leanvae-kernels.

    leanvae_kernels._C       CPU kernels (C++17, OpenMP), always built
    leanvae_kernels._C_cuda  CUDA kernels, built when nvcc is found (or CUDA_HOME is set)

Neither includes torch headers: the Python side passes data pointers, shapes and strides, so the
build needs only a C++ compiler, pybind11 and ninja (plus nvcc for the CUDA part), never torch.

By default the build is portable: one module runs on any CPU of the target architecture. On x86-64 every
CPU kernel source is compiled once per SIMD path of CPU_PATHS (baseline x86-64, AVX2+FMA, AVX-512) and
the module runs, per kernel, the best path the CPU it is loaded on supports (chosen at load time with
__builtin_cpu_supports; everything outside the kernels is compiled for the baseline). Elsewhere (aarch64:
NEON is part of the baseline) the kernels are compiled once for the compiler's default target.

Each module records the instruction-set extensions it needs (REQUIRED_ISA, also readable from the file
without importing it); the loader refuses a module that needs a feature the CPU lacks instead of letting
it die with SIGILL.

Environment switches:
    LEANVAE_KERNELS_BUILD_CUDA   "1" require the CUDA module, "0" skip it, unset: build it if nvcc is found
    LEANVAE_KERNELS_CUDA_ARCH    target list, TORCH_CUDA_ARCH_LIST style ("9.0+PTX", "8.0;9.0a"); falls back
                                 to TORCH_CUDA_ARCH_LIST, default "9.0+PTX" (Hopper plus PTX for newer GPUs)
    LEANVAE_KERNELS_CPU_ARCH     unset or "portable": the portable build above (default); any other value is
                                 passed to -march (e.g. "native": this machine's CPU only, one path, the
                                 module is refused on a CPU that lacks one of its features); "" builds one
                                 path with the compiler's default target
    LEANVAE_KERNELS_BUILD_JOBS   parallel compile jobs (default: CPU count)
    CUDA_HOME                    CUDA toolkit root (default: the parent of nvcc's bin/)
"""
import glob
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


# SIMD paths of the portable x86-64 build, lowest first: (name, extra -m flags). Each name in a path's
# flags is also the feature's __builtin_cpu_supports name (csrc/common/registry.cpp knows these), every
# path's features include the previous path's, and the objects are linked lowest path first: where the
# linker merges an inline function that several paths emit (a libstdc++ template), it keeps the copy of the
# lowest path that has it, which every path that calls it can run.
X86_BASELINE = ["-march=x86-64", "-mtune=generic"]
CPU_PATHS = [
    ("x86-64", []),
    ("avx2", ["avx2", "fma"]),
    ("avx512", ["avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"]),
]

# Predefined macros of instruction-set extensions the compiler may use -> the feature's name in Linux's
# /proc/cpuinfo ("flags" on x86, "Features" on arm64), where the loader looks for it.
ISA_MACROS = {
    "__MMX__": "mmx", "__SSE__": "sse", "__SSE2__": "sse2", "__SSE3__": "pni", "__SSSE3__": "ssse3",
    "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2", "__SSE4A__": "sse4a", "__POPCNT__": "popcnt",
    "__LZCNT__": "abm", "__MOVBE__": "movbe", "__BMI__": "bmi1", "__BMI2__": "bmi2", "__ADX__": "adx",
    "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__FMA4__": "fma4", "__XOP__": "xop", "__F16C__": "f16c",
    "__AES__": "aes", "__PCLMUL__": "pclmulqdq", "__SHA__": "sha_ni", "__GFNI__": "gfni", "__VAES__": "vaes",
    "__VPCLMULQDQ__": "vpclmulqdq", "__RDRND__": "rdrand", "__RDSEED__": "rdseed",
    "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd", "__AVX512BW__": "avx512bw", "__AVX512DQ__": "avx512dq",
    "__AVX512VL__": "avx512vl", "__AVX512IFMA__": "avx512ifma", "__AVX512VBMI__": "avx512vbmi",
    "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512VNNI__": "avx512_vnni", "__AVX512BITALG__": "avx512_bitalg",
    "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq", "__AVX512BF16__": "avx512_bf16", "__AVX512FP16__": "avx512_fp16",
    "__AVXVNNI__": "avx_vnni", "__AMX_TILE__": "amx_tile",
    "__ARM_FEATURE_SVE": "sve", "__ARM_FEATURE_SVE2": "sve2", "__ARM_FEATURE_DOTPROD": "asimddp",
    "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC": "asimdhp", "__ARM_FEATURE_MATMUL_INT8": "i8mm",
    "__ARM_FEATURE_BF16_VECTOR_ARITHMETIC": "bf16", "__ARM_FEATURE_ATOMICS": "atomics",
}


def compiler_macros(cxx, flags):
    """The macros `cxx` predefines with `flags` (names only)."""
    out = subprocess.run([cxx, *flags, "-dM", "-E", "-x", "c++", os.devnull], check=True, capture_output=True,
                         text=True).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}


def cpu_build_plan(cxx, arch):
    """For LEANVAE_KERNELS_CPU_ARCH=`arch` (None: unset): (base flags of every object, SIMD paths as
    [(name, extra flags)], a description, the required-ISA record "<march>:<cpuinfo features>")."""
    x86 = "__x86_64__" in compiler_macros(cxx, [])
    if arch in (None, "portable"):
        if x86:
            base = list(X86_BASELINE)
            paths = [(name, [f"-m{f}" for f in feats]) for name, feats in CPU_PATHS]
            label = "portable " + "|".join(name for name, _ in CPU_PATHS)
        else:
            base, paths, label = [], [("baseline", [])], "portable"
        march = "x86-64" if x86 else "default"
    else:
        base = [f"-march={arch}"] if arch else []
        label = march = arch or "default"
        paths = [(march, [])]
    features = sorted({ISA_MACROS[m] for m in compiler_macros(cxx, base) if m in ISA_MACROS})
    return base, paths, label, f"{march}:{','.join(features)}"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def source_hash():
    """Hash of every file under csrc/: the loader compares it to spot a stale build."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(CSRC, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, CSRC).replace(os.sep, "/").encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def find_nvcc():
    """(nvcc, CUDA_HOME) or (None, None). nvcc on PATH may be a wrapper script, so the toolkit root is
    the first candidate that holds include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(on_path))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            nvcc = os.path.join(home, "bin", "nvcc")
            if os.path.exists(nvcc):
                return nvcc, home
            if on_path:
                return on_path, home
    return None, None


def cuda_gencode_flags(spec):
    """"8.0;9.0+PTX" -> nvcc -gencode flags (sm_XY for each, plus compute_XY PTX where marked)."""
    flags = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        arch = item[:-4] if ptx else item
        suffix = "a" if arch.endswith("a") else ""
        num = arch.rstrip("a").replace(".", "")
        if not num.isdigit():
            raise RuntimeError(f"LEANVAE_KERNELS_CUDA_ARCH: cannot parse {item!r} (expected e.g. 9.0, 9.0a or 9.0+PTX)")
        flags += ["-gencode", f"arch=compute_{num}{suffix},code=sm_{num}{suffix}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{num}{suffix},code=compute_{num}{suffix}"]
    if not flags:
        raise RuntimeError("LEANVAE_KERNELS_CUDA_ARCH is empty")
    return flags


def ninja_binary():
    try:
        import ninja  # the PyPI package ships the binary

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


def _q(args):
    return " ".join(shlex.quote(a) for a in args)


class NativeExtension(Extension):
    def __init__(self, name, sources, cuda=False):
        super().__init__(name, sources=sources)
        self.cuda = cuda


class BuildNative(build_ext):
    """Compiles every source with ninja (parallel, incremental via depfiles), then links."""

    def build_extension(self, ext):
        import pybind11

        cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX").split()[0] or "c++"
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        module_name = ext.name.rsplit(".", 1)[-1]
        tmp = os.path.abspath(os.path.join(self.build_temp, module_name))
        os.makedirs(tmp, exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)

        base_flags, paths, cpu_label, required_isa = cpu_build_plan(cxx, os.environ.get("LEANVAE_KERNELS_CPU_ARCH"))
        if ext.cuda:
            paths = paths[:1]  # only host code: everything runs on the baseline
        info = [f"cxx={os.path.basename(cxx)}", f"cpu={cpu_label if not ext.cuda else required_isa.split(':')[0]}"]
        path_list = ";".join(f"{name}:{','.join(f[2:] for f in flags)}" for name, flags in paths)
        defines = [f"-DLEANVAE_MODULE_NAME={module_name}", f'-DLEANVAE_SOURCE_HASH="{source_hash()}"',
                   f'-DLEANVAE_REQUIRED_ISA="{required_isa}"', f'-DLEANVAE_CPU_PATHS="{path_list}"']
        includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
        cflags = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas",
                  "-Wno-psabi"] + base_flags  # psabi: vector-return ABI notes; per-path helpers are internal
        ldflags = ["-shared"]
        rules = [
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags $pathflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $in",
        ]
        builds = []
        objects = []

        if ext.cuda:
            nvcc, cuda_home = find_nvcc()
            arch = os.environ.get("LEANVAE_KERNELS_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0+PTX"
            gencode = cuda_gencode_flags(arch)
            defines.append("-DLEANVAE_WITH_CUDA")
            info += [f"cuda={cuda_home}", f"archs={arch}"]
            nvflags = ["-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-ccbin", cxx,
                       "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"] + gencode + includes
            for flag in base_flags:  # host code for the same CPUs as the rest of the module
                nvflags += ["-Xcompiler", flag]
            includes.append(f"-I{os.path.join(cuda_home, 'include')}")
            rules += [
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvflags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = NVCC $in",
            ]
            libdirs = [os.path.join(cuda_home, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib",
                                                            "targets/sbsa-linux/lib")]
            libdir = next((d for d in libdirs if os.path.exists(os.path.join(d, "libcudart_static.a"))), None)
            if libdir is None:
                raise RuntimeError(f"libcudart_static.a not found under {cuda_home}")
            # Static runtime: the module needs only the driver (libcuda) at run time, whatever CUDA
            # runtime torch was built with.
            ldflags += [f"-L{libdir}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
        else:
            cflags.append("-fopenmp")
            ldflags.append("-fopenmp")

        build_info = ";".join(info)
        defines.append(f'-DLEANVAE_BUILD_INFO="{build_info}"')
        kernel_sources = []
        for src in ext.sources:
            src = os.path.join(ROOT, src)
            if not ext.cuda and os.path.relpath(src, CSRC).startswith("cpu" + os.sep):
                kernel_sources.append(src)  # compiled once per SIMD path, below
                continue
            obj = os.path.join(tmp, os.path.relpath(src, CSRC).replace(os.sep, "_") + ".o")
            objects.append(obj)
            rule = "nvcc" if src.endswith(".cu") else "cxx"
            builds.append(f"build {obj}: {rule} {src}")
        # Lowest path first (see CPU_PATHS): link order decides which copy of a merged inline function stays.
        for index, (name, flags) in enumerate(paths):
            ident = "".join(c if c.isalnum() else "_" for c in name)
            pathflags = flags + [f"-DLEANVAE_CPU_PATH_INDEX={index}", f"-DLEANVAE_CPU_PATH_NS=path_{ident}"]
            for src in kernel_sources:
                obj = os.path.join(tmp, os.path.relpath(src, CSRC).replace(os.sep, "_") + f".{ident}.o")
                objects.append(obj)
                builds.append(f"build {obj}: cxx {src}\n  pathflags = {_q(pathflags)}")
        builds.append(f"build {target}: link {' '.join(objects)}")
        rules += ["rule link", "  command = $cxx $in $ldflags -o $out", "  description = LINK $out"]

        # builddir: ninja keeps its .ninja_log/.ninja_deps there, not in the source tree.
        variables = [f"builddir = {tmp}", f"cxx = {cxx}", f"cflags = {_q(cflags + defines + includes)}",
                     "pathflags =", f"ldflags = {_q(ldflags)}"]
        if ext.cuda:
            variables += [f"nvcc = {nvcc}", f"nvflags = {_q(nvflags + defines)}"]
        ninja_file = os.path.join(tmp, "build.ninja")
        with open(ninja_file, "w") as f:
            f.write("\n".join(variables + rules + builds) + "\n")

        jobs = os.environ.get("LEANVAE_KERNELS_BUILD_JOBS") or str(os.cpu_count() or 1)
        ninja = ninja_binary()
        if ninja is None:
            raise RuntimeError("ninja not found: pip install ninja (it is a build requirement in pyproject.toml)")
        print(f"building {ext.name} ({build_info})", flush=True)
        subprocess.check_call([ninja, "-C", tmp, "-f", ninja_file, "-j", jobs])


def extensions():
    common = _rel(glob.glob(os.path.join(CSRC, "common", "*.cpp"))) + ["csrc/bindings.cpp"]
    exts = [NativeExtension("leanvae_kernels._C", common + _rel(glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))))]
    mode = os.environ.get("LEANVAE_KERNELS_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise RuntimeError(f"LEANVAE_KERNELS_BUILD_CUDA must be 0, 1 or unset, got {mode!r}")
    nvcc, _ = find_nvcc()
    if mode == "1" and nvcc is None:
        raise RuntimeError("LEANVAE_KERNELS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if mode == "1" or (mode == "" and nvcc is not None):
        cuda_sources = _rel(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        exts.append(NativeExtension("leanvae_kernels._C_cuda", common + cuda_sources, cuda=True))
    else:
        print("leanvae-kernels: building without CUDA kernels "
              f"({'LEANVAE_KERNELS_BUILD_CUDA=0' if mode == '0' else 'nvcc not found'})", file=sys.stderr)
    return exts


# pip (setuptools.build_meta) and `python setup.py` both run this file as __main__; tests import it for
# cpu_build_plan without building anything.
if __name__ == "__main__":
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildNative})
