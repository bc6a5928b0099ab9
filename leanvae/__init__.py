"""LeanVAE: a faithful pure-PyTorch reference of the published model, plus a one-call switch to fused kernels.

    import leanvae
    model = leanvae.LeanVAE.from_config(latent_dim=4)
    handle = leanvae.use_fused_kernels(model)   # encode/decode now run the fused kernels
    handle.revert()                             # back to the reference

The reference model (everything but `use_fused_kernels`) never imports `leanvae_kernels`.
"""
from .distributions import DiagonalGaussianDistribution
from .model import DEFAULT_ARGS, LeanVAE, make_args
from .modules import GEGLU, ISTA, NAF, PEG3D, Decoder_Arch, Encoder_Arch, ResNAF, ffd
from .wavelets import Patcher, UnPatcher

__version__ = "0.1.0"


def use_fused_kernels(model=None, **kwargs):
    """Switch `model` (or, with no model, every reference LeanVAE) to the fused kernels.

    See `leanvae.fused.switch.use_fused_kernels` for the arguments and the returned handle.
    """
    from .fused.switch import use_fused_kernels as _use

    return _use(model, **kwargs)


__all__ = [
    "DEFAULT_ARGS", "DiagonalGaussianDistribution", "Decoder_Arch", "Encoder_Arch", "GEGLU", "ISTA", "LeanVAE",
    "NAF", "PEG3D", "Patcher", "ResNAF", "UnPatcher", "ffd", "make_args", "use_fused_kernels",
]
