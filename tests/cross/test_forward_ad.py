"""Forward-mode AD and double backward through every registered op: a clear error naming the op, never
silent zero tangents. The refusal is installed centrally (ops/_common.py) on every op
of the namespace, so this test walks the same table as the opcheck test (op_table.py), backward ops included."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from op_table import FORWARD_OPS, OPS, op_cases, registered_ops

CASES = op_cases()


def test_every_registered_op_is_covered():
    assert registered_ops() == set(OPS)


def _float_positions(args):
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", OPS)
def test_forward_ad_dual_tensor_is_refused_by_name(name, backend):
    op = getattr(torch.ops.leanvae, name).default
    for args in CASES[name]:
        for i in _float_positions(args):  # a tangent on any one differentiable input
            with fwAD.dual_level():
                dual = list(args)
                dual[i] = fwAD.make_dual(args[i], torch.randn_like(args[i]))
                with pytest.raises(RuntimeError, match=f"leanvae::{name}: forward-mode AD"):
                    op(*dual, backend)
        op(*args, backend)  # the same call without a tangent still runs


@pytest.mark.parametrize("name", FORWARD_OPS)
def test_func_jvp_and_jacfwd_are_refused_by_name(name):
    op = getattr(torch.ops.leanvae, name).default
    args = CASES[name][0]
    i = _float_positions(args)[0]

    def f(t):
        a = list(args)
        a[i] = t
        out = op(*a, "auto")
        return out if isinstance(out, torch.Tensor) else out[0]

    with pytest.raises(RuntimeError, match=f"leanvae::{name}: forward-mode AD"):
        torch.func.jvp(f, (args[i],), (torch.randn_like(args[i]),))
    with pytest.raises(RuntimeError, match=f"leanvae::{name}: forward-mode AD"):
        torch.func.jacfwd(f)(args[i])


def test_forward_ad_refused_through_public_wrapper_and_module():
    import leanvae_kernels as lk

    x, theta = torch.randn(3, 4), torch.tensor([0.2])
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="leanvae::soft_threshold: forward-mode AD"):
            lk.soft_threshold(fwAD.make_dual(x, torch.ones_like(x)), theta)
        # a tangent on theta alone, x plain: must not be dropped either
        with pytest.raises(RuntimeError, match="leanvae::soft_threshold: forward-mode AD"):
            lk.soft_threshold(x, fwAD.make_dual(theta, torch.ones_like(theta)))


@pytest.mark.parametrize("name", FORWARD_OPS)
def test_double_backward_is_a_clear_error(name):
    op = getattr(torch.ops.leanvae, name).default
    args = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in CASES[name][0])
    out = op(*args, "auto")
    out = out if isinstance(out, torch.Tensor) else out[0]
    leaves = [args[i] for i in _float_positions(args)]
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True, allow_unused=True)
    g = next(g for g in grads if g is not None and g.requires_grad)
    with pytest.raises(RuntimeError, match=f"leanvae::{name}_backward: double backward"):
        g.sum().backward()
