"""The fused ISTA-Net+ bottleneck: a drop-in for the model's `ISTA`, and its fused `recon` as a plain function.

    sample: x (B, T, H, W, D) -> y (B, T, H, W, d) = x @ phi.T        (unchanged: one thin GEMM)
    recon:  y (B, T, H, W, d) -> (B, T, H, W, D)

Per iteration the model computes `recon_r = recon - w_i * ((recon @ phi.T - y) @ phi)`, runs NAF,
soft threshold, NAF, and adds `recon_r`. Fused, that is:

    recon_r = ista_init_step(y, Q, phi, w_0)                 y @ Q.T and the first step, one pass
    for each iteration i:
        if i > 0: recon_r = ista_residual_step(recon_r, naf, y, phi, w_i)   the residual add and the step
        naf = backward_l[i](soft_threshold(forward_l[i](recon_r), threshold[i]))
    return recon_r + naf

so neither `y @ Q.T` nor the residual sums before a step go through memory. The NAF blocks are called as
submodules, so they run whatever forward they have (fused ones when the model is patched).

Dtypes follow the model: a float32 model gives float32, a model cast with `.to(torch.bfloat16)` gives
bfloat16, and under `torch.autocast` the steps run in the autocast dtype (where the model's `torch.mm`
runs) with the float32 `weights[i]`; the soft threshold promotes to float32 there, as the model's
`relu(|x| - threshold[i])` does with the float32 (1,) threshold.
"""
import types

import torch

from leanvae.modules import ISTA

from leanvae_kernels.ops.ista import ista_init_step, ista_residual_step, soft_threshold


def _autocast_dtype(device_type):
    """The dtype the model's torch.mm runs in under an active autocast for `device_type`, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _step_after_residual(self, i, recon_r, naf, y2, yc, phi_c, backend):
    """recon_r for iteration i > 0 from the previous iteration's `recon_r` and NAF output."""
    if naf.dtype == recon_r.dtype == yc.dtype:
        return ista_residual_step(recon_r, naf, yc, phi_c, self.weights[i], backend=backend)
    # Mixed dtypes (a NAF that returns another dtype): the model's own expression, unfused.
    recon = recon_r + naf
    return recon - self.weights[i] * torch.mm(torch.mm(recon, self.phi.t()) - y2, self.phi)


def fused_ista_recon(self, y, backend=None):
    """Fused `ISTA.recon`. y: (B, T, H, W, d) -> (B, T, H, W, D). backend: as for the ops (None: the process setting).

    Uses only attributes the published ISTA has (phi, Q, weights, threshold, forward_l, backward_l,
    iter_num), so it can be bound onto an existing instance: `m.recon = types.MethodType(fused_ista_recon, m)`
    (the model calls `recon` directly when decoding, so binding `forward` alone is not enough).
    """
    b, t, h, w, c = y.shape
    y2 = y.reshape(-1, c)
    if self.iter_num == 0:
        return torch.mm(y2, self.Q.t()).view(b, t, h, w, -1)
    cast = _autocast_dtype(y.device.type)
    yc, q, phi_c = (y2, self.Q, self.phi) if cast is None else (y2.to(cast), self.Q.to(cast), self.phi.to(cast))
    recon_r = ista_init_step(yc, q, phi_c, self.weights[0], backend=backend)
    d = recon_r.shape[1]
    naf = None
    for i in range(self.iter_num):
        if i > 0:
            recon_r = _step_after_residual(self, i, recon_r, naf, y2, yc, phi_c, backend)
        z = self.forward_l[i](recon_r.reshape(b, t, h, w, -1))
        z = soft_threshold(z, self.threshold[i], backend=backend)
        naf = self.backward_l[i](z).view(-1, d)
    return (recon_r + naf).view(b, t, h, w, -1)


def fused_ista_forward(self, x, backend=None):
    """Fused `ISTA.forward` (`recon(sample(x))`), for binding as an instance-level forward. `sample` is the
    model's own: one thin GEMM that reads x once, nothing to fuse."""
    return fused_ista_recon(self, self.sample(x), backend=backend)


def bind_fused_naf(module):
    """Give the NAF blocks of an ISTA the fused NAF forward, when `leanvae.fused.peg3d` provides one.

    Returns True if it did. Instance-level forwards only: parameters, state_dict keys and repr are unchanged.
    """
    try:
        from .peg3d import fused_naf_forward
    except ImportError:
        return False
    for naf in list(module.forward_l) + list(module.backward_l):
        naf.forward = types.MethodType(fused_naf_forward, naf)
    return True


class FusedISTA(ISTA):
    """Drop-in for the model's `ISTA`: same constructor, parameters (`phi`, `Q`, `weights`, `threshold`,
    `etas`, `forward_l`, `backward_l`), initialisation, state_dict keys and `sample`; `recon` (and so
    `forward`) fused. Its NAF blocks use the fused NAF forward when that is available.
    """

    def __init__(self, points_num=512, out_num=4, iter_num=2, layer_num=2):
        super().__init__(points_num=points_num, out_num=out_num, iter_num=iter_num, layer_num=layer_num)
        self.fused_naf = bind_fused_naf(self)

    recon = fused_ista_recon
