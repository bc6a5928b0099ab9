"""End to end: LeanVAE encode+decode, reference vs torch.compile(reference) vs fused kernels.

CPU: 17x256x256 float32. GPU: 17x1080x1920 bfloat16 (and float32). Set LEANVAE_BENCH_E2E_SIZE=TxHxW to
override (e.g. 5x64x64 for a quick check).
"""
import os

import pytest
import torch
from harness import DEVICE, ON_GPU, providers, run

from leanvae.bench import build_model, synthetic_clip

SIZE = os.environ.get("LEANVAE_BENCH_E2E_SIZE")
if SIZE:
    FRAMES, HEIGHT, WIDTH = (int(v) for v in SIZE.split("x"))
else:
    FRAMES, HEIGHT, WIDTH = (17, 1080, 1920) if ON_GPU else (17, 256, 256)
DTYPES = [torch.bfloat16, torch.float32] if ON_GPU else [torch.float32]


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, dtype):
    if dtype not in models:
        models[dtype] = build_model(4, DEVICE, dtype)
    return models[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("provider", providers("reference", "compile", "cpu", "triton", "cuda"))
def test_encode_decode(benchmark, models, provider, dtype):
    from leanvae.fused.switch import use_fused_kernels

    model = _model(models, dtype)
    clip = synthetic_clip(FRAMES, HEIGHT, WIDTH, 1, DEVICE, dtype)
    handle = use_fused_kernels(model, backend=provider) if provider in ("cpu", "triton", "cuda") else None
    try:
        torch._dynamo.reset()
        enc, dec = model.encode, model.decode
        if provider == "compile":
            enc, dec = torch.compile(enc), torch.compile(dec)

        def fn():
            with torch.no_grad():
                return dec(enc(clip))

        run(benchmark, provider, fn, dtype=dtype, mode="encode+decode", warmup=1,
            rounds=int(os.environ.get("LEANVAE_BENCH_ROUNDS", "5" if ON_GPU else "3")))
        benchmark.extra_info["shape"] = f"{FRAMES}x{HEIGHT}x{WIDTH}"
    finally:
        if handle is not None:
            handle.revert()
