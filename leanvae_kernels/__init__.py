"""leanvae-kernels: fused kernels for the LeanVAE video VAE, as drop-in torch ops.

Ops (registered as `torch.ops.leanvae.*`, each with a fake kernel and autograd):
    haar_dwt3d, haar_dwt2d, haar_idwt3d, haar_idwt2d, haar_patch, haar_unpatch   wavelet transforms
    haar_latent_compress, haar_latent_decompress                                multi-level latent compression
    causal_dwconv3d                                                             the model's PEG3D conv
    ista_step, ista_residual_step, ista_init_step, soft_threshold              the ISTA bottleneck
    geglu                                                                       the feed-forward's activation
Backends: "cuda" (CUDA C++), "triton", "cpu" (native C++), "reference" (pure PyTorch); see
`set_backend` and `python -m leanvae info`. `check()` (`python -m leanvae check`) runs every op on every
backend of a device against the reference.
"""
from ._backend import BACKENDS, BackendUnavailable, NativeUnavailableWarning, get_backend, set_backend, use_backend
from .ops import (
    causal_dwconv3d, causal_dwconv3d_reference, geglu, geglu_reference, haar_dwt2d, haar_dwt2d_reference, haar_dwt3d, haar_dwt3d_reference,
    haar_idwt2d, haar_idwt2d_reference, haar_idwt3d, haar_idwt3d_reference, haar_latent_compress,
    haar_latent_compress_reference, haar_latent_decompress, haar_latent_decompress_reference, haar_patch,
    haar_patch_reference, haar_unpatch, haar_unpatch_reference, ista_init_step, ista_init_step_reference,
    ista_residual_step, ista_residual_step_reference, ista_step, ista_step_reference, soft_threshold,
    soft_threshold_reference,
)
from ._selfcheck import check

__version__ = "0.1.0"
