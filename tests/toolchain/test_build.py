"""The native modules on this machine are built from the sources in this tree: the CPU module always, the
CUDA module wherever nvcc exists (a syntax or template error in a .cu file must fail here, even on a machine
without a GPU, and a stale build must not let the CUDA tests skip silently on one)."""
import importlib

import pytest
from cuda_tools import find_nvcc, ptxas_usage

from leanvae_kernels import _native


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_native_module_built_from_these_sources(name):
    if name == "cuda" and find_nvcc() is None:
        pytest.skip("nvcc not found: the CUDA module is not built here")
    mod = importlib.import_module(_native._MODULES[name])
    assert mod.API_VERSION == _native.API_VERSION
    assert mod.SOURCE_HASH == _native.source_hash(), (
        f"{_native._MODULES[name]} was built from other sources: rebuild with `pip install -e .`")


# Users build for their own GPUs (LEANVAE_KERNELS_CUDA_ARCH / TORCH_CUDA_ARCH_LIST), often a list that starts
# at Turing (sm_75, e.g. T4) or Ampere (sm_80): every CUDA source must compile for those too, not only for the
# default sm_90 (the conv's cp.async staging needs sm_80 and has a synchronous fallback before it).
@pytest.mark.parametrize("source,arch", [("causal_conv.cu", "75"), ("causal_conv.cu", "80"), ("haar.cu", "75"),
                                         ("ista_step.cu", "75"), ("soft_threshold.cu", "75")])
def test_cuda_sources_compile_for_older_gpus(source, arch):
    if find_nvcc() is None:
        pytest.skip("nvcc not found")
    usage = ptxas_usage(f"csrc/cuda/{source}", arch=arch)  # raises with nvcc's message when it fails
    assert usage, f"no kernel compiled from {source} for sm_{arch}"
