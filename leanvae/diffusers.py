"""LeanVAE as a `diffusers` autoencoder: `AutoencoderLeanVAE` (needs the `diffusers` extra).

    from leanvae.diffusers import AutoencoderLeanVAE
    vae = AutoencoderLeanVAE.from_pretrained("leanvae-4ch")          # a published checkpoint, converted on the fly
    z = vae.encode(video).latent_dist.sample()                        # video: (B, 3, 1+4k, H, W) in [-1, 1]
    video = vae.decode(z).sample
    vae.save_pretrained("leanvae-diffusers")                          # config.json + safetensors

It has the interface of diffusers' video autoencoders (`AutoencoderKLWan` and kin): pixels in [-1, 1]
(the "original" variant's own range, [-0.5, 0.5], is mapped inside), `encode` -> `.latent_dist`,
`decode` -> `.sample`, tuples with `return_dict=False`, `enable_slicing` (batch) and `enable_tiling`
(the plain model's exact spatial tiling), and a config holding `z_dim`, `latents_mean`, `latents_std`,
`scale_factor_temporal`, `scale_factor_spatial` besides the model's arguments.

Latent spaces. Variant "original" returns the model's latent as it is (config mean 0, std 1). The Wan
variants ("wan2.1", "wan2.2") return it in the Wan VAE's own, un-normalised space, and their config
carries Wan's per-channel mean and std: diffusers' Wan pipelines normalise with
`vae.config.latents_mean` / `latents_std` themselves, so the latent is normalised exactly once (the plain
`LeanVAE` of those variants normalises inside `encode`, as the published branches do).

`import leanvae` never imports this module (or diffusers); this module's name does not shadow the
`diffusers` package because every import here is absolute.
"""
import functools
import os

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

from leanvae.loading import SHORT_NAMES, load_model
from leanvae.model import DEFAULT_ARGS, VARIANTS, WAN_LATENT_STATS, LeanVAE, make_args

try:  # diffusers >= 0.35: the shared enable_tiling/enable_slicing interface (we override both)
    from diffusers.models.autoencoders.vae import AutoencoderMixin
except ImportError:  # pragma: no cover - older diffusers
    AutoencoderMixin = object

#: The model's own arguments, as config keys (the rest of the config describes the latent space).
MODEL_ARGS = tuple(DEFAULT_ARGS)
_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


class LeanVAELatent:
    """LeanVAE's posterior for diffusers callers: deterministic, so `sample()`, `mode()` and `mean` are the latent.

    latent: (B, z_dim, T', H/8, W/8). `sample(generator)` ignores the generator (nothing is drawn) and
    returns the latent itself; `std` and `var` are zeros, `kl()` is zero per sample.
    """

    def __init__(self, latent):
        self.parameters = latent
        self.mean = latent

    def sample(self, generator=None):
        return self.mean

    def mode(self):
        return self.mean

    @property
    def std(self):
        return torch.zeros_like(self.mean)

    @property
    def var(self):
        return torch.zeros_like(self.mean)

    def kl(self, other=None):
        return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)


