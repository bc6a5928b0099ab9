"""The published LeanVAE building blocks, in plain PyTorch.

Class names, attribute names, submodule indices and parameter shapes follow the published model
(westlake-repl/LeanVAE, `LeanVAE/modules/backbones.py`), so its checkpoints load with `strict=True`
and structural patching (`leanvae.use_fused_kernels`) recognises either implementation. Token tensors
are channels-last: `(B, T, H, W, D)`.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchToTokens(nn.Module):
    """(B, C, nt*pt, nh*ph, nw*pw) -> (B, nt, nh, nw, C*pt*ph*pw), channel order (c, pt, ph, pw).

    Stands where the published model has an einops `Rearrange` (no parameters, so keys are unchanged).
    """

    def __init__(self, pt, ph, pw):
        super().__init__()
        self.pt, self.ph, self.pw = pt, ph, pw

    def forward(self, x):
        b, c, t, h, w = x.shape
        pt, ph, pw = self.pt, self.ph, self.pw
        x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, t // pt, h // ph, w // pw, c * pt * ph * pw)

    def extra_repr(self):
        return f"pt={self.pt}, ph={self.ph}, pw={self.pw}"


class TokensToPatch(nn.Module):
    """(B, nt, nh, nw, C*pt*ph*pw) -> (B, C, nt*pt, nh*ph, nw*pw): the inverse of `PatchToTokens`."""

    def __init__(self, pt, ph, pw):
        super().__init__()
        self.pt, self.ph, self.pw = pt, ph, pw

    def forward(self, x):
        b, t, h, w, d = x.shape
        pt, ph, pw = self.pt, self.ph, self.pw
        c = d // (pt * ph * pw)
        x = x.reshape(b, t, h, w, c, pt, ph, pw)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, c, t * pt, h * ph, w * pw)

    def extra_repr(self):
        return f"pt={self.pt}, ph={self.ph}, pw={self.pw}"


class PEG3D(nn.Module):
    """Causal depthwise 3x3x3 conv on tokens. x: (B, T, H, W, D) -> (B, T, H, W, D).

    Two frames of temporal padding in front (zeros, or in tiled inference the previous chunk's last two
    *padded* frames, `causal_cached: (B, D, 2, H+2, W+2)`), one pixel of zeros around H and W.
    """

    #: None (the default, as published): the conv runs on all channels at once. An int N: without autograd,
    #: on N channels at a time into one output. The conv is depthwise (each channel its own 27 taps), so each
    #: channel's arithmetic is the same; only the conv's working memory (torch's CPU conv reorders its whole
    #: input, about 2x the output) stops scaling with the channel count. Set by leanvae.tiling for the
    #: duration of a tiled call.
    channel_slice = None

    def __init__(self, dim):
        super().__init__()
        self.ds_conv = nn.Conv3d(in_channels=dim, out_channels=dim, kernel_size=(3, 3, 3), groups=dim)
        self.is_first_chunk = True
        self.causal_cached = None
        self.tile_inference = False

    def forward(self, x):
        x = x.permute(0, 4, 1, 2, 3)
        if self.tile_inference:
            if self.is_first_chunk:
                x = F.pad(x, (1, 1, 1, 1, 2, 0), value=0.0)
            else:
                x = F.pad(x, (1, 1, 1, 1, 0, 0), value=0.0)
                x = torch.concatenate((self.causal_cached, x), dim=2)
            self.causal_cached = x[:, :, -2:].clone()
        else:
            x = F.pad(x, (1, 1, 1, 1, 2, 0), value=0.0)
        x = self._conv(x.contiguous())
        return x.permute(0, 2, 3, 4, 1)

    def _conv(self, x):
        """ds_conv(x), in slices of `channel_slice` channels when set (inference only)."""
        conv, n = self.ds_conv, self.channel_slice
        c = x.shape[1]
        if n is None or torch.is_grad_enabled() or c <= n or type(conv) is not nn.Conv3d or conv.groups != c:
            return conv(x)
        out = None
        for s in range(0, c, n):
            bias = conv.bias[s : s + n] if conv.bias is not None else None
            y = F.conv3d(x[:, s : s + n], conv.weight[s : s + n], bias, conv.stride, conv.padding, conv.dilation,
                         groups=min(n, c - s))
            if out is None:
                out = y.new_empty((y.shape[0], c) + y.shape[2:])
            out[:, s : s + n] = y
        return out


class GEGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def ffd(dim, mult=4, dropout=0.0):
    """The published feed-forward: LayerNorm -> Linear(dim, 2*inner) -> GEGLU -> Dropout -> Linear(inner, dim)."""
    inner_dim = int(mult * (2 / 3) * dim)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner_dim * 2, bias=False),
        GEGLU(),
        nn.Dropout(dropout),
        nn.Linear(inner_dim, dim, bias=False),
    )


class NAF(nn.Module):
    """`num_layer` x (PEG3D, then feed-forward), no residuals."""

    #: None (the default, as published): each feed-forward runs on all tokens at once. An int N: without
    #: autograd, on N tokens at a time, written into one output. The feed-forward is per token (LayerNorm,
    #: two GEMMs, GEGLU), so each token's arithmetic is the same; only the 2 * int(8/3 * dim)-wide hidden
    #: activation stops scaling with the number of tokens. leanvae.tiling sets it for the duration of a tiled
    #: call, so that a tile's memory is set by its tokens' model width, not by the feed-forward's hidden width.
    token_slice = None

    def __init__(self, num_layer, dim):
        super().__init__()
        self.num_layer = num_layer
        self.dconv_layer = nn.Sequential()
        self.ffd_layer = nn.Sequential()
        for _ in range(num_layer):
            self.ffd_layer.append(ffd(dim, 4))
            self.dconv_layer.append(PEG3D(dim))

    def forward(self, x):
        for i in range(self.num_layer):
            x = self.dconv_layer[i](x)
            x = self.feed_forward(i, x)
        return x

    def feed_forward(self, i, x, residual=False):
        """ffd_layer[i](x), or x + ffd_layer[i](x) when `residual`; in slices of `token_slice` tokens when set."""
        ffd = self.ffd_layer[i]
        n = self.token_slice
        d = x.shape[-1]
        if n is None or torch.is_grad_enabled() or x.numel() <= n * d:
            return x + ffd(x) if residual else ffd(x)
        xt = x.reshape(-1, d)
        out = torch.empty_like(xt, memory_format=torch.contiguous_format)
        for s in range(0, xt.shape[0], n):
            part = xt[s : s + n]
            if residual:
                torch.add(part, ffd(part), out=out[s : s + n])
            else:
                out[s : s + n] = ffd(part)
        return out.view(x.shape)


class ResNAF(NAF):
    """`num_layer` x (x + PEG3D(x), then x + feed-forward(x))."""

    def forward(self, x):
        for i in range(self.num_layer):
            x = x + self.dconv_layer[i](x)
            x = self.feed_forward(i, x, residual=True)
        return x


_PATCH_KINDS = ("video_low", "video_high", "image_low", "image_high")


def _patch_sizes(name, in_channel, pt, ph, pw):
    """(t, h, w) of one patch and the number of wavelet values it holds for this projection."""
    t = pt if name.startswith("video") else 1
    n = in_channel * t * ph * pw
    if name.endswith("high"):
        n *= 7 if name.startswith("video") else 3
    return (t, ph, pw), n


class Encoder_Arch(nn.Module):
    """Wavelet sub-bands -> tokens (B, T', H/8, W/8, l_dim + h_dim).

    Low band (the first `in_channel` channels) and high bands are projected separately, refined by their
    own `ResNAF`, concatenated and fused.
    """

    def __init__(self, l_dim=128, h_dim=384, sep_num_layer=2, fusion_num_layer=4, patch_size=(2, 4, 4), in_channel=3):
        super().__init__()
        self.is_first_chunk = True
        self.tile_inference = False
        self.in_channel = in_channel
        self._build_linear_patch(in_channel, l_dim, h_dim, *patch_size)
        self.low_layer = ResNAF(num_layer=sep_num_layer, dim=l_dim)
        self.high_layer = ResNAF(num_layer=sep_num_layer, dim=h_dim)
        self.fusion_layer = ResNAF(num_layer=fusion_num_layer, dim=l_dim + h_dim)

    def _build_linear_patch(self, in_channel=3, out_channel_low=128, out_channel_high=384, pt=2, ph=4, pw=4):
        for name in _PATCH_KINDS:
            (t, h, w), n = _patch_sizes(name, in_channel, pt, ph, pw)
            out_dim = out_channel_low if name.endswith("low") else out_channel_high
            self.add_module(f"{name}_proj", nn.Sequential(PatchToTokens(t, h, w), nn.Linear(n, out_dim)))

    def _linear_patch(self, x, proj_type):
        low_comp, high_comp = x[:, : self.in_channel], x[:, self.in_channel :]
        return getattr(self, f"{proj_type}_low_proj")(low_comp), getattr(self, f"{proj_type}_high_proj")(high_comp)

    def _feature_transform(self, low_x, high_x):
        low_x = self.low_layer(low_x)
        high_x = self.high_layer(high_x)
        return self.fusion_layer(torch.cat([low_x, high_x], dim=-1))

    def forward(self, x):
        xi, xv = x
        xi_low, xi_high = self._linear_patch(xi, "image")
        xv_low, xv_high = self._linear_patch(xv, "video")
        low_x = torch.cat([xi_low, xv_low], dim=1)
        high_x = torch.cat([xi_high, xv_high], dim=1)
        return self._feature_transform(low_x, high_x)

    def encode(self, x):
        xi, xv = x
        if xi is not None and xv is not None:
            xi_low, xi_high = self._linear_patch(xi, "image")
            xv_low, xv_high = self._linear_patch(xv, "video")
            low_x = torch.cat([xi_low, xv_low], dim=1)
            high_x = torch.cat([xi_high, xv_high], dim=1)
        elif xi is not None:
            low_x, high_x = self._linear_patch(xi, "image")
        else:
            low_x, high_x = self._linear_patch(xv, "video")
        return self._feature_transform(low_x, high_x)


class Decoder_Arch(nn.Module):
    """Tokens (B, T', H/8, W/8, l_dim + h_dim) -> wavelet sub-bands (xi, xv), the mirror of `Encoder_Arch`."""

    def __init__(self, l_dim=128, h_dim=384, sep_num_layer=2, fusion_num_layer=4, patch_size=(2, 4, 4), in_channel=3):
        super().__init__()
        self.l_dim = l_dim
        self.is_first_chunk = True
        self.tile_inference = False
        self._build_linear_unpatch(in_channel, l_dim, h_dim, *patch_size)
        self.low_layer = ResNAF(num_layer=sep_num_layer, dim=l_dim)
        self.high_layer = ResNAF(num_layer=sep_num_layer, dim=h_dim)
        self.fusion_layer = ResNAF(num_layer=fusion_num_layer, dim=l_dim + h_dim)

    def _build_linear_unpatch(self, in_channel=3, out_channel_low=128, out_channel_high=384, pt=2, ph=4, pw=4):
        for name in _PATCH_KINDS:
            (t, h, w), n = _patch_sizes(name, in_channel, pt, ph, pw)
            in_dim = out_channel_low if name.endswith("low") else out_channel_high
            self.add_module(f"{name}_proj", nn.Sequential(nn.Linear(in_dim, n), TokensToPatch(t, h, w)))

    def _linear_unpatch(self, x, proj_type):
        low_comp = getattr(self, f"{proj_type}_low_proj")(x[0])
        high_comp = getattr(self, f"{proj_type}_high_proj")(x[1])
        return torch.cat([low_comp, high_comp], dim=1)

    def _feature_transform(self, x):
        x = self.fusion_layer(x)
        low_x = self.low_layer(x[:, :, :, :, : self.l_dim])
        high_x = self.high_layer(x[:, :, :, :, self.l_dim :])
        return low_x, high_x

    def decode(self, x, is_image=False):
        low_x, high_x = self._feature_transform(x)
        if is_image:
            return self._linear_unpatch((low_x, high_x), "image"), None
        if self.tile_inference and not self.is_first_chunk:
            return None, self._linear_unpatch((low_x, high_x), "video")
        xi = self._linear_unpatch((low_x[:, :1], high_x[:, :1]), "image")
        xv = self._linear_unpatch((low_x[:, 1:], high_x[:, 1:]), "video")
        return xi, xv

    def forward(self, x):
        low_x, high_x = self._feature_transform(x)
        xi = self._linear_unpatch((low_x[:, :1], high_x[:, :1]), "image")
        xv = self._linear_unpatch((low_x[:, 1:], high_x[:, 1:]), "video")
        return xi, xv


class ISTA(nn.Module):
    """ISTA-Net+ bottleneck: `sample` measures tokens with `phi`, `recon` recovers them.

    sample: x (B, T, H, W, D) -> y (B, T, H, W, d) = x @ phi.T
    recon:  y (B, T, H, W, d) -> (B, T, H, W, D); per iteration a gradient step
            r = x - w * ((x @ phi.T - y) @ phi), then NAF, soft threshold, NAF, plus r.
    """

    def __init__(self, points_num=512, out_num=4, iter_num=2, layer_num=2):
        super().__init__()
        # numpy's global generator, as published, so seeded initialisations agree with the published model.
        phi_init = np.random.normal(0.0, (1 / points_num) ** 0.5, size=(out_num, points_num))
        self.phi = nn.Parameter(torch.from_numpy(phi_init).float(), requires_grad=True)
        self.Q = nn.Parameter(torch.from_numpy(np.transpose(phi_init)).float(), requires_grad=True)
        self.iter_num = iter_num
        self.forward_l = nn.ModuleList()
        self.backward_l = nn.ModuleList()
        for _ in range(iter_num):
            self.forward_l.append(NAF(num_layer=layer_num, dim=points_num))
            self.backward_l.append(NAF(num_layer=layer_num, dim=points_num))
        self.weights = nn.ParameterList()
        self.etas = nn.ParameterList()  # empty in the published model; kept so module structure matches
        self.threshold = nn.ParameterList()
        for _ in range(iter_num):
            self.threshold.append(nn.Parameter(torch.Tensor([0.01]), requires_grad=True))
            self.weights.append(nn.Parameter(torch.tensor(1.0), requires_grad=True))

    def sample(self, x):
        b, t, h, w, d = x.shape
        y = x.view(-1, d) @ self.phi.T
        return y.view(b, t, h, w, -1)

    def recon(self, y):
        b, t, h, w, c = y.shape
        y = y.reshape(-1, c)
        recon = torch.mm(y, self.Q.t())
        _, d = recon.shape
        for i in range(self.iter_num):
            recon_r = recon - self.weights[i] * torch.mm(torch.mm(recon, self.phi.t()) - y, self.phi)
            recon = recon_r.reshape(b, t, h, w, -1)
            recon = self.forward_l[i](recon)
            recon = torch.mul(torch.sign(recon), F.relu(torch.abs(recon) - self.threshold[i]))
            recon = self.backward_l[i](recon).view(-1, d)
            recon = recon_r + recon
        return recon.view(b, t, h, w, -1)

    def forward(self, x):
        return self.recon(self.sample(x))
