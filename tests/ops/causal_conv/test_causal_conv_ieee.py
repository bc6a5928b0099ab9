"""IEEE semantics of the causal depthwise conv: with Inf or NaN in x, the cache or the weights, every
backend gives the `reference` backend's NaN/Inf pattern (and its finite values) in y and in every gradient.

The reference is F.conv3d on a zero-padded frame with explicit zero frames (no cache, past a group's
end): its forward multiplies that padding by the weights (0 * Inf = NaN), while its backward only forms
products of real outputs with the frames they read. The kernels must do the same: multiply the padding
in the forward, skip out-of-range taps in grad input and grad weight.
"""
import pytest
import torch
from conftest import DEVICE, kernel_backends
from cuda_emu import conv_fns

from leanvae_kernels.ops.causal_conv import causal_dwconv3d_reference
import leanvae_kernels as lk

INF, NAN = float("inf"), float("nan")
# name: (group_size, with cache, W, where to put the value in x / cache / weight, value)
CASES = {
    "x_inf": (0, True, 4, dict(x=(0, 1, 1, 1, 0)), INF),
    "x_nan": (0, True, 4, dict(x=(0, 1, 1, 1, 0)), NAN),
    "x_inf_corner": (0, True, 4, dict(x=(0, 3, 0, 0, 1)), -INF),
    "x_inf_last_column_of_a_partial_tile": (0, True, 10, dict(x=(0, 2, 1, 9, 0)), INF),
    "x_inf_w13": (0, True, 13, dict(x=(0, 2, 1, 11, 0)), INF),
    "cache_inf": (0, True, 4, dict(cache=(0, 1, 2, 3, 0)), INF),
    "cache_inf_w10": (0, True, 10, dict(cache=(0, 1, 1, 9, 1)), -INF),
    "w_inf_border_tap": (0, True, 4, dict(weight=(0, 0, 1, 0, 1)), INF),
    "w_nan_centre_tap": (0, True, 4, dict(weight=(1, 0, 2, 1, 1)), NAN),
    "w_inf_cache_tap_no_cache": (0, False, 4, dict(weight=(0, 0, 0, 1, 1)), INF),
    "group_w_inf_next_frame_tap": (2, True, 4, dict(weight=(0, 0, 2, 1, 1)), INF),
    "group_w_nan_next_frame_corner": (3, True, 5, dict(weight=(1, 0, 2, 0, 2)), NAN),
    "group_w_inf_prev_tap_no_cache": (2, False, 4, dict(weight=(1, 0, 0, 1, 1)), -INF),
    "group_x_inf": (2, True, 4, dict(x=(0, 1, 1, 2, 0)), INF),
    "group_grad_inf_at_group_end": (2, True, 4, dict(grad_y=(0, 1, 1, 1, 0)), INF),
}
NAMES = ("y", "grad_x", "grad_weight", "grad_bias", "grad_cache")


def _case(group_size, with_cache, w, where, value, c=2):
    b, t, h = 1, 4, 3
    p = 1 if group_size else 2
    g = torch.Generator().manual_seed(5)
    t_ = dict(x=torch.randn(b, t, h, w, c, generator=g), weight=torch.randn(c, 1, 3, 3, 3, generator=g) * 0.3,
              bias=torch.randn(c, generator=g), cache=torch.randn(b, p, h, w, c, generator=g),
              grad_y=torch.randn(b, t, h, w, c, generator=g), grad_cache=torch.randn(b, p, h, w, c, generator=g))
    for name, idx in where.items():
        t_[name][idx] = value
    if not with_cache:
        t_["cache"] = None
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in t_.items()}


def _run(fn, t, group_size):
    """(y, grads of x, weight, bias, cache) with upstream gradients grad_y and grad_cache."""
    if fn.startswith("cuda_emulation"):
        fwd, bwd = conv_fns("_cudaemu_vec" if fn == "cuda_emulation_vec" else "_cudaemu")
        y, _ = fwd(t["x"], t["weight"], t["bias"], t["cache"], False, group_size)
        return (y,) + bwd(t["grad_y"], t["grad_cache"], t["x"], t["weight"], t["bias"], t["cache"], False, group_size)
    leaves = [t[k].clone().requires_grad_() if t[k] is not None else None for k in ("x", "weight", "bias", "cache")]
    if fn == "reference":
        y, nc = causal_dwconv3d_reference(*leaves, False, group_size)
    else:
        y, nc = lk.causal_dwconv3d(*leaves, group_size=group_size, backend=fn)
    torch.autograd.backward([y, nc], [t["grad_y"], t["grad_cache"]])
    return (y.detach(),) + tuple(v.grad if v is not None else None for v in leaves)


def _pattern(t):
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    return torch.where(torch.isnan(t), 1, torch.where(t == INF, 2, torch.where(t == -INF, 3, 0)))


# The CUDA kernels run on the CPU under the race checker (tests/cuda_emu.py).
FNS = kernel_backends() + [pytest.param("cuda_emulation", id="cuda_emulation", marks=pytest.mark.racecheck),
                           pytest.param("cuda_emulation_vec", id="cuda_emulation_vec", marks=pytest.mark.racecheck)]


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("case", list(CASES))
def test_nan_inf_pattern_matches_reference(fn, case):
    group_size, with_cache, w, where, value = CASES[case]
    # The CUDA kernels' vector path (16-byte loads) needs C a multiple of 4 float32 channels.
    t = _case(group_size, with_cache, w, where, value, c=4 if fn == "cuda_emulation_vec" else 2)
    expected = _run("reference", t, group_size)
    got = _run(fn, t, group_size)
    assert any(_pattern(e).any() for e in expected if e is not None), "the case must produce a non-finite value"
    for name, a, e in zip(NAMES, got, expected):
        if e is None:
            assert a is None, name
            continue
        pa, pe = _pattern(a), _pattern(e)
        assert torch.equal(pa, pe), f"{name}: NaN {int((pa == 1).sum())} vs {int((pe == 1).sum())}, " \
                                    f"Inf {int((pa >= 2).sum())} vs {int((pe >= 2).sum())}"
        fin = pe == 0
        torch.testing.assert_close(a[fin].double(), e[fin].double(), rtol=1e-5, atol=1e-5, msg=name)
