"""The native modules on this machine are built from the sources in this tree: the CPU module always, the
CUDA module wherever nvcc exists (a syntax or template error in a .cu file must fail here, even on a machine
without a GPU, and a stale build must not let the CUDA tests skip silently on one)."""
import importlib

import pytest
from cuda_tools import find_nvcc

from leanvae_kernels import _native


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_native_module_built_from_these_sources(name):
    if name == "cuda" and find_nvcc() is None:
        pytest.skip("nvcc not found: the CUDA module is not built here")
    mod = importlib.import_module(_native._MODULES[name])
    assert mod.API_VERSION == _native.API_VERSION
    assert mod.SOURCE_HASH == _native.source_hash(), (
        f"{_native._MODULES[name]} was built from other sources: rebuild with `pip install -e .`")
