"""ptxas for sm_90 (setup.py's flags): the ISTA step CUDA kernels do not spill.

At d = 4 and 16 (the model's, DMAX 4 and 16) and, since the backward's d > 16 path accumulates 16 phi rows
per pass, at d <= 64 too (DMAX 64 spilled 544-576 bytes at 255 registers before). One compile of
csrc/cuda/ista_step.cu (every dtype, mode and specialisation), a few minutes on a loaded 2-core machine;
skipped where nvcc is absent.
"""
import re

import pytest
from cuda_tools import find_nvcc, ptxas_usage

pytestmark = pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found: the CUDA kernels cannot be compiled here")


@pytest.fixture(scope="module")
def usage():
    return ptxas_usage("csrc/cuda/ista_step.cu")


def _kernels(usage, direction):
    pat = re.compile(rf"_ista_step_{direction}_kernel<([^,]+), (\d), (\d+)>")
    return {m.groups(): u for name, u in usage.items() if (m := pat.search(name))}


def test_every_specialisation_compiled(usage):
    fwd, bwd = _kernels(usage, "fwd"), _kernels(usage, "bwd")
    # 3 dtypes x 3 modes x (fwd: 8 or 4 row groups; bwd: DMAX 4, 16, 64)
    assert len(fwd) == 18 and len(bwd) == 27, sorted(usage)
    assert {k[2] for k in bwd} == {"4", "16", "64"}


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_no_spills(usage, direction):
    spilled = {k: (u.registers, u.spills) for k, u in _kernels(usage, direction).items() if u.spills or u.stack_frame}
    assert not spilled, f"(dtype, mode, specialisation): (registers, spilled bytes) {spilled}"
