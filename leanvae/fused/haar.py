"""Drop-in fused replacements for the model's `Patcher` / `UnPatcher`, and the LC-VAE latent compressor.

`fused_patcher_forward(self, x)` / `fused_unpatcher_forward(self, x)` read only `self.rescale`, which
both our reference modules (leanvae/wavelets.py) and the published ones have, so they can be bound onto an
existing instance of either without touching its buffers, state_dict or repr:

    patcher.forward = types.MethodType(fused_patcher_forward, patcher)

`FusedPatcher` / `FusedUnPatcher` are the same as classes (subclasses of the reference modules, so their
buffers and state_dict keys are the reference's).
"""
import torch

from leanvae.wavelets import Patcher, UnPatcher

from leanvae_kernels.ops.haar import haar_patch, haar_unpatch
from leanvae_kernels.ops.haar_multilevel import DEFAULT_KEEP, haar_latent_compress, haar_latent_decompress, parse_keep


def _autocast(t):
    """As the reference's convolutions under autocast: compute in the autocast dtype."""
    if t is not None and torch.is_autocast_enabled(t.device.type):
        return t.to(torch.get_autocast_dtype(t.device.type))
    return t


def fused_patcher_forward(self, x, backend=None):
    """Patcher.forward in one launch. x: (B, C, T, H, W) -> (xi, xv):
    T == 1: (B, 4C, 1, H', W'), None; T odd > 1: both; T even: None, (B, 8C, T/2, H', W'); H' = ceil(H/2)."""
    return haar_patch(_autocast(x), self.rescale, backend=backend)


def fused_unpatcher_forward(self, x, backend=None):
    """UnPatcher.forward in one launch. x = (xi, xv) -> video (B, C, T, H, W); xi alone -> image (B, C, H, W)."""
    xi, xv = x
    return haar_unpatch(_autocast(xi), _autocast(xv), self.rescale, backend=backend)


class FusedPatcher(Patcher):
    """The model's Patcher, computed by the fused Haar kernels (same outputs, buffers and call signature)."""

    forward = fused_patcher_forward


class FusedUnPatcher(UnPatcher):
    """The model's UnPatcher, computed by the fused Haar kernels (same outputs, buffers and call signature)."""

    forward = fused_unpatcher_forward


class HaarLatentCompressor(torch.nn.Module):
    """LC-VAE latent compression (see ops/haar_multilevel.py for the reading of the paper).

    compress(z):    (B, C, T, H, W) -> (B, K*C, T/2^L, H/2^L, W/2^L)   the latent diffusion works on
    decompress(zc): the exact inverse on the kept sub-space, zero-filling the dropped sub-bands
    forward(z):     decompress(compress(z)): z with the dropped sub-bands removed, same shape as z

    No parameters; fused and differentiable, so it can sit inside training.
    """

    def __init__(self, levels=1, keep=DEFAULT_KEEP, *, drop=True, rescale=False):
        super().__init__()
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"HaarLatentCompressor: levels must be an int >= 1, got {levels!r}")
        self.levels = levels
        self.keep = parse_keep(keep, "HaarLatentCompressor")
        self.drop = bool(drop)
        self.rescale = bool(rescale)

    def compress(self, z):
        return haar_latent_compress(z, self.levels, self.keep, drop=self.drop, rescale=self.rescale)

    def decompress(self, zc):
        return haar_latent_decompress(zc, self.levels, self.keep, drop=self.drop, rescale=self.rescale)

    def forward(self, z):
        return self.decompress(self.compress(z))

    def extra_repr(self):
        from leanvae_kernels.ops.haar_multilevel import BAND_NAMES

        keep = ", ".join(BAND_NAMES[k] for k in self.keep)
        return f"levels={self.levels}, keep=({keep}), drop={self.drop}, rescale={self.rescale}"
