"""Benchmarks: the ISTA-Net+ bottleneck's gradient step and soft threshold, forward and backward.

    python -m pytest benchmarks/test_bench_ista.py --benchmark-enable -q \
        --benchmark-json=benchmarks/results/ista_<device>.json

Shapes: on the CPU 20,000 tokens x 512 float32; on a GPU 162,000 tokens x 512 (a 17-frame 1080p clip's
latent grid, 5 x 135 x 240) in bfloat16 and float32; latent d = 4 and 16. Cases:
    step_threshold         ista_step then soft_threshold (the acceptance case: fused >= 3x the reference on the CPU)
    step, threshold        each alone
    init_step              the model's first reconstruction y @ Q.T and the first step (fused: never stored)
    residual_step          the model's `recon_r + naf_out` and the next step (fused: the sum never stored)
    *_unfused              the same two on the fused providers without the fusion (torch's mm / add, then
                           ista_step): the difference to the fused case is what the fusion saves
Providers: reference (the model's expressions, eager), compile (torch.compile of them), cpu, triton, cuda.
bytes_moved: the case's inputs read once and outputs written once (the unfused variants use their fused
case's figure, so their bandwidth fraction shows the cost of the extra round trip). The backward mode
times torch.autograd.grad on a retained graph; torch.compile's backward is compiled without buffer
donation for that (donated buffers cannot be reused by a second backward).
"""
import types

import pytest
import torch
import torch._functorch.config  # not loaded by `import torch` alone (the ops no longer import torch._dynamo)
import torch.nn.functional as F
from harness import DEVICE, ON_GPU, backend_of, target, compiled, providers, run

import leanvae_kernels as lk

N, D = target((162_000, 512), (20_000, 512), dry=(64, 32))
DTYPES = [torch.bfloat16, torch.float32] if ON_GPU else [torch.float32]
LATENTS = [4, 16]
PROVIDERS = providers("reference", "compile", "cpu", "triton", "cuda")
DTYPE_IDS = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def model_step(x, y, phi, w):
    """The published ISTA.recon step."""
    return x - w * torch.mm(torch.mm(x, phi.t()) - y, phi)


def model_threshold(x, theta):
    """The published ISTA.recon soft threshold."""
    return torch.mul(torch.sign(x), F.relu(torch.abs(x) - theta))


# case -> (reference(t), fused(t, backend), names of the differentiable inputs)
CASES = {
    "step_threshold": (
        lambda t: model_threshold(model_step(t.r, t.y, t.phi, t.w), t.theta),
        lambda t, b: lk.soft_threshold(lk.ista_step(t.r, t.y, t.phi, t.w, backend=b), t.theta, backend=b),
        ("r", "y", "phi", "w", "theta"),
    ),
    "step": (
        lambda t: model_step(t.r, t.y, t.phi, t.w),
        lambda t, b: lk.ista_step(t.r, t.y, t.phi, t.w, backend=b),
        ("r", "y", "phi", "w"),
    ),
    "threshold": (
        lambda t: model_threshold(t.r, t.theta),
        lambda t, b: lk.soft_threshold(t.r, t.theta, backend=b),
        ("r", "theta"),
    ),
    "init_step": (
        lambda t: model_step(torch.mm(t.y, t.Q.t()), t.y, t.phi, t.w),
        lambda t, b: lk.ista_init_step(t.y, t.Q, t.phi, t.w, backend=b),
        ("y", "Q", "phi", "w"),
    ),
    "residual_step": (
        lambda t: model_step(t.r + t.u, t.y, t.phi, t.w),
        lambda t, b: lk.ista_residual_step(t.r, t.u, t.y, t.phi, t.w, backend=b),
        ("r", "u", "y", "phi", "w"),
    ),
    "init_step_unfused": (
        None,
        lambda t, b: lk.ista_step(torch.mm(t.y, t.Q.t()), t.y, t.phi, t.w, backend=b),
        ("y", "Q", "phi", "w"),
    ),
    "residual_step_unfused": (
        None,
        lambda t, b: lk.ista_step(t.r + t.u, t.y, t.phi, t.w, backend=b),
        ("r", "u", "y", "phi", "w"),
    ),
}
BACKWARD_CASES = ["step_threshold", "step", "threshold", "init_step", "residual_step"]