def _close(given, expected):
    return len(given) == len(expected) and all(abs(float(a) - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(given, expected))


class AutoencoderLeanVAE(ModelMixin, AutoencoderMixin, ConfigMixin):
    """LeanVAE (a reference `leanvae.LeanVAE` inside, at `.model`) behind diffusers' autoencoder interface.

    Args: `model_variant` ("original", "wan2.1", "wan2.2"; named so as not to clash with diffusers'
    `variant`, the weight-file suffix), the plain model's arguments (`leanvae.DEFAULT_ARGS`; `latent_dim`
    defaults to the variant's: 4, 16, 48), and the latent description, derived when left None and checked
    when given: `z_dim` (= latent_dim), `latents_mean` / `latents_std` (Wan's statistics for the Wan
    variants, 0 / 1 otherwise), `scale_factor_temporal` (4), `scale_factor_spatial` (8).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        model_variant="original",
        embedding_dim=DEFAULT_ARGS["embedding_dim"],
        latent_dim=None,
        ista_iter_num=DEFAULT_ARGS["ista_iter_num"],
        ista_layer_num=DEFAULT_ARGS["ista_layer_num"],
        l_dim=DEFAULT_ARGS["l_dim"],
        h_dim=DEFAULT_ARGS["h_dim"],
        sep_num_layer=DEFAULT_ARGS["sep_num_layer"],
        fusion_num_layer=DEFAULT_ARGS["fusion_num_layer"],
        use_tile_inference=DEFAULT_ARGS["use_tile_inference"],
        chunksize_enc=DEFAULT_ARGS["chunksize_enc"],
        chunksize_dec=DEFAULT_ARGS["chunksize_dec"],
        z_dim=None,
        latents_mean=None,
        latents_std=None,
        scale_factor_temporal=4,
        scale_factor_spatial=8,
    ):
        super().__init__()
        if model_variant not in VARIANTS:
            raise ValueError(f"AutoencoderLeanVAE: model_variant must be one of {', '.join(map(repr, VARIANTS))}, got {model_variant!r}")
        given = dict(embedding_dim=embedding_dim, latent_dim=latent_dim, ista_iter_num=ista_iter_num, ista_layer_num=ista_layer_num,
                     l_dim=l_dim, h_dim=h_dim, sep_num_layer=sep_num_layer, fusion_num_layer=fusion_num_layer,
                     use_tile_inference=use_tile_inference, chunksize_enc=chunksize_enc, chunksize_dec=chunksize_dec)
        assert set(given) == set(MODEL_ARGS), "AutoencoderLeanVAE's arguments must follow leanvae.DEFAULT_ARGS"
        args = {k: v for k, v in given.items() if v is not None}
        self.model = LeanVAE(make_args(model_variant, **args))
        d = self.model.args.latent_dim
        if z_dim is not None and z_dim != d:
            raise ValueError(f"AutoencoderLeanVAE: z_dim must equal latent_dim ({d}), got z_dim={z_dim}")
        mean, std = WAN_LATENT_STATS.get(model_variant, ([0.0] * d, [1.0] * d))
        for name, given, expected in (("latents_mean", latents_mean, mean), ("latents_std", latents_std, std)):
            if given is not None and not _close(given, expected):
                raise ValueError(f"AutoencoderLeanVAE: {name} for model_variant {model_variant!r} is fixed by the model "
                                 f"(its first values: {expected[:3]}); leave it None")
        if (scale_factor_temporal, scale_factor_spatial) != (4, 8):
            raise ValueError("AutoencoderLeanVAE: scale_factor_temporal and scale_factor_spatial are fixed at 4 and 8 by the "
                             f"model's patching, got {scale_factor_temporal} and {scale_factor_spatial}")
        self.register_to_config(latent_dim=d, z_dim=d, latents_mean=list(mean), latents_std=list(std))
        # The pixel range diffusers uses is [-1, 1]; the model's own is [-0.5, 0.5] (original) or [-1, 1].
        self._pixel_scale = 2.0 / (self.model.input_range[1] - self.model.input_range[0])
        self.use_slicing = False
        self.use_tiling = False

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_leanvae(cls, model):
        """A diffusers autoencoder holding a copy of the plain `leanvae.LeanVAE` `model`'s weights (same dtype and device)."""
        if not isinstance(model, LeanVAE):
            raise TypeError(f"AutoencoderLeanVAE.from_leanvae: expected a leanvae.LeanVAE, got {type(model).__name__}")
        config = {k: getattr(model.args, k, DEFAULT_ARGS[k]) for k in MODEL_ARGS}
        vae = cls(model_variant=model.variant, **config)
        p = model.latent_bottleneck.phi
        vae.model.load_state_dict(model.state_dict(), strict=True)
        return _move(vae, device=p.device, dtype=p.dtype).train(model.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a diffusers folder or Hub repository (diffusers' own `from_pretrained`), or a published checkpoint.

        A published checkpoint (`{"args", "state_dict"}`, e.g. LeanVAE-dim4.ckpt) is a file, a folder
        holding one checkpoint file and no config.json, a Hub file "owner/repo/file.ckpt" or a short name
        of `leanvae.loading` ("leanvae-4ch", "leanvae-16ch"); it is converted on the fly. Its keyword
        arguments: `model_variant` (the published branch the checkpoint comes from; default "original"),
        `torch_dtype`, `device`, `revision`, `cache_dir`, `local_files_only`.
        """
        if _is_published_checkpoint(pretrained_model_name_or_path):
            return cls.from_published_checkpoint(pretrained_model_name_or_path, **kwargs)
        # A 40M-parameter model: diffusers' empty-weights initialisation (which needs accelerate, and warns
        # without it) saves nothing worth having.
        kwargs.setdefault("low_cpu_mem_usage", False)
        vae = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        dtype = kwargs.get("torch_dtype")
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            # diffusers builds the model under `dtype` as torch's default, but the bottleneck's phi and Q are
            # made from numpy as float32 (as published) and loading keeps each parameter's dtype: cast all.
            vae = _move(vae, dtype=dtype)
        return vae

    @classmethod
    def from_published_checkpoint(cls, name_or_path, *, model_variant=None, torch_dtype=None, device="cpu",
                                  revision=None, cache_dir=None, local_files_only=False, **unused):
        """Convert a published-format checkpoint (see `from_pretrained`); weights load strictly."""
        if unused:
            raise TypeError(f"AutoencoderLeanVAE.from_pretrained: a published checkpoint takes model_variant, torch_dtype, device, "
                            f"revision, cache_dir, local_files_only; got also {sorted(unused)}")
        if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
            raise TypeError(f"AutoencoderLeanVAE.from_pretrained: torch_dtype must be a floating torch.dtype, got {torch_dtype!r}")
        # The plain model's loader: resolves names, reads only tensors, loads strictly, one-line errors.
        model = load_model(name_or_path, device="cpu", strict=True, revision=revision, cache_dir=cache_dir,
                           local_files_only=local_files_only, model_cls=functools.partial(LeanVAE, variant=model_variant))
        vae = cls.from_leanvae(model)
        return _move(vae, device=device, dtype=torch_dtype).eval()

    # ------------------------------------------------------------------------------ slicing, tiling
    def enable_slicing(self):
        """Encode and decode one batch element at a time (outputs unchanged, memory set by one element)."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def enable_tiling(self, tile_sample_min_height=None, tile_sample_min_width=None):
        """Exact spatial tiling: the plain model's `enable_tiling` (tiles with a halo as wide as the network's
        receptive field, so tiled and untiled outputs agree to float rounding). Sizes in pixels; None: its default."""
        self.model.enable_tiling(tile_sample_min_height=tile_sample_min_height, tile_sample_min_width=tile_sample_min_width)
        self.use_tiling = True

    def disable_tiling(self):
        self.model.disable_tiling()
        self.use_tiling = False

    # ---------------------------------------------------------------------------- encode / decode
    def _sliced(self, fn, x):
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(part) for part in x.split(1)], dim=0)
        return fn(x)

    def _keep_chunking(self, fn, *args, **kwargs):
        # The model switches its temporal chunking off for good when it sees an image (as published);
        # a diffusers caller mixing images and videos keeps the setting it chose.
        chunking = self.model.tile_inference
        try:
            return fn(*args, **kwargs)
        finally:
            if self.model.tile_inference != chunking:
                self.model.set_tile_inference(chunking)

    def _encode(self, x):
        if self._pixel_scale != 1.0:
            x = x / self._pixel_scale  # [-1, 1] -> the model's [-0.5, 0.5]: a power of two, exact
        return self._keep_chunking(self.model.encode, x, scale_latent=False)

    def _decode(self, z):
        if z.ndim == 5 and z.shape[2] == 1:
            # One latent frame is one pixel frame: the model's image path (its video path needs k >= 1),
            # the inverse of what encode does with a one-frame video.
            video = self._keep_chunking(self.model.decode, z, is_image=True, scale_latent=False).unsqueeze(2)
        else:
            video = self._keep_chunking(self.model.decode, z, scale_latent=False)
        return video * self._pixel_scale if self._pixel_scale != 1.0 else video

    def encode(self, x, return_dict=True):
        """x: video (B, 3, 1+4k, H, W) or image (B, 3, H, W) in [-1, 1], H and W multiples of 8.

        Returns `AutoencoderKLOutput(latent_dist=...)` (or `(latent_dist,)`), whose `sample()`/`mode()`/
        `mean` is z: (B, z_dim, 1+k, H/8, W/8), in the Wan VAE's own space for the Wan variants.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"AutoencoderLeanVAE.encode: x must be a torch.Tensor, got {type(x).__name__}")
        dist = LeanVAELatent(self._sliced(self._encode, x))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z, return_dict=True, generator=None):
        """z: (B, z_dim, 1+k, h, w) -> `DecoderOutput(sample=video)` (or `(video,)`), video (B, 3, 1+4k, 8h, 8w) in [-1, 1]."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"AutoencoderLeanVAE.decode: z must be a torch.Tensor, got {type(z).__name__}")
        video = self._sliced(self._decode, z)
        return DecoderOutput(sample=video) if return_dict else (video,)

    def forward(self, sample, sample_posterior=False, return_dict=True, generator=None):
        """Encode then decode `sample` (the posterior is deterministic, so `sample_posterior` changes nothing)."""
        z = self.encode(sample).latent_dist.mode()
        return self.decode(z, return_dict=return_dict)


def _move(module, device=None, dtype=None):
    # torch's Module.to: diffusers' ModelMixin.to warns about "modules kept in float32" whenever a dtype is
    # given, even when there are none (an empty list); this class keeps none.
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def _is_published_checkpoint(name):
    if not isinstance(name, (str, os.PathLike)):
        return False
    text = os.fspath(name)
    local = os.path.expanduser(text)
    if os.path.isfile(local):
        return True
    if os.path.isdir(local):
        return not os.path.isfile(os.path.join(local, "config.json")) and any(
            n.endswith(_CHECKPOINT_SUFFIXES) for n in os.listdir(local))
    return text.endswith(_CHECKPOINT_SUFFIXES) or text in SHORT_NAMES


def convert_checkpoint(checkpoint, out_dir, *, model_variant=None, safe_serialization=True):
    """Write a diffusers folder (config.json + diffusion_pytorch_model.safetensors) for a published checkpoint."""
    vae = AutoencoderLeanVAE.from_published_checkpoint(checkpoint, model_variant=model_variant)
    vae.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return vae


__all__ = ["AutoencoderLeanVAE", "LeanVAELatent", "convert_checkpoint"]
