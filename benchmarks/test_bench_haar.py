"""Benchmarks of the Haar patch transform (the model's Patcher / UnPatcher) and the LC-VAE latent compression.

    python -m pytest benchmarks/test_bench_haar.py --benchmark-enable -q \
        --benchmark-json=benchmarks/results/haar_<device>_<date>.json

Shapes: on the CPU a 17x256x256 clip (B=1, C=3); on a GPU 17x1080x1920 (the acceptance shape). Modes:
forward, backward (the backward alone, on a retained graph), forward+backward. Providers: the model's
module (reference), torch.compile of it, and the fused backends. Bandwidth counts each input read once
and each output written once (forward: the video and its sub-bands; backward: their gradients).
"""
import pytest
import torch
from harness import DEVICE, backend_of, compiled, providers, run, target

import leanvae_kernels as lk
from leanvae.wavelets import Patcher, UnPatcher
from leanvae.fused.haar import FusedPatcher, FusedUnPatcher, HaarLatentCompressor

CLIP = target((1, 3, 17, 1080, 1920), (1, 3, 17, 256, 256), dry=(1, 3, 5, 8, 8))
LATENT = target((1, 16, 8, 136, 240), (1, 16, 4, 32, 32), dry=(1, 4, 2, 4, 4))
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16")]
MODES = ["forward", "backward", "forward+backward"]
PROVIDERS = providers("reference", "compile", "cpu", "triton", "cuda")

_compiled = {}


def _module(kind, provider):
    """The module a provider runs: the model's own (reference, compiled once) or the fused drop-in."""
    ref_cls, fused_cls = {"patch": (Patcher, FusedPatcher), "unpatch": (UnPatcher, FusedUnPatcher)}[kind]
    if provider == "reference":
        return ref_cls().to(DEVICE)
    if provider == "compile":
        if kind not in _compiled:
            _compiled[kind] = compiled(ref_cls().to(DEVICE))
        return _compiled[kind]
    return fused_cls().to(DEVICE)


def _flat(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]


def _timed(benchmark, provider, mode, dtype, fn, inputs, nbytes):
    """Runs `fn(*inputs)` in `mode`; the fused providers run under their backend (which the graph of
    the backward mode records at its forward, hence the whole setup inside the block)."""
    fused = provider in ("cpu", "triton", "cuda")
    with lk.use_backend(backend_of(provider) if fused else "auto"):
        grads = [torch.randn_like(t) for t in _flat(fn(*inputs))] if mode != "forward" else None

        def forward():
            return fn(*inputs)

        def forward_backward():
            torch.autograd.backward(_flat(fn(*inputs)), grads)

        if mode == "forward":
            step = forward
        elif mode == "forward+backward":
            step = forward_backward
        else:
            outs = _flat(fn(*inputs))

            def step():
                torch.autograd.grad(outs, inputs, grads, retain_graph=True)

        factor = 2 if mode == "forward+backward" else 1
        run(benchmark, provider, step, bytes_moved=factor * nbytes, dtype=dtype, mode=mode)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_patch(benchmark, provider, dtype, mode):
    benchmark.group = f"patch {'x'.join(map(str, CLIP[2:]))} {str(dtype)[6:]} {mode}"
    x = torch.randn(CLIP, device=DEVICE, dtype=dtype).requires_grad_(mode != "forward")
    module = _module("patch", provider)
    out = _flat(FusedPatcher()(x.detach()))
    nbytes = (x.numel() + sum(t.numel() for t in out)) * x.element_size()
    _timed(benchmark, provider, mode, dtype, module, [x], nbytes)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_unpatch(benchmark, provider, dtype, mode):
    benchmark.group = f"unpatch {'x'.join(map(str, CLIP[2:]))} {str(dtype)[6:]} {mode}"
    xi, xv = (t.requires_grad_(mode != "forward") for t in FusedPatcher()(torch.randn(CLIP, device=DEVICE, dtype=dtype)))
    module = _module("unpatch", provider)
    nbytes = 2 * (xi.numel() + xv.numel()) * xi.element_size()  # the bands in, the same count of samples out

    def fn(a, b):
        return module((a, b))

    _timed(benchmark, provider, mode, dtype, fn, [xi, xv], nbytes)


@pytest.mark.parametrize("provider", providers("reference", "compile", "cpu", "triton", "cuda"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_latent_compress_roundtrip(benchmark, provider, dtype, mode):
    """HaarLatentCompressor(levels=1) forward: compress then decompress (two fused passes)."""
    benchmark.group = f"latent L1 {'x'.join(map(str, LATENT[1:]))} {str(dtype)[6:]} {mode}"
    z = torch.randn(LATENT, device=DEVICE, dtype=dtype).requires_grad_(mode != "forward")
    comp = HaarLatentCompressor(levels=1)
    if provider == "reference":
        from leanvae_kernels.ops.haar_multilevel import haar_latent_compress_reference, haar_latent_decompress_reference

        def fn(t):
            return haar_latent_decompress_reference(haar_latent_compress_reference(t))
    elif provider == "compile":
        from leanvae_kernels.ops.haar_multilevel import haar_latent_compress_reference, haar_latent_decompress_reference

        fn = _compiled.setdefault("latent", compiled(
            lambda t: haar_latent_decompress_reference(haar_latent_compress_reference(t))))
    else:
        fn = comp
    # compress: read z, write half of it; decompress: read that half, write z.
    nbytes = 3 * z.numel() * z.element_size()
    _timed(benchmark, provider, mode, dtype, fn, [z], nbytes)
