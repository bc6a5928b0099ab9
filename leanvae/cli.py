"""Command line: `python -m leanvae {info,bench,reconstruct}`."""
import argparse
import os
import platform
import sys


def _version(name):
    try:
        mod = __import__(name)
        return getattr(mod, "__version__", "installed")
    except Exception as exc:  # not installed, or broken
        return f"not available ({exc.__class__.__name__})"


def cmd_info(args):
    import torch

    import leanvae_kernels
    from leanvae_kernels import _backend, _native, _triton

    out = []
    out.append("leanvae-kernels " + leanvae_kernels.__version__)
    out.append(f"  python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, numpy {_version('numpy')}")
    out.append(f"  cpu: {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            out.append(f"  cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}), torch CUDA {torch.version.cuda}")
    else:
        out.append("  cuda: no device visible to torch")
    out.append(f"  backend setting: {_backend.get_backend()} (set_backend() or {_backend.ENV_VAR})")
    out.append("native modules:")
    for backend in ("cpu", "cuda"):
        built, text = _native.build_info(backend)
        mod, reason = _native.module(backend)
        state = "usable" if mod is not None else f"not usable: {reason}"
        out.append(f"  {backend}: {'built (' + text + ')' if built else 'not built: ' + text}")
        out.append(f"       {state}")
    out.append("triton:")
    for dev in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
        out.append(f"  {dev}: {_triton.status(dev)[1]}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out.append("ops (backends usable now, by device; 'auto' takes the first):")
    for op in _backend.ALL_OPS:
        if op.name.endswith("_backward"):
            continue
        for dev in devices:
            order = [b for b in ("cuda", "triton", "cpu", "reference") if op.status(b, dev)[0]]
            missing = [f"{b}: {op.status(b, dev)[1]}" for b in ("cuda", "triton", "cpu") if b in op.impls and not op.status(b, dev)[0]]
            line = f"  {op.name:<18} {dev:<5} {', '.join(order)}"
            if args.verbose and missing:
                line += "   [" + "; ".join(missing) + "]"
            out.append(line)
    print("\n".join(out))
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="python -m leanvae", description="LeanVAE with fused kernels")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, built native modules, and which backend serves each op")
    info.add_argument("-v", "--verbose", action="store_true", help="say why each missing backend is missing")
    info.set_defaults(func=cmd_info)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
