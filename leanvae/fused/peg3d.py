"""Drop-in fused PEG3D (the model's causal depthwise 3x3x3 conv on tokens) and fused NAF / ResNAF forwards.

    FusedPEG3D(dim)               a PEG3D with the same parameters (`ds_conv.weight`, `ds_conv.bias`, same
                                  initialisation) and tile-inference attributes, running `causal_dwconv3d`
    fused_peg3d_forward(self, x)  PEG3D.forward, for binding onto an existing PEG3D instance (ours or the
                                  published one): x: (B, T, H, W, C) -> (B, T, H, W, C)
    fused_naf_forward(self, x)    NAF.forward: per layer x = peg(x); x = ffd(x)
    fused_resnaf_forward(self, x) ResNAF.forward: per layer x = x + peg(x) (the residual fused into the conv
                                  kernel); x = x + ffd(x)

They use only attributes that the reference and the published modules share: `ds_conv`, `tile_inference`,
`is_first_chunk`, `causal_cached` (PEG3D); `num_layer`, `dconv_layer`, `ffd_layer` (NAF, ResNAF).

Tile inference (the model sets `tile_inference` and `is_first_chunk` on every module and calls it chunk by
chunk). The published PEG3D caches the previous chunk's last two frames *after* spatial padding, as
`causal_cached: (B, C, 2, H+2, W+2)`. The fused forward keeps its own cache instead, in the attribute
`fused_causal_cache`: the last two *input* frames, (B, 2, H, W, C) (the spatial halo is rebuilt per
chunk). So that the two formats can never be confused:
  - after a fused tiled call, `causal_cached` is set to None: if the patch is reverted mid-stream, the
    reference forward fails loudly on its next non-first chunk (torch.concatenate of None) instead of
    reading a stale cache;
  - a fused non-first chunk uses `causal_cached` when it holds a tensor (the reference forward ran the
    previous chunk, e.g. the patch was applied mid-stream) after checking its shape, and `fused_causal_cache`
    otherwise; with neither it raises.
A first chunk (`is_first_chunk`) ignores both, as the reference does. Chunked calls are bit-exact with one
full call (the op's contract), so the model's tiling stays lossless.
"""
import torch

from leanvae_kernels.ops.causal_conv import causal_dwconv3d
from ..modules import PEG3D
from .ffd import ffd_apply

CACHE_ATTR = "fused_causal_cache"


def _previous_cache(peg, x):
    """The cache for a non-first chunk: the previous chunk's last two input frames, (B, 2, H, W, C)."""
    b, t, h, w, c = x.shape
    ref = getattr(peg, "causal_cached", None)
    if isinstance(ref, torch.Tensor):
        # The reference forward ran the previous chunk: its padded frames (B, C, 2, H+2, W+2), read in place.
        if tuple(ref.shape) != (b, c, 2, h + 2, w + 2):
            raise ValueError(f"PEG3D tile inference: causal_cached has shape {tuple(ref.shape)}, expected "
                             f"(B, C, 2, H+2, W+2) = {(b, c, 2, h + 2, w + 2)} for this chunk")
        return ref[:, :, :, 1:-1, 1:-1].permute(0, 2, 3, 4, 1)
    ours = getattr(peg, CACHE_ATTR, None)
    if ours is None:
        raise RuntimeError("PEG3D tile inference: is_first_chunk is False but no previous chunk left a cache "
                           "(run the first chunk with is_first_chunk=True)")
    if tuple(ours.shape) != (b, 2, h, w, c):
        raise ValueError(f"PEG3D tile inference: the previous chunk's cache has shape {tuple(ours.shape)}, expected "
                         f"(B, 2, H, W, C) = {(b, 2, h, w, c)} for this chunk")
    return ours


def _peg_call(peg, x, residual, backend=None):
    """PEG3D `peg` applied to x (plus x when `residual`), honouring its tile-inference state."""
    weight, bias = peg.ds_conv.weight, peg.ds_conv.bias
    if torch.is_autocast_enabled(x.device.type):
        # As conv3d under autocast: inputs and parameters in the autocast dtype. The residual then adds the
        # original x, as the model's `x + peg(x)` does (its dtype promotion included).
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.dtype != dtype and residual:
            return x + _peg_call(peg, x, False, backend)
        x = x.to(dtype)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    if not peg.tile_inference:
        return causal_dwconv3d(x, weight, bias, None, residual=residual, backend=backend)[0]
    cache = None if peg.is_first_chunk else _previous_cache(peg, x)
    if cache is not None and cache.dtype != x.dtype:
        cache = cache.to(x.dtype)
    y, new_cache = causal_dwconv3d(x, weight, bias, cache, residual=residual, backend=backend)
    setattr(peg, CACHE_ATTR, new_cache)
    peg.causal_cached = None
    return y


def fused_peg3d_forward(self, x, backend=None):
    """PEG3D.forward with the fused kernel. x: (B, T, H, W, C) -> (B, T, H, W, C)."""
    return _peg_call(self, x, residual=False, backend=backend)


def fused_naf_forward(self, x, backend=None, conv=True, ffd=True):
    """NAF.forward: for each layer, x = dconv_layer[i](x); x = ffd_layer[i](x). `conv`: the fused conv;
    `ffd`: the padded-GEMM feed-forward (leanvae/fused/ffd.py); either off runs the layer's own module."""
    for i in range(self.num_layer):
        peg = self.dconv_layer[i]
        fused = conv and type(peg).__name__ == "PEG3D"  # a subclass is called as a module: it may override forward
        x = _peg_call(peg, x, residual=False, backend=backend) if fused else peg(x)
        x = ffd_apply(self.ffd_layer[i], x, backend=backend) if ffd else self.ffd_layer[i](x)
    return x


def fused_resnaf_forward(self, x, backend=None, conv=True, ffd=True):
    """ResNAF.forward: for each layer, x = x + dconv_layer[i](x) (residual fused into the conv);
    x = x + ffd_layer[i](x) (residual fused into the feed-forward's second GEMM)."""
    for i in range(self.num_layer):
        peg = self.dconv_layer[i]
        fused = conv and type(peg).__name__ == "PEG3D"  # a subclass is called as a module: it may override forward
        x = _peg_call(peg, x, residual=True, backend=backend) if fused else x + peg(x)
        x = ffd_apply(self.ffd_layer[i], x, residual=True, backend=backend) if ffd else x + self.ffd_layer[i](x)
    return x


class FusedPEG3D(PEG3D):
    """The model's PEG3D on the fused kernel: PEG3D's own construction (parameters, initialisation,
    tile-inference attributes), with a forward of its own.

    Defining `forward` here is what keeps it from being taken for a plain PEG3D: the switch
    (leanvae/fused/switch.py) leaves alone any module whose class defines its own forward under a name other
    than PEG3D, and the fused NAF/ResNAF forwards inline the conv only for modules whose class is named PEG3D,
    calling anything else as a module."""

    def forward(self, x):
        return fused_peg3d_forward(self, x)
