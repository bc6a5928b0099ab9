"""The one table of ops that the cross-cutting checks walk (opcheck, forward-mode AD refusal, double
backward, NaN/Inf patterns): a row per op registered under the `leanvae::` namespace, forward and backward.
Adding an op means adding its row here; the coverage tests fail until then (they compare the table with
the namespace's registered ops)."""
import ast
import os

import torch

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def registered_ops():
    """The names of every op registered under `leanvae::` (forward and backward)."""
    return {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("leanvae::")}


def op_cases():
    """{op name: [argument tuple (without the trailing backend), ...]} for every op registered under
    `leanvae::`, backward ops too. Fresh tensors on each call (tests may set requires_grad on them)."""
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    x5 = rnd(1, 2, 3, 5, 4)
    odd = rnd(1, 2, 5, 5, 4)
    bands3 = rnd(1, 16, 2, 3, 2)
    bands2 = rnd(1, 8, 1, 3, 2)
    conv_x, w, b, cache = rnd(1, 3, 4, 5, 6), rnd(6, 1, 3, 3, 3), rnd(6), rnd(1, 2, 4, 5, 6)
    r, y, phi, step = rnd(7, 16), rnd(7, 4), rnd(4, 16), torch.tensor(0.9)
    return {
        "haar_dwt3d": [(x5, True)],
        "haar_dwt3d_backward": [(rnd(1, 16, 2, 3, 2), x5, True)],
        "haar_dwt2d": [(x5[:, :, :1], True)],
        "haar_dwt2d_backward": [(rnd(1, 8, 1, 3, 2), x5[:, :, :1].contiguous(), True)],
        "haar_idwt3d": [(bands3, True)],
        "haar_idwt3d_backward": [(rnd(1, 2, 4, 6, 4), bands3, True)],
        "haar_idwt2d": [(bands2, False)],
        "haar_idwt2d_backward": [(rnd(1, 2, 1, 6, 4), bands2, False)],
        "haar_patch": [(odd, True)],
        "haar_patch_backward": [(rnd(1, 8, 1, 3, 2), rnd(1, 16, 2, 3, 2), odd, True)],
        "haar_unpatch": [(rnd(1, 8, 1, 3, 2), bands3, True)],
        "haar_unpatch_backward": [(rnd(1, 2, 5, 6, 4), rnd(1, 8, 1, 3, 2), bands3, True)],
        "causal_dwconv3d": [(conv_x, w, b, cache, True, 0), (conv_x, w, None, None, False, 2)],
        "causal_dwconv3d_backward": [(rnd(1, 3, 4, 5, 6), rnd(1, 2, 4, 5, 6), conv_x, w, b, cache, True, 0)],
        "haar_latent_compress": [(rnd(1, 3, 4, 4, 8), 2, [0, 1, 2, 4], True, False), (rnd(1, 2, 2, 4, 2), 1, [7], False, True)],
        "haar_latent_compress_backward": [(rnd(1, 12, 1, 1, 2), [1, 3, 4, 4, 8], 2, [0, 1, 2, 4], True, False)],
        "haar_latent_decompress": [(rnd(1, 12, 1, 1, 2), 2, [0, 1, 2, 4], True, False)],
        "haar_latent_decompress_backward": [(rnd(1, 3, 4, 4, 8), [1, 12, 1, 1, 2], 2, [0, 1, 2, 4], True, False)],
        "ista_step": [(r, y, phi, step)],
        "ista_residual_step": [(r, rnd(7, 16), y, phi, step)],
        "ista_residual_step_backward": [(rnd(7, 16), r, rnd(7, 16), y, phi, step)],
        "ista_init_step": [(y, rnd(16, 4), phi, step)],
        "ista_init_step_backward": [(rnd(7, 16), y, rnd(16, 4), phi, step)],
        "ista_step_backward": [(rnd(7, 16), r, y, phi, step)],
        "soft_threshold": [(r, torch.tensor([0.1]))],
        "soft_threshold_backward": [(rnd(7, 16), r, torch.tensor([0.1]))],
        "geglu": [(r,), (rnd(2, 3, 10).transpose(0, 1),)],
        "geglu_backward": [(rnd(7, 8), r)],
    }


OPS = sorted(op_cases())
FORWARD_OPS = [n for n in OPS if not n.endswith("_backward")]

# Forward op -> (file under tests/, test function) that checks its NaN/Inf pattern against the reference
# backend's on every backend, forward and backward. Cases for ops checked in cross/test_ieee_ops.py are
# in that file's HAAR / ISTA_OPS / GEGLU tables.
IEEE_TESTS = {
    **{name: ("cross/test_ieee_ops.py", "test_haar_nonfinite_inputs_match_reference")
       for name in ("haar_dwt3d", "haar_dwt2d", "haar_idwt3d", "haar_idwt2d", "haar_patch", "haar_unpatch",
                    "haar_latent_compress", "haar_latent_decompress")},
    **{name: ("cross/test_ieee_ops.py", "test_ista_nonfinite_inputs_match_reference")
       for name in ("ista_step", "ista_residual_step", "ista_init_step")},
    "geglu": ("cross/test_ieee_ops.py", "test_geglu_nonfinite_inputs_match_reference"),
    "causal_dwconv3d": ("ops/causal_conv/test_causal_conv_ieee.py", "test_nan_inf_pattern_matches_reference"),
    "soft_threshold": ("ops/ista/test_soft_threshold.py", "test_nan_and_inf_propagate_like_the_model"),
}


def defines_test(relpath, function):
    """Whether tests/<relpath> defines the test function `function` (read, not imported)."""
    path = os.path.join(TESTS_DIR, relpath)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    return any(isinstance(node, ast.FunctionDef) and node.name == function for node in tree.body)
