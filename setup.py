"""Builds the native modules of leanvae-kernels.

    leanvae_kernels._C       CPU kernels (C++17, OpenMP), always built
    leanvae_kernels._C_cuda  CUDA kernels, built when nvcc is found (or CUDA_HOME is set)

Neither includes torch headers: the Python side passes data pointers, shapes and strides, so the
build needs only a C++ compiler, pybind11 and ninja (plus nvcc for the CUDA part), never torch.

Environment switches:
    LEANVAE_KERNELS_BUILD_CUDA   "1" require the CUDA module, "0" skip it, unset: build it if nvcc is found
    LEANVAE_KERNELS_CUDA_ARCH    target list, TORCH_CUDA_ARCH_LIST style ("9.0+PTX", "8.0;9.0a"); falls back
                                 to TORCH_CUDA_ARCH_LIST, default "9.0+PTX" (Hopper plus PTX for newer GPUs)
    LEANVAE_KERNELS_CPU_ARCH     value for -march (default "native": the package is built where it runs);
                                 "" leaves the compiler default
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

        march = os.environ.get("LEANVAE_KERNELS_CPU_ARCH", "native")
        info = [f"cxx={os.path.basename(cxx)}", f"march={march or 'default'}"]
        defines = [f"-DLEANVAE_MODULE_NAME={module_name}", f'-DLEANVAE_SOURCE_HASH="{source_hash()}"']
        includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
        cflags = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
        if march:
            cflags.append(f"-march={march}")
        ldflags = ["-shared"]
        rules = [
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
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
        for src in ext.sources:
            src = os.path.join(ROOT, src)
            obj = os.path.join(tmp, os.path.relpath(src, CSRC).replace(os.sep, "_") + ".o")
            objects.append(obj)
            rule = "nvcc" if src.endswith(".cu") else "cxx"
            builds.append(f"build {obj}: {rule} {src}")
        builds.append(f"build {target}: link {' '.join(objects)}")
        rules += ["rule link", "  command = $cxx $in $ldflags -o $out", "  description = LINK $out"]

        # builddir: ninja keeps its .ninja_log/.ninja_deps there, not in the source tree.
        variables = [f"builddir = {tmp}", f"cxx = {cxx}", f"cflags = {_q(cflags + defines + includes)}",
                     f"ldflags = {_q(ldflags)}"]
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


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildNative})
