"""The published LeanVAE autoencoder (westlake-repl/LeanVAE, `LeanVAE/models/autoencoder.py`), in plain PyTorch.

Differences from the published code, all on paths where it crashes or accepts bad input:
- a chunk size larger than the clip runs as one chunk (published: `UnboundLocalError`);
- bad input raises `ValueError`/`TypeError` naming the problem (published: `assert` or a deep error);
- `load_from_checkpoint` defaults to `strict=True`, validates the checkpoint format and, when strict, refuses
  a checkpoint without a `state_dict` (published: random weights, silently).
Numbers are unchanged: every computation is the published one, in the same order.

Variants (`LeanVAE(args, variant=...)`, or `args.variant`), each the model of one published branch:
- "original" (the main branch): inputs in [-0.5, 0.5], any `latent_dim` (published checkpoints: 4, 16);
- "wan2.1" (branch `align-wan-2-1`): inputs in [-1, 1], `latent_dim` 16, trained so that its latent matches
  the Wan 2.1 VAE's; `encode` ends by normalising the latent with Wan 2.1's per-channel mean and std
  (`LatentScaler`), `decode` starts by undoing it;
- "wan2.2" (branch `align-wan-2-2`): the same with `latent_dim` 48 and Wan 2.2's statistics. That branch's
  README speaks of a 4x16x16 model, but its code (the only thing its checkpoints were trained with) builds
  the same 4x8x8 patching as the others, so this is what runs here.
The modules, and so the checkpoint keys, are the same in all three (the scaler has no parameters).
"""
import argparse
import warnings

import torch
import torch.nn as nn

from .distributions import DiagonalGaussianDistribution
from .modules import ISTA, Decoder_Arch, Encoder_Arch
from .wavelets import Patcher, UnPatcher

#: The published defaults (`LeanVAE.add_model_specific_args` plus the constructor's fallbacks).
DEFAULT_ARGS = dict(
    embedding_dim=512,
    latent_dim=4,
    ista_iter_num=2,
    ista_layer_num=2,
    l_dim=128,
    h_dim=384,
    sep_num_layer=2,
    fusion_num_layer=4,
    use_tile_inference=False,
    chunksize_enc=9,
    chunksize_dec=5,
)

VARIANTS = ("original", "wan2.1", "wan2.2")

