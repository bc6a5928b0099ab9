"""No silent slow path: when "auto" cannot use a native module that should be usable (missing, stale,
failed to load), the first fused call warns once per process, with the reason and the command that fixes
it; deliberate or expected absences (disabled, CUDA kernels never built, no CUDA device) stay quiet."""
import importlib
import warnings

import pytest
import torch

import leanvae_kernels as lk
from leanvae.cli import main
from leanvae_kernels import _backend, _native


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not warned yet; the loader's cache is cleared before and after the test."""
    monkeypatch.setattr(_backend, "_warned_native", set())
    _native.module.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    _native.module.cache_clear()


def _native_warnings(record):
    return [w for w in record if issubclass(w.category, lk.NativeUnavailableWarning)]


def test_stale_cpu_module_warns_once_with_reason_and_fix(fresh):
    fresh.setattr(_native, "source_hash", lambda: "0123456789abcdef")  # as if csrc/ had been edited
    x, theta = torch.randn(4, 5), torch.tensor([0.3])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = lk.soft_threshold(x, theta)  # "auto" on the CPU: the reference runs instead
        lk.haar_dwt3d(torch.randn(1, 2, 4, 4, 4))
        lk.soft_threshold(x, theta)
    got = _native_warnings(record)
    assert len(got) == 1, [str(w.message) for w in got]
    msg = str(got[0].message)
    assert "leanvae_kernels._C is stale" in msg and "0123456789abcdef" in msg
    assert "pip install -e ." in msg and "python setup.py build_ext --inplace" in msg
    torch.testing.assert_close(out, lk.soft_threshold_reference(x, theta))
    with pytest.raises(lk.BackendUnavailable, match="_C is stale"):
        lk.soft_threshold(x, theta, backend="cpu")


def test_info_shows_the_reason_and_the_fix(fresh, capsys):
    fresh.setattr(_native, "source_hash", lambda: "0123456789abcdef")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "not usable: leanvae_kernels._C is stale" in out and "pip install -e ." in out


def test_missing_cpu_module_is_expected_and_reported(fresh):
    real = importlib.import_module

    def no_cpu_module(name, *args):
        if name == "leanvae_kernels._C":
            raise ImportError("No module named 'leanvae_kernels._C'")
        return real(name, *args)

    fresh.setattr(_native.importlib, "import_module", no_cpu_module)
    problem = _native.expected_but_unusable("cpu")
    assert problem is not None and "not built or failed to load" in problem and "pip install -e ." in problem
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lk.geglu(torch.randn(3, 8))
    assert len(_native_warnings(record)) == 1


def test_deliberate_or_expected_absences_do_not_warn(fresh):
    # No CUDA device here (or CUDA kernels not built): nothing that should be there is missing.
    if not torch.cuda.is_available():
        assert _native.expected_but_unusable("cuda") is None
    fresh.setenv("LEANVAE_KERNELS_DISABLE_NATIVE", "1")
    _native.module.cache_clear()
    assert _native.module("cpu")[0] is None and _native.expected_but_unusable("cpu") is None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lk.soft_threshold(torch.randn(3), torch.tensor([0.1]))
    assert _native_warnings(record) == []


def test_a_usable_module_does_not_warn(fresh):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lk.soft_threshold(torch.randn(3), torch.tensor([0.1]))
        lk.soft_threshold(torch.randn(3), torch.tensor([0.1]), backend="reference")
    assert _native.expected_but_unusable("cpu") is None and _native_warnings(record) == []
