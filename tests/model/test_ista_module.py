"""FusedISTA and fused_ista_recon against the model's ISTA: parameters, recon/forward values and every
gradient for latent 4 and 16, float64 / float32 / bfloat16 / float16 models, autocast, strided input, binding.

The scalar parameters' gradients (weights[i], threshold[i]) are sums over every token with heavy
cancellation (e.g. -0.0085 from ~1000 terms of size ~1), so float32 summation noise exceeds the table's
float32 tolerance for them, for the model as much as for the fused path: they are checked exactly in
float64 here, and in every dtype at op level against the sum of their terms' magnitudes.
"""
import types

import numpy as np
import pytest
import torch
from conftest import DEVICE, kernel_backends
from helpers import assert_close

import leanvae_kernels as lk
from leanvae.modules import ISTA
from leanvae.fused.ista import FusedISTA, fused_ista_forward, fused_ista_recon

LATENTS = [4, 16]
SHAPE = (1, 3, 4, 5)  # (B, T, H, W): 60 tokens, enough for the causal conv of the NAF blocks
SCALARS = ("weights.", "threshold.")


def backends_and_reference():
    return kernel_backends() + [pytest.param("reference", id="reference")]


def make_pair(d, iter_num=2, layer_num=1):
    """The model's ISTA and a FusedISTA built from the same seeds (numpy for phi/Q, torch for the NAFs)."""
    np.random.seed(7)
    torch.manual_seed(7)
    ref = ISTA(512, d, iter_num, layer_num)
    np.random.seed(7)
    torch.manual_seed(7)
    fused = FusedISTA(512, d, iter_num, layer_num)
    with torch.no_grad():  # learnable scalars away from their initial values, so their role is tested
        for i in range(iter_num):
            for m in (ref, fused):
                m.weights[i].fill_(0.8 + 0.1 * i)
                m.threshold[i].fill_(0.02 + 0.01 * i)
    return ref.to(DEVICE), fused.to(DEVICE)