def _bytes(case, d, dtype, mode):
    """Minimum traffic: every input read once, every output written once (the small phi, Q, w ignored)."""
    big, small = N * D, N * d
    fwd = {"step": 2 * big + small, "threshold": 2 * big, "init_step": small + big, "residual_step": 3 * big + small}
    bwd = {"step": 3 * big + 2 * small, "threshold": 3 * big, "init_step": big + 2 * small, "residual_step": 4 * big + 2 * small}
    for table in (fwd, bwd):
        table["step_threshold"] = table["step"] + table["threshold"]
    base = case.replace("_unfused", "")
    elems = {"forward": fwd[base], "backward": bwd[base], "forward_backward": fwd[base] + bwd[base]}[mode]
    return elems * torch.tensor([], dtype=dtype).element_size()


def _inputs(d, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)
        return t.requires_grad_(requires_grad)

    phi = rnd(d, D, scale=D**-0.5)
    # w and theta in the tokens' dtype, as in a model cast with .to(dtype)
    scalar = dict(device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    return types.SimpleNamespace(
        r=rnd(N, D), u=rnd(N, D), y=rnd(N, d), phi=phi, Q=rnd(D, d, scale=D**-0.5),
        w=torch.tensor(0.9, **scalar), theta=torch.tensor([0.01], **scalar),
    )


def _fn(provider, case):
    reference, fused, _ = CASES[case]
    if provider in ("reference", "compile"):
        if reference is None:
            pytest.skip("the unfused variants run on the fused providers only")
        return reference if provider == "reference" else compiled(reference)
    backend = backend_of(provider)
    return lambda t: fused(t, backend)


def _ids(dtype):
    return DTYPE_IDS[dtype]


def _group(benchmark, case, d, dtype, mode):
    benchmark.group = f"ista {case.replace('_unfused', '')} {N}x{D} d{d} {DTYPE_IDS[dtype]} {mode}"
    benchmark.extra_info.update(case=case, d=d, tokens=N, D=D)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("d", LATENTS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward(benchmark, provider, case, d, dtype):
    _group(benchmark, case, d, dtype, "forward")
    fn = _fn(provider, case)
    t = _inputs(d, dtype, requires_grad=False)
    with torch.no_grad():
        run(benchmark, provider, lambda: fn(t), bytes_moved=_bytes(case, d, dtype, "forward"), dtype=dtype, mode="forward")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("d", LATENTS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("case", BACKWARD_CASES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_backward(benchmark, provider, case, d, dtype):
    _group(benchmark, case, d, dtype, "backward")
    fn = _fn(provider, case)
    t = _inputs(d, dtype, requires_grad=True)
    # torch.compile builds its backward at the first backward call: keep the patch over the whole run
    with torch._functorch.config.patch(donated_buffer=False):
        out = fn(t)
        grad = torch.randn_like(out)
        wrt = [getattr(t, name) for name in CASES[case][2]]
        run(benchmark, provider, lambda: torch.autograd.grad(out, wrt, grad, retain_graph=True),
            bytes_moved=_bytes(case, d, dtype, "backward"), dtype=dtype, mode="backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("d", LATENTS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward_backward(benchmark, provider, d, dtype):
    case = "step_threshold"
    _group(benchmark, case, d, dtype, "forward_backward")
    fn = _fn(provider, case)
    t = _inputs(d, dtype, requires_grad=True)
    wrt = [getattr(t, name) for name in CASES[case][2]]
    grad = torch.randn(N, D, device=DEVICE, dtype=dtype)
    run(benchmark, provider, lambda: torch.autograd.grad(fn(t), wrt, grad),
        bytes_moved=_bytes(case, d, dtype, "forward_backward"), dtype=dtype, mode="forward_backward")
