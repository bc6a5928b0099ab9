"""The registered ops (`torch.ops.leanvae.*`), each with its pure-PyTorch reference beside it; every op is
defined by `_define.define_op` (schema, eager body, fake, validation, gradient rule, shared hooks)."""
from .causal_conv import causal_dwconv3d, causal_dwconv3d_reference
from .geglu import geglu, geglu_reference
from .haar import (
    haar_dwt2d, haar_dwt2d_reference, haar_dwt3d, haar_dwt3d_reference, haar_idwt2d, haar_idwt2d_reference,
    haar_idwt3d, haar_idwt3d_reference, haar_patch, haar_patch_reference, haar_unpatch, haar_unpatch_reference,
)
from .haar_multilevel import (
    haar_latent_compress, haar_latent_compress_reference, haar_latent_decompress, haar_latent_decompress_reference,
)
from .ista import (
    ista_init_step, ista_init_step_reference, ista_residual_step, ista_residual_step_reference, ista_step,
    ista_step_reference, soft_threshold, soft_threshold_reference,
)