def run(module, y, grad, fn=None):
    """Output and the gradients of y and every parameter, by name."""
    y = y.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = (fn or module.recon)(y)
    out.backward(grad.to(out.dtype))
    grads = {"y": y.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return out.detach(), grads


def test_same_parameters_init_and_keys():
    for d in LATENTS:
        ref, fused = make_pair(d, layer_num=2)
        assert list(ref.state_dict()) == list(fused.state_dict())
        for (n, a), (_, b) in zip(ref.state_dict().items(), fused.state_dict().items()):
            assert torch.equal(a, b), n
        assert len(fused.etas) == 0 and fused.phi.shape == (d, 512) and fused.Q.shape == (512, d)
        assert repr(fused).replace("FusedISTA", "ISTA", 1) == repr(ref)


def check_parity(fused, ref, x, grad, dtype, method, backend, scalars=True):
    """`method` ("recon" or "forward") of both modules: output and every gradient under the table's tolerance."""
    r_out, r_grads = run(ref, x, grad, fn=getattr(ref, method))
    with lk.use_backend(backend):
        f_out, f_grads = run(fused, x, grad, fn=getattr(fused, method))
    assert f_out.dtype == dtype and f_out.shape == r_out.shape
    assert_close(f_out, r_out, dtype)
    assert r_grads.keys() == f_grads.keys()
    for name in r_grads:
        assert f_grads[name].dtype == r_grads[name].dtype, name
        if scalars or not name.startswith(SCALARS):
            assert_close(f_grads[name], r_grads[name], dtype, msg=name)


@pytest.mark.parametrize("backend", backends_and_reference())
@pytest.mark.parametrize("d", LATENTS)
def test_recon_parity_float32(d, backend):
    ref, fused = make_pair(d)
    y = torch.randn(*SHAPE, d, device=DEVICE)
    grad = torch.randn(*SHAPE, 512, device=DEVICE)
    check_parity(fused, ref, y, grad, torch.float32, "recon", backend, scalars=False)


@pytest.mark.parametrize("d", LATENTS)
def test_forward_parity_float32(d):
    """forward = recon(sample(x)); sample is the model's own GEMM, so the process's backend suffices."""
    ref, fused = make_pair(d)
    x = torch.randn(*SHAPE, 512, device=DEVICE)
    grad = torch.randn(*SHAPE, 512, device=DEVICE)
    check_parity(fused, ref, x, grad, torch.float32, "forward", "auto", scalars=False)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("d", LATENTS)
def test_parity_float64_every_parameter(d, backend):
    ref, fused = make_pair(d)
    ref, fused = ref.cpu().double(), fused.cpu().double()
    y = torch.randn(*SHAPE, d, dtype=torch.float64)
    grad = torch.randn(*SHAPE, 512, dtype=torch.float64)
    check_parity(fused, ref, y, grad, torch.float64, "recon", backend)


def _rel_err(a, truth):
    return ((a.double() - truth.double()).norm() / truth.double().norm().clamp_min(1e-30)).item()


def check_low_precision(f, m, t, dtype):
    """f (fused), m (the model), both run in a 16-bit dtype (or autocast), against t, the float32 model.

    The fused steps round once where the model rounds at every op, so the output must be as close to the
    float32 model as the model's own low-precision output (within one unit roundoff u of the dtype). The
    gradients also pass through the low-precision NAF blocks, which amplify rounding differences: their
    relative error must stay of the same order as the model's own (at most twice it, plus u). The scalar
    parameters' gradients only get their dtype checked: see the module docstring.
    """
    (f_out, f_grads), (m_out, m_grads), (t_out, t_grads) = f, m, t
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert f_out.dtype == m_out.dtype
    assert _rel_err(f_out, t_out) <= _rel_err(m_out, t_out) + u
    assert f_grads.keys() == m_grads.keys()
    for name in t_grads:
        assert f_grads[name].dtype == m_grads[name].dtype, name
        assert torch.isfinite(f_grads[name]).all(), name
        if not name.startswith(SCALARS):
            assert _rel_err(f_grads[name], t_grads[name]) <= 2 * _rel_err(m_grads[name], t_grads[name]) + u, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("d", LATENTS)
def test_cast_model_parity(d, dtype):
    """A model cast with .to(dtype): the output and every gradient in the model's dtypes, values as accurate."""
    ref, fused = make_pair(d)
    y = torch.randn(*SHAPE, d, device=DEVICE)
    grad = torch.randn(*SHAPE, 512, device=DEVICE)
    truth = run(ref, y, grad)
    model = run(ref.to(dtype), y.to(dtype), grad)
    f = run(fused.to(dtype), y.to(dtype), grad)
    assert f[0].dtype == dtype
    check_low_precision(f, model, truth, dtype)


@pytest.mark.parametrize("d", LATENTS)
def test_autocast_parity(d):
    """A float32 model under autocast(bfloat16): the model's mm runs in bfloat16, weights[i] stays a float32
    0-dim parameter, threshold[i] a float32 (1,) parameter that promotes; same dtypes, values as accurate."""
    ref, fused = make_pair(d)
    y = torch.randn(*SHAPE, d, device=DEVICE)
    grad = torch.randn(*SHAPE, 512, device=DEVICE)
    truth = run(ref, y, grad)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        model = run(ref, y, grad)
        f = run(fused, y, grad)
        # the soft threshold's output dtype inside recon: float32, as in the model
        z = torch.randn(3, 512, device=DEVICE).bfloat16()
        assert lk.soft_threshold(z, fused.threshold[0]).dtype == torch.float32
    assert f[0].dtype == torch.bfloat16
    check_low_precision(f, model, truth, torch.bfloat16)


@pytest.mark.parametrize("backend", kernel_backends())
def test_strided_latent_input(backend):
    """y as a non-contiguous view (a slice of a wider latent, and a permuted one) gives the contiguous result."""
    ref, fused = make_pair(16)
    y = torch.randn(*SHAPE, 16, device=DEVICE)
    wide = torch.randn(*SHAPE, 20, device=DEVICE)
    wide[..., 2:18] = y
    permuted = y.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    with lk.use_backend(backend):
        expected = fused.recon(y)
        for view in (wide[..., 2:18], permuted):
            assert not view.is_contiguous()
            assert torch.equal(fused.recon(view), expected)
    assert_close(expected, ref.recon(y), torch.float32)


def test_bind_onto_model_instance():
    """fused_ista_recon / fused_ista_forward bound onto the model's own ISTA: keys, repr and parameters
    unchanged, results those of FusedISTA (whose NAF children run the fused conv, so equal to rounding)."""
    ref, fused = make_pair(4)
    keys, text = list(ref.state_dict()), repr(ref)
    params = [p.data_ptr() for p in ref.parameters()]
    y = torch.randn(*SHAPE, 4, device=DEVICE)
    x = torch.randn(*SHAPE, 512, device=DEVICE)
    expected_recon = ref.recon(y)
    ref.recon = types.MethodType(fused_ista_recon, ref)
    ref.forward = types.MethodType(fused_ista_forward, ref)
    assert list(ref.state_dict()) == keys and repr(ref) == text
    assert [p.data_ptr() for p in ref.parameters()] == params
    assert_close(ref.recon(y), fused.recon(y), torch.float32)
    assert_close(ref(x), fused(x), torch.float32)
    assert_close(ref.recon(y), expected_recon, torch.float32)


def test_zero_iterations():
    ref, fused = make_pair(4, iter_num=0)
    y = torch.randn(*SHAPE, 4, device=DEVICE)
    assert torch.equal(fused.recon(y), ref.recon(y))


def test_mismatched_dtypes_raise_like_the_model():
    """Without autocast the model's torch.mm refuses a float64 latent for a float32 model; so does the fused path."""
    ref, fused = make_pair(4)
    y = torch.randn(*SHAPE, 4, device=DEVICE, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        ref.recon(y)
    with pytest.raises(TypeError, match="ista_init_step: (phi|Q) has dtype torch.float32 but y has dtype torch.float64"):
        fused.recon(y)
