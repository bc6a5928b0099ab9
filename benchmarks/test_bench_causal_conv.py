"""Benchmarks: the causal depthwise 3x3x3 conv (the model's PEG3D), forward and backward.

    python -m pytest benchmarks/test_bench_causal_conv.py --benchmark-enable -q \
        --benchmark-json=benchmarks/results/causal_conv_<device>.json

Shapes: on the CPU (1, 5, 32, 32, 512) float32; on a GPU (1, 5, 135, 240, 512) (a 17-frame 1080p clip's
token grid) in bfloat16 and float32. Providers:
    reference             the model's PEG3D module (pad copy, transpose copy, native depthwise conv3d)
    compile               torch.compile of that module
    conv3d_channels_last  F.conv3d on the channels_last_3d view of the tokens with the causal padding, what a
                          careful user would try first
    cpu / triton / cuda   leanvae_kernels.causal_dwconv3d on that backend
bytes_moved: each input read once and each output written once (x and y; the fused op also writes its
two-frame cache; backward: grad_y and x read, grad_x written).
"""
import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, ON_GPU, backend_of, target, compiled, providers, run

import leanvae_kernels as lk
from leanvae.modules import PEG3D

SHAPE = target((1, 5, 135, 240, 512), (1, 5, 32, 32, 512), dry=(1, 3, 6, 6, 16))
DTYPES = [torch.bfloat16, torch.float32] if ON_GPU else [torch.float32]
FUSED = ("cpu", "triton", "cuda")
PROVIDERS = providers("reference", "compile", "cpu", "triton", "cuda") + [pytest.param("conv3d_channels_last")]


def conv3d_channels_last(x, weight, bias):
    """PEG3D as conv3d on the channels_last_3d view of x: (B, T, H, W, C) -> (B, T, H, W, C)."""
    xt = F.pad(x.permute(0, 4, 1, 2, 3), (0, 0, 0, 0, 2, 0))  # causal frames in front; stays channels-last
    return F.conv3d(xt, weight, bias, padding=(0, 1, 1), groups=x.shape[-1]).permute(0, 2, 3, 4, 1)


def _setup(dtype, requires_grad):
    torch.manual_seed(0)
    x = torch.randn(SHAPE, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)
    peg = PEG3D(SHAPE[-1]).to(DEVICE, dtype).requires_grad_(requires_grad)
    return x, peg


def _op(provider, peg):
    """x -> y for the provider."""
    w, b = peg.ds_conv.weight, peg.ds_conv.bias
    if provider == "reference":
        return peg
    if provider == "compile":
        return compiled(peg)
    if provider == "conv3d_channels_last":
        return lambda x: conv3d_channels_last(x, w, b)
    backend = backend_of(provider)
    return lambda x: lk.causal_dwconv3d(x, w, b, backend=backend)[0]


def _bytes(x, provider, mode):
    size = x.numel() * x.element_size()
    if mode == "forward":
        return 2 * size + (2 * size // SHAPE[1] if provider in FUSED else 0)
    return 3 * size


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward(benchmark, provider, dtype):
    x, peg = _setup(dtype, requires_grad=False)
    op = _op(provider, peg)
    with torch.no_grad():
        run(benchmark, provider, lambda: op(x), bytes_moved=_bytes(x, provider, "forward"), dtype=dtype, mode="forward")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_backward(benchmark, provider, dtype):
    x, peg = _setup(dtype, requires_grad=True)
    y = _op(provider, peg)(x)
    g = torch.randn_like(y)
    wrt = [x, peg.ds_conv.weight, peg.ds_conv.bias]
    run(benchmark, provider, lambda: torch.autograd.grad(y, wrt, g, retain_graph=True),
        bytes_moved=_bytes(x, provider, "backward"), dtype=dtype, mode="backward")