#: Per-channel mean and std of the Wan VAEs' latents, as the published branches hard-code them in their
#: `LatentScaler` (the same statistics the Wan VAEs themselves normalise with).
WAN_LATENT_STATS = {
    "wan2.1": (
        [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
         0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
        [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
         3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
    ),
    "wan2.2": (
        [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
         -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
         -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
         -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
         -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
         0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667],
        [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
         0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
         0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
         0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
         0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
         0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744],
    ),
}

#: The latent width each variant's branch builds (wan2.1 sets it in its constructor, wan2.2 defaults to it).
_VARIANT_LATENT_DIM = {"wan2.1": 16, "wan2.2": 48}

#: Pixel range the model's input and output live in, by variant.
INPUT_RANGE = {"original": (-0.5, 0.5), "wan2.1": (-1.0, 1.0), "wan2.2": (-1.0, 1.0)}


def _check_variant(variant, where):
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"{where}: variant must be one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
    return variant


def make_args(variant="original", **overrides):
    """An `argparse.Namespace` with the published defaults of `variant`'s branch, updated by `overrides`."""
    _check_variant(variant, "make_args")
    unknown = set(overrides) - set(DEFAULT_ARGS)
    if unknown:
        raise TypeError(f"make_args: unknown argument(s) {sorted(unknown)}; expected some of {sorted(DEFAULT_ARGS)}")
    fixed = _VARIANT_LATENT_DIM.get(variant)
    if fixed is not None and overrides.get("latent_dim", fixed) != fixed:
        raise ValueError(f"make_args: variant {variant!r} has latent_dim {fixed}, got latent_dim={overrides['latent_dim']}")
    defaults = dict(DEFAULT_ARGS, latent_dim=fixed) if fixed is not None else DEFAULT_ARGS
    return argparse.Namespace(**{**defaults, **overrides, "variant": variant})


class LatentScaler:
    """The Wan branches' latent normalisation: encode ends with `(z - mean) / std`, decode starts with `z * std + mean`.

    z: (B, C, T, H, W) with C = len(mean). The statistics stay float32 CPU tensors, off the module tree as
    published (no state_dict keys, untouched by `model.to(dtype)`), and the arithmetic runs in float32
    (`(z - mean) * (1 / std)` and `z * std + mean`, the published expressions) before casting back to z's
    dtype, so float32 results are the published ones bit for bit.
    """

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.inv_std = 1.0 / self.std

    def enc_norm(self, z):
        dev = z.device
        return ((z.float() - self.mean.to(dev)) * self.inv_std.to(dev)).to(z.dtype)

    def dec_norm(self, z):
        dev = z.device
        return (z.float() * self.std.to(dev) + self.mean.to(dev)).to(z.dtype)


def _describe(t):
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


class LeanVAE(nn.Module):
    """Video/image VAE. Video x: (B, 3, 1+4k, H, W), image x: (B, 3, H, W), H and W divisible by 8.

    Latent z: (B, latent_dim, 1+k, H/8, W/8) (images: 1 frame). Pixels in `model.input_range`
    ([-0.5, 0.5] for variant "original", [-1, 1] for the Wan variants).

    `variant` ("original", "wan2.1", "wan2.2"; default: `args.variant`, else "original") picks the
    published branch this model follows (see the module docstring). "wan2.1" uses latent_dim 16 whatever
    `args` says, as its branch does; "wan2.2" needs latent_dim 48.
    """

    def __init__(self, args=None, variant=None):
        super().__init__()
        if variant is None:
            variant = getattr(args, "variant", None) or "original"
        _check_variant(variant, "LeanVAE")
        if args is None:
            args = make_args(variant=variant)
        # A copy: the published wan2.1 constructor overwrites latent_dim on the caller's namespace.
        args = argparse.Namespace(**{**vars(args), "variant": variant})
        if variant == "wan2.1":
            args.latent_dim = 16
        if variant == "wan2.2" and args.latent_dim != 48:
            raise ValueError(f"LeanVAE: variant 'wan2.2' needs latent_dim 48 (Wan 2.2's latent width), got {args.latent_dim}")
        self.args = args
        self.variant = variant
        self.norm = LatentScaler(*WAN_LATENT_STATS[variant]) if variant in WAN_LATENT_STATS else None
        self.embedding_dim = args.embedding_dim
        self.latent_bottleneck = ISTA(
            points_num=args.embedding_dim, out_num=args.latent_dim, iter_num=args.ista_iter_num, layer_num=args.ista_layer_num
        )
        self.dwt = Patcher()
        self.idwt = UnPatcher()
        self.encoder = Encoder_Arch(l_dim=args.l_dim, h_dim=args.h_dim, sep_num_layer=args.sep_num_layer, fusion_num_layer=args.fusion_num_layer)
        self.decoder = Decoder_Arch(l_dim=args.l_dim, h_dim=args.h_dim, sep_num_layer=args.sep_num_layer, fusion_num_layer=args.fusion_num_layer)
        self.std_layer = nn.Linear(args.embedding_dim, args.latent_dim)
        self.tile_inference = False
        self.chunksize_enc = getattr(args, "chunksize_enc", None) or 5
        self.chunksize_dec = getattr(args, "chunksize_dec", None) or 5
        self.set_tile_inference(bool(getattr(args, "use_tile_inference", False)))

    @classmethod
    def from_config(cls, variant="original", **overrides):
        """Build with the published defaults, e.g. `LeanVAE.from_config(latent_dim=16)` or `from_config("wan2.1")`."""
        return cls(make_args(variant, **overrides))

    @property
    def input_range(self):
        """(low, high) of the pixels `encode` takes and `decode` returns: (-0.5, 0.5) or, for Wan variants, (-1, 1)."""
        return INPUT_RANGE[self.variant]

    # ----------------------------------------------------------------- tiling
    def _set_first_chunk(self, is_first_chunk=True):
        for module in self.modules():
            if hasattr(module, "is_first_chunk"):
                module.is_first_chunk = is_first_chunk

    def set_tile_inference(self, tile_inference=False):
        for module in self.modules():
            if hasattr(module, "tile_inference"):
                module.tile_inference = tile_inference

    def _build_chunk_index(self, T=17, mtype="enc"):
        """[(start, end)]: a first chunk of `chunksize` frames, then chunks of `chunksize - 1`.

        A clip no longer than one chunk is a single chunk (the published code raises UnboundLocalError).
        """
        chunksize = self.chunksize_enc if mtype == "enc" else self.chunksize_dec
        if mtype == "enc" and (chunksize < 5 or chunksize % 4 != 1):
            raise ValueError(f"chunksize_enc must be 1+4k frames with k >= 1 (5, 9, 13, ...), got {chunksize}")
        if mtype != "enc" and chunksize < 2:
            raise ValueError(f"chunksize_dec must be at least 2 latent frames, got {chunksize}")
        if T <= chunksize:
            return [(0, T)]
        start_end = [(0, chunksize)]
        for i in range(chunksize, T, chunksize - 1):
            start_end.append((i, min(i + chunksize - 1, T)))
        return start_end

    # ------------------------------------------------------- spatial tiling
    # Class-level defaults, so the constructor and checkpoints are unaffected (names as in diffusers).
    use_tiling = False
    tile_sample_min_height = 256
    tile_sample_min_width = 256
    _tiling_inner = False  # True while leanvae.tiling runs the tiles' own (untiled) calls

    def enable_tiling(self, tile_sample_min_height=None, tile_sample_min_width=None):
        """Encode and decode frames in spatial tiles of at most this many pixels (multiples of 8; None keeps
        the current value, 256 by default), each computed with a halo as wide as the network's receptive
        field: the same result as untiled up to float rounding, in memory set by the tile and the temporal
        chunk size (a video longer than one chunk runs each tile through the temporal chunking, see
        `set_tile_inference`). Bad sizes: ValueError/TypeError naming the argument. See leanvae/tiling.py.
        """
        from .tiling import check_tile_size, receptive_field

        scale = receptive_field(self).scale
        h = self.tile_sample_min_height if tile_sample_min_height is None else tile_sample_min_height
        w = self.tile_sample_min_width if tile_sample_min_width is None else tile_sample_min_width
        self.tile_sample_min_height = check_tile_size("tile_sample_min_height", h, scale)
        self.tile_sample_min_width = check_tile_size("tile_sample_min_width", w, scale)
        self.use_tiling = True

    def disable_tiling(self):
        """Encode and decode whole frames again (the default)."""
        self.use_tiling = False

    def _tiled(self):
        return self.use_tiling and not self._tiling_inner

    # ------------------------------------------------------------ validation
    def _check_input(self, x, what):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LeanVAE.{what}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim not in (4, 5):
            raise ValueError(
                f"LeanVAE.{what}: x must be an image (B, 3, H, W) or a video (B, 3, T, H, W), got {x.ndim}-D {_describe(x)}"
            )
        if x.shape[1] != self.encoder.in_channel:
            raise ValueError(f"LeanVAE.{what}: x must have {self.encoder.in_channel} channels in dim 1, got {_describe(x)}")
        h, w = x.shape[-2:]
        if h % 8 or w % 8 or h == 0 or w == 0:
            raise ValueError(f"LeanVAE.{what}: H and W must be positive multiples of 8, got H={h}, W={w}")
        if x.ndim == 5 and x.shape[2] % 4 != 1:
            raise ValueError(f"LeanVAE.{what}: a video must have 1+4k frames (1, 5, 9, 17, ...), got T={x.shape[2]}")
        self._check_like_params(x, what, "x")

    def _check_latent(self, z, what):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"LeanVAE.{what}: z must be a torch.Tensor, got {type(z).__name__}")
        d = self.latent_bottleneck.phi.shape[0]
        if z.ndim != 5 or z.shape[1] != d:
            raise ValueError(f"LeanVAE.{what}: z must be (B, {d}, T, H/8, W/8), got {_describe(z)}")
        if min(z.shape) == 0:
            raise ValueError(f"LeanVAE.{what}: z must not be empty, got {_describe(z)}")
        self._check_like_params(z, what, "z")

    def _check_like_params(self, x, what, name):
        p = self.latent_bottleneck.phi
        if not x.is_floating_point():
            raise TypeError(f"LeanVAE.{what}: {name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.device != p.device:
            raise ValueError(f"LeanVAE.{what}: {name} is on {x.device} but the model is on {p.device}; move one of them")
        if x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"LeanVAE.{what}: {name} has dtype {x.dtype} but the model has dtype {p.dtype}; "
                "cast one of them or run under torch.autocast"
            )

    # ---------------------------------------------------------------- public
    def encode(self, x, scale_latent=True):
        """x: (B, 3, 1+4k, H, W) or (B, 3, H, W) -> z: (B, latent_dim, 1+k, H/8, W/8).

        Wan variants normalise z with Wan's statistics, as published; `scale_latent=False` returns it in the
        Wan VAE's own (un-normalised) space instead (no effect for variant "original").
        """
        self._check_input(x, "encode")
        if self._tiled():
            from .tiling import tiled_encode

            return self._encoded(tiled_encode(self, x, (self.tile_sample_min_height, self.tile_sample_min_width)), scale_latent)
        if x.ndim == 4:
            x = x.unsqueeze(2)
            self.set_tile_inference(False)  # as published: encoding an image switches tiling off
        if self.tile_inference:
            z = []
            for idx, (start, end) in enumerate(self._build_chunk_index(T=x.shape[2], mtype="enc")):
                self._set_first_chunk(idx == 0)
                p = self.encoder.encode(x=self.dwt(x[:, :, start:end]))
                z.append(self.latent_bottleneck.sample(p))
            z = torch.cat(z, dim=1)
        else:
            p = self.encoder.encode(x=self.dwt(x))
            z = self.latent_bottleneck.sample(p)
        return self._encoded(z.permute(0, 4, 1, 2, 3), scale_latent)

    def _encoded(self, z, scale_latent):
        # Wan variants: normalise once, in the outermost call (a tile's own call returns the raw latent).
        if self.norm is not None and scale_latent and not self._tiling_inner:
            z = self.norm.enc_norm(z)
        return z

    def decode(self, z, is_image=False, scale_latent=True):
        """z: (B, latent_dim, 1+k, h, w) -> video (B, 3, 1+4k, 8h, 8w), or image (B, 3, 8h, 8w) if `is_image`.

        Wan variants take z normalised with Wan's statistics, as published; `scale_latent=False` takes it in
        the Wan VAE's own (un-normalised) space instead (no effect for variant "original").
        """
        self._check_latent(z, "decode")
        # Wan variants: un-normalise once, in the outermost call (a tile's own call takes the raw latent).
        if self.norm is not None and scale_latent and not self._tiling_inner:
            z = self.norm.dec_norm(z)
        if is_image and z.shape[2] != 1:
            raise ValueError(f"LeanVAE.decode: is_image=True needs one latent frame, got T={z.shape[2]}")
        if self._tiled():
            from .tiling import tiled_decode

            return tiled_decode(self, z, (self.tile_sample_min_height, self.tile_sample_min_width), is_image)
        z = z.permute(0, 2, 3, 4, 1)
        if is_image:
            self.set_tile_inference(False)  # as published
        if self.tile_inference:
            x_recon = []
            for idx, (start, end) in enumerate(self._build_chunk_index(T=z.shape[1], mtype="dec")):
                self._set_first_chunk(idx == 0)
                p_rec = self.latent_bottleneck.recon(z[:, start:end])
                x_recon.append(self.idwt(x=self.decoder.decode(p_rec, is_image=is_image)))
            return torch.cat(x_recon, dim=2)
        p_rec = self.latent_bottleneck.recon(z)
        return self.idwt(x=self.decoder.decode(p_rec, is_image=is_image))

    @torch.no_grad()
    def inference(self, x):
        """Encode then decode. Returns (x, reconstruction); images come back as (B, 3, H, W)."""
        self._check_input(x, "inference")
        is_image = x.ndim == 4
        x_recon = self.decode(self.encode(x), is_image=is_image)
        if is_image:
            x = x.squeeze(2)
        return x, x_recon

    def forward(self, x, log_image=False):
        """Training pass on a video (B, 3, 1+4k, H, W), k >= 1.

        Returns (x, x_recon, x_dwt, x_dwt_rec, posterior), or (x, x_recon) with `log_image`; the Wan
        variants return (x, x_recon, z) as their branches do (see `_forward_wan`).
        """
        self._check_input(x, "forward")
        if x.ndim != 5 or x.shape[2] < 5:
            raise ValueError(f"LeanVAE.forward: expects a video (B, 3, 1+4k, H, W) with k >= 1, got {_describe(x)}")
        x_dwt = self.dwt(x)
        p = self.encoder(x=x_dwt)
        z_mean = self.latent_bottleneck.sample(p)
        if self.variant != "original":
            return self._forward_wan(x, p, z_mean, log_image)
        z_std = self.std_layer(p)
        posterior = DiagonalGaussianDistribution(parameters=(z_mean, z_std))
        z = posterior.sample()
        p_rec = self.latent_bottleneck.recon(z)
        x_dwt_rec = self.decoder(p_rec)
        x_recon = self.idwt(x=x_dwt_rec)
        if log_image:
            return x, x_recon
        return x, x_recon, x_dwt, x_dwt_rec, posterior

    def _forward_wan(self, x, p, z_mean, log_image):
        """The Wan branches' training pass: (x, x_recon, Wan-normalised z_mean (B, latent_dim, T', h, w)).

        wan2.1 decodes the mean itself (its branch does not use `std_layer` here); wan2.2 decodes a sample
        of the diagonal Gaussian, as the original does.
        """
        if self.variant == "wan2.2":
            z = DiagonalGaussianDistribution(parameters=(z_mean, self.std_layer(p))).sample()
        else:
            z = z_mean
        x_recon = self.idwt(x=self.decoder(self.latent_bottleneck.recon(z)))
        if log_image:
            return x, x_recon
        return x, x_recon, self.norm.enc_norm(z_mean.permute(0, 4, 1, 2, 3))

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, path):
        """Write `{"args": {...}, "state_dict": {...}}`, the published checkpoint format."""
        torch.save({"args": dict(vars(self.args)), "state_dict": self.state_dict()}, path)

    @classmethod
    def load_from_checkpoint(cls, ckpt_path, device="cpu", strict=True, weights_only=True, variant=None):
        """Build a model from a published-format checkpoint `{"args": {...}, "state_dict": {...}}`.

        `variant`: the published branch the checkpoint comes from (see `LeanVAE`); default: the variant its
        `args` record (checkpoints we save do), else "original". The published branches do not record it.

        Extra entries in `args` (training options) are kept on `model.args` and otherwise ignored.
        """
        try:
            checkpoint = torch.load(ckpt_path, map_location=device, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as exc:  # unpickling or format errors: say what we expected
            raise ValueError(
                f"LeanVAE.load_from_checkpoint: could not read {ckpt_path!r} as a torch checkpoint ({exc.__class__.__name__}: {exc}). "
                "If you trust the file and it holds Python objects, pass weights_only=False."
            ) from exc
        if not isinstance(checkpoint, dict) or "args" not in checkpoint:
            raise ValueError(
                f"LeanVAE.load_from_checkpoint: {ckpt_path!r} is not a LeanVAE checkpoint: expected a dict with "
                f"'args' and 'state_dict', got {type(checkpoint).__name__}"
                + (f" with keys {sorted(checkpoint)[:8]}" if isinstance(checkpoint, dict) else "")
            )
        ckpt_args = checkpoint["args"]
        if isinstance(ckpt_args, argparse.Namespace):
            ckpt_args = vars(ckpt_args)
        if not isinstance(ckpt_args, dict):
            raise ValueError(f"LeanVAE.load_from_checkpoint: 'args' must be a dict, got {type(ckpt_args).__name__}")
        model = cls(argparse.Namespace(**{**DEFAULT_ARGS, **ckpt_args}), variant=variant)
        if "state_dict" not in checkpoint:
            # The published loader keeps the random initial weights here; a model that silently
            # reconstructs noise is worse than an error.
            if strict:
                raise ValueError(
                    f"LeanVAE.load_from_checkpoint: {ckpt_path!r} has 'args' but no 'state_dict' (no weights); "
                    "pass a trained checkpoint, or strict=False for a randomly initialised model"
                )
            warnings.warn(f"LeanVAE.load_from_checkpoint: {ckpt_path!r} has no 'state_dict'; "
                          "the model keeps its random initial weights", stacklevel=2)
        else:
            model.load_state_dict(checkpoint["state_dict"], strict=strict)
        return model.to(device)

    @classmethod
    def from_pretrained(cls, name_or_path, *, revision=None, cache_dir=None, local_files_only=False, strict=True,
                        device="cpu"):
        """A model in eval() mode with published (or your own) weights, e.g. `LeanVAE.from_pretrained("leanvae-4ch")`.

        `name_or_path`: a checkpoint file, a folder holding one, a Hugging Face Hub file
        ("Yumic/LeanVAE/LeanVAE-dim4.ckpt") or a short name ("leanvae-4ch", "leanvae-16ch"). Hub files are
        downloaded once into huggingface_hub's cache (`pip install 'leanvae-kernels[hub]'`);
        `local_files_only=True` or HF_HUB_OFFLINE=1 read the cache only. Loading is strict: a checkpoint
        without weights or whose tensors do not fit is an error (`strict=False` loads what fits and warns).
        See `leanvae.loading.load_model`.
        """
        from .loading import load_model

        return load_model(name_or_path, device=device, strict=strict, revision=revision, cache_dir=cache_dir,
                          local_files_only=local_files_only, model_cls=cls)
