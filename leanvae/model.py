"""The published LeanVAE autoencoder (westlake-repl/LeanVAE, `LeanVAE/models/autoencoder.py`), in plain PyTorch.

Differences from the published code, all on paths where it crashes or accepts bad input:
- a chunk size larger than the clip runs as one chunk (published: `UnboundLocalError`);
- bad input raises `ValueError`/`TypeError` naming the problem (published: `assert` or a deep error);
- `load_from_checkpoint` defaults to `strict=True` and validates the checkpoint format.
Numbers are unchanged: every computation is the published one, in the same order.
"""
import argparse

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


def make_args(**overrides):
    """An `argparse.Namespace` with the published defaults, updated by `overrides`."""
    unknown = set(overrides) - set(DEFAULT_ARGS)
    if unknown:
        raise TypeError(f"make_args: unknown argument(s) {sorted(unknown)}; expected some of {sorted(DEFAULT_ARGS)}")
    return argparse.Namespace(**{**DEFAULT_ARGS, **overrides})


def _describe(t):
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


class LeanVAE(nn.Module):
    """Video/image VAE. Video x: (B, 3, 1+4k, H, W), image x: (B, 3, H, W), H and W divisible by 8.

    Latent z: (B, latent_dim, 1+k, H/8, W/8) (images: 1 frame).
    """

    def __init__(self, args=None):
        super().__init__()
        if args is None:
            args = make_args()
        self.args = args
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
    def from_config(cls, **overrides):
        """Build with the published defaults, e.g. `LeanVAE.from_config(latent_dim=16)`."""
        return cls(make_args(**overrides))

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
    def encode(self, x):
        """x: (B, 3, 1+4k, H, W) or (B, 3, H, W) -> z: (B, latent_dim, 1+k, H/8, W/8)."""
        self._check_input(x, "encode")
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
        return z.permute(0, 4, 1, 2, 3)

    def decode(self, z, is_image=False):
        """z: (B, latent_dim, 1+k, h, w) -> video (B, 3, 1+4k, 8h, 8w), or image (B, 3, 8h, 8w) if `is_image`."""
        self._check_latent(z, "decode")
        if is_image and z.shape[2] != 1:
            raise ValueError(f"LeanVAE.decode: is_image=True needs one latent frame, got T={z.shape[2]}")
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

        Returns (x, x_recon, x_dwt, x_dwt_rec, posterior), or (x, x_recon) with `log_image`.
        """
        self._check_input(x, "forward")
        if x.ndim != 5 or x.shape[2] < 5:
            raise ValueError(f"LeanVAE.forward: expects a video (B, 3, 1+4k, H, W) with k >= 1, got {_describe(x)}")
        x_dwt = self.dwt(x)
        p = self.encoder(x=x_dwt)
        z_mean = self.latent_bottleneck.sample(p)
        z_std = self.std_layer(p)
        posterior = DiagonalGaussianDistribution(parameters=(z_mean, z_std))
        z = posterior.sample()
        p_rec = self.latent_bottleneck.recon(z)
        x_dwt_rec = self.decoder(p_rec)
        x_recon = self.idwt(x=x_dwt_rec)
        if log_image:
            return x, x_recon
        return x, x_recon, x_dwt, x_dwt_rec, posterior

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, path):
        """Write `{"args": {...}, "state_dict": {...}}`, the published checkpoint format."""
        torch.save({"args": dict(vars(self.args)), "state_dict": self.state_dict()}, path)

    @classmethod
    def load_from_checkpoint(cls, ckpt_path, device="cpu", strict=True, weights_only=True):
        """Build a model from a published-format checkpoint `{"args": {...}, "state_dict": {...}}`.

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
        model = cls(argparse.Namespace(**{**DEFAULT_ARGS, **ckpt_args}))
        if "state_dict" in checkpoint:
            model.load_state_dict(checkpoint["state_dict"], strict=strict)
        return model.to(device)
