"""Exact spatial tiling of LeanVAE's encode and decode, in memory bounded by the tile and chunk size.

    model.enable_tiling(tile_sample_min_height=128, tile_sample_min_width=128)
    z = model.encode(x)        # x: (B, 3, T, H, W): tiles of at most 128x128 pixels, each with its halo
    x_rec = model.decode(z)    # z: (B, d, T', H/8, W/8): tiles of at most 16x16 latent tokens, each with its halo
    model.disable_tiling()

Why it is exact. Every layer of the model is spatially local: the Haar patch transform and the 4x4 patch
projections work inside one 8x8-pixel token, LayerNorm, the feed-forward and the ISTA bottleneck's GEMMs
and soft threshold per token, and each causal depthwise 3x3x3 conv (PEG3D) reads one token row and column
on each side, with zeros beyond the frame. So an output token depends only on the input tokens within
the network's receptive field: a tile computed from its input plus a halo as wide as that field equals
the untiled result on the tile (at a frame border the tile's input ends where the frame does, so it sees
the same zero padding). Tiles are cut on token boundaries and do not overlap; each output token is
computed once, by exactly one tile. Nothing is blended.

The receptive field is measured on the network, not counted by hand (`receptive_field`): a probe puts NaN
in one input token (every frame and channel) of an otherwise zero input and runs the model's own encode /
decode; NaN survives every arithmetic op (0 * NaN is NaN, so zero weights cannot hide a dependency, and
torch's relu and the fused kernels keep NaN), so the output tokens that come out NaN are exactly those
that depend on that input token. The probe runs along H and W separately on a strip one token wide and
grows until the NaN region no longer touches the strip's ends; a layer that mixes the whole frame would
never stop touching them, and is reported. The result is cached per model structure (module types and
parameter shapes), so the probe runs once per config in a process.

Temporal chunking. A tiled call on a video longer than one chunk runs each tile through the model's own
temporal chunking (`set_tile_inference(True)`, chunks of `chunksize_enc` frames / `chunksize_dec` latent
frames, with the causal cache), so the activations alive at once are those of one tile's chunk plus the
causal caches (two frames of every conv's input, over the tile and its halo): peak memory is set by the
tile and chunk size (plus the output itself), not by the clip's length or frame size. A clip of one chunk
runs each tile unchunked (the same arithmetic, without the caches), and each tile's caches are dropped
before the next tile runs. The model's temporal-tiling switch is restored afterwards (an image switches it
off, as the untiled call does).

Layers in slices. Inside a tile (inference only) the feed-forwards run on slices of tokens
(`NAF.token_slice`, sized so that one slice's hidden activation stays under FEED_FORWARD_SLICE_BYTES) and the
depthwise convs on slices of channels (`PEG3D.channel_slice`): neither needs a halo for that, and otherwise
the feed-forward's hidden activation (2730 values a token at the published width, 5.3x the model's 512) and
torch's CPU conv working memory (about twice its output) would be the tile's largest tensors. The decoder
runs on the tile plus its own reach only (the bottleneck's output is cropped to it, `ReceptiveField.decoder`)
and the per-token unpatch and inverse Haar transform on the tile's own tokens. A tile then holds a few
tensors of the model's width over its tokens, so its peak follows the tile size; an untiled call runs every
layer over the whole clip, as published.

Numerics. Tiled and untiled outputs are not always equal bit for bit: a GEMM's rounding depends on how
many rows (tokens) it is called with (BLAS picks its blocking and vector paths from the shape), and the
tile and the chunk change that count, as the published model's own chunked vs unchunked outputs differ
(about 1e-7 relative). The differences are float32 rounding in the accumulations, not a loss of context:
the bound stated and tested is max|tiled - untiled| <= 1e-6 * max|untiled| in float32.
"""
import contextlib

import torch

from .modules import NAF, PEG3D

__all__ = ["ReceptiveField", "receptive_field", "check_tile_size", "tiled_encode", "tiled_decode", "tile_spans",
           "sliced_layers", "bottleneck_output_tokens", "decoder_output_tokens"]

# The probe's strip grows 33 -> 67 -> 135 tokens; a reach beyond this is treated as not local.
_PROBE_START = 33
_PROBE_MAX = 135
_PROBE_LATENT_FRAMES = 3  # an image frame and two video frames: both patch paths and the causal conv's taps
_CACHE = {}


class ReceptiveField(tuple):
    """(scale, encode, decode, decoder), measured on a model by `receptive_field`.

    scale:  pixels per latent token along H and W (8 for LeanVAE).
    encode, decode: ((before_h, after_h), (before_w, after_w)) in tokens: output token i along an axis
            depends on input tokens i - before .. i + after (pixel tokens of `scale` pixels for encode,
            latent tokens for decode).
    decoder: the same for the part of decode after the bottleneck (the decoder and the inverse patch
            transform, from the bottleneck's output tokens); None: not measured, the tiled decode then uses
            the whole decode's reach there (keeps all of the tile's bottleneck output).
    """

    __slots__ = ()

    def __new__(cls, scale, encode, decode, decoder=None):
        return super().__new__(cls, (scale, encode, decode, decoder))

    scale = property(lambda self: self[0])
    encode = property(lambda self: self[1])
    decode = property(lambda self: self[2])
    decoder = property(lambda self: self[3])

    def __repr__(self):
        return f"ReceptiveField(scale={self.scale}, encode={self.encode}, decode={self.decode}, decoder={self.decoder})"


def _signature(model):
    """The model's structure: module types by name and parameter shapes (what the receptive field depends
    on; a fused switch changes how a module computes, not what it reads)."""
    return (
        type(model).__module__, type(model).__qualname__,
        tuple((n, type(m).__module__, type(m).__qualname__) for n, m in model.named_modules()),
        tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
    )


@contextlib.contextmanager
def untiled_calls(model, temporal=None):
    """While active, `model.encode` / `model.decode` take the untiled path (the tiles' own calls).
    temporal: True/False sets the model's temporal chunking for the duration; None leaves it. The model's
    chunking switches are restored afterwards."""
    saved = [(m, m.tile_inference) for m in model.modules() if hasattr(m, "tile_inference")]
    model._tiling_inner = True
    if temporal is not None:
        model.set_tile_inference(temporal)
    try:
        yield
    finally:
        del model._tiling_inner
        for m, v in saved:
            m.tile_inference = v


#: Without autograd, a tile's feed-forwards run on slices of tokens whose hidden activation (LayerNorm ->
#: Linear(D, 2I), the widest tensor of the model at 2I = 2730 values a token for D = 512) stays under this,
#: and its depthwise convs on this many channels at a time.
FEED_FORWARD_SLICE_BYTES = 16 << 20
CONV_CHANNEL_SLICE = 64


@contextlib.contextmanager
def _wrapped(obj, name, wrap):
    """While active, `obj.<name>` is wrap(what it was); afterwards exactly what it was (an attribute of the
    instance itself, e.g. one the fused switch set, is put back; otherwise the instance's is removed)."""
    own = name in vars(obj)
    before = vars(obj).get(name)
    setattr(obj, name, wrap(getattr(obj, name)))
    try:
        yield
    finally:
        if own:
            setattr(obj, name, before)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def sliced_layers(model):
    """While active (inference only), the model's NAF/ResNAF feed-forwards run `FEED_FORWARD_SLICE_BYTES` of
    hidden activation at a time (`NAF.token_slice`) and its PEG3D convs `CONV_CHANNEL_SLICE` channels at a
    time (`PEG3D.channel_slice`): the same per-token and per-channel arithmetic, in memory set by the tile's
    tokens at the model's width. Restores each module's own setting afterwards."""
    with contextlib.ExitStack() as stack:
        for m in model.modules():
            if isinstance(m, NAF) and len(m.ffd_layer):
                hidden = m.ffd_layer[0][1]
                n = max(1, FEED_FORWARD_SLICE_BYTES // (hidden.out_features * hidden.weight.element_size()))
                stack.enter_context(_wrapped(m, "token_slice", lambda _, n=n: n))
            elif isinstance(m, PEG3D):
                stack.enter_context(_wrapped(m, "channel_slice", lambda _: CONV_CHANNEL_SLICE))
        yield


def _param(model):
    return model.latent_bottleneck.phi


def _nan_tokens(out, axis, unit, n):
    """Which of the n tokens (of `unit` pixels) along `axis` of `out` hold a NaN anywhere."""
    mask = out.isnan().movedim(axis, -1).reshape(-1, out.shape[axis]).any(0)
    return mask.view(n, unit).any(1)


def _probe(model, run, make_input, axis, what):
    """(before, after) along `axis` (-2: H, -1: W) for one direction: see the module doc."""
    n = _PROBE_START
    while n <= _PROBE_MAX:
        center = n // 2
        x, unit = make_input(n, axis, center)
        with torch.no_grad():
            out = run(x)
        hit = _nan_tokens(out, axis, unit, n).nonzero().flatten().tolist()
        if not hit:
            raise RuntimeError(f"receptive_field: the {what} probe's NaN reached no output; "
                               "an op maps NaN to a number, so the field cannot be measured this way")
        if hit[0] > 0 and hit[-1] < n - 1:
            return hit[-1] - center, center - hit[0]
        n = 2 * n + 1
    name = "H" if axis == -2 else "W"
    raise ValueError(f"receptive_field: {what} is not spatially local along {name}: an output depends on inputs "
                     f"more than {_PROBE_MAX // 2} tokens away (a layer mixes the whole frame), so exact tiling "
                     "is impossible")


def _measure(model):
    p = _param(model)
    dev, dtype = p.device, p.dtype
    d = p.shape[0]
    c_in = model.encoder.in_channel
    t_lat = _PROBE_LATENT_FRAMES
    with untiled_calls(model, temporal=False), torch.no_grad():
        one = model.decode(torch.zeros(1, d, t_lat, 1, 1, device=dev, dtype=dtype))
        t_pix, sh, sw = one.shape[2], one.shape[-2], one.shape[-1]
        if sh != sw or sh < 1:
            raise RuntimeError(f"receptive_field: one latent token decodes to {sh}x{sw} pixels; expected a square")
        s = sh

        def latent(n, axis, center):
            shape = [1, d, t_lat, 1, 1]
            shape[axis] = n
            z = torch.zeros(shape, device=dev, dtype=dtype)
            z.narrow(axis, center, 1).fill_(float("nan"))
            return z, s

        def pixels(n, axis, center):
            shape = [1, c_in, t_pix, s, s]
            shape[axis] = n * s
            x = torch.zeros(shape, device=dev, dtype=dtype)
            x.narrow(axis, center * s, s).fill_(float("nan"))
            return x, 1

        def features(n, axis, center):  # the bottleneck's output tokens, channels first as the latent
            shape = [1, width, t_lat, 1, 1]
            shape[axis] = n
            p = torch.zeros(shape, device=dev, dtype=dtype)
            p.narrow(axis, center, 1).fill_(float("nan"))
            return p, s

        def decoder(p):
            return model.idwt(x=model.decoder.decode(p.permute(0, 2, 3, 4, 1)))

        width = model.latent_bottleneck.phi.shape[1]
        dec = tuple(_probe(model, model.decode, latent, axis, "decode") for axis in (-2, -1))
        enc = tuple(_probe(model, model.encode, pixels, axis, "encode") for axis in (-2, -1))
        after = tuple(_probe(model, decoder, features, axis, "decoder") for axis in (-2, -1))
    return ReceptiveField(s, enc, dec, after)


def receptive_field(model, refresh=False):
    """The model's `ReceptiveField` (pixels per token; encode and decode reach in tokens), measured by the
    NaN probe described in the module doc, once per model structure (cached; `refresh=True` re-measures)."""
    key = _signature(model)
    if refresh or key not in _CACHE:
        _CACHE[key] = _measure(model)
    return _CACHE[key]


def check_tile_size(name, value, scale, where="LeanVAE.enable_tiling"):
    """`value` as an int tile size in pixels: a positive multiple of `scale` (one latent token)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int number of pixels (a multiple of {scale}), "
                        f"got {type(value).__name__}")
    if value < scale or value % scale:
        raise ValueError(f"{where}: {name} must be a multiple of {scale} pixels (one latent token); the smallest "
                         f"allowed is {scale}, got {value}")
    return value


def tile_spans(n, tile):
    """[(start, end)]: n tokens cut into ceil(n / tile) tiles as even as possible, each at most `tile`."""
    k = -(-n // tile)
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def _drop_caches(model):
    """Forget the temporal chunking's causal caches (the last tile's, of no use to any other tile): a tile's
    caches are freed before the next tile allocates its own. A later non-first chunk then fails loudly."""
    for m in model.modules():
        if getattr(m, "causal_cached", None) is not None:
            m.causal_cached = None
        if getattr(m, "fused_causal_cache", None) is not None:
            m.fused_causal_cache = None


def _tiled(model, call, x, tile_tokens, reach, in_unit, out_unit):
    """Run `call` on each tile of x (plus its halo, clipped to the frame) and stitch the tiles' own regions.

    x: (..., nh * in_unit, nw * in_unit); tile_tokens: (th, tw); reach: ((before_h, after_h), (before_w, after_w))
    in tokens; call(x_tile, rows, cols) returns the output of the tile's own tokens, rows and cols being
    their slices within the tile's input (in tokens); the output is (..., nh * out_unit, nw * out_unit).
    """
    nh, nw = x.shape[-2] // in_unit, x.shape[-1] // in_unit
    spans = []
    for n, tile, (before, after) in zip((nh, nw), tile_tokens, reach):
        spans.append([(a, b, max(0, a - before), min(n, b + after)) for a, b in tile_spans(n, tile)])
    out = None
    for a, b, a0, b0 in spans[0]:
        for c, e, c0, e0 in spans[1]:
            y = call(x[..., a0 * in_unit:b0 * in_unit, c0 * in_unit:e0 * in_unit], slice(a - a0, b - a0),
                     slice(c - c0, e - c0))
            _drop_caches(model)
            if out is None:
                out = y.new_empty(y.shape[:-2] + (nh * out_unit, nw * out_unit))
            out[..., a * out_unit:b * out_unit, c * out_unit:e * out_unit] = y
            del y
    return out


def _crop_tokens(rows, cols):
    """A wrapper of a function returning channels-last tokens (B, T, H, W, D): only rows x cols of them, as a
    tensor of their own (so the uncropped one is freed)."""
    def wrap(fn):
        def cropped(*args, **kwargs):
            return fn(*args, **kwargs)[:, :, rows, cols].contiguous()
        return cropped
    return wrap


@contextlib.contextmanager
def bottleneck_output_tokens(model, rows, cols):
    """While active, the bottleneck's `recon` returns only `rows` x `cols` of its output tokens (slices along
    H and W, in latent tokens): the tiled decode keeps those within the decoder's own reach of the tile, so
    the decoder (6 of the published decode's 14 tokens of reach) runs on the tile plus its own halo only."""
    with _wrapped(model.latent_bottleneck, "recon", _crop_tokens(rows, cols)):
        yield


@contextlib.contextmanager
def decoder_output_tokens(model, rows, cols):
    """While active, the decoder crops its token features to `rows` x `cols` (slices along H and W, in latent
    tokens) before the per-token layers that follow them: the linear unpatch (one token -> its 8x8-pixel
    patch of wavelet bands) and the Haar synthesis (each band sample -> its own 2x2 pixels, no overlap). So
    the output holds just those tokens' pixels, equal to that crop of the uncropped output, without
    computing the halo's pixels (at 128-pixel tiles with the published 14-token decode halo, 7.6x as many)."""
    def wrap(features):
        def cropped(x):
            low, high = features(x)
            return low[:, :, rows, cols], high[:, :, rows, cols]
        return cropped

    with _wrapped(model.decoder, "_feature_transform", wrap):
        yield


def _single_tile(n_tokens, tile_tokens):
    return all(n <= t for n, t in zip(n_tokens, tile_tokens))


def tiled_encode(model, x, tile_size):
    """`model.encode(x)` computed tile by tile. x: (B, 3, T, H, W) or (B, 3, H, W), already validated;
    tile_size: (height, width) in pixels, multiples of the model's token size."""
    rf = receptive_field(model)
    s = rf.scale
    tiles = (tile_size[0] // s, tile_size[1] // s)
    image = x.ndim == 4
    # A clip of one chunk runs unchunked: the same arithmetic, without the causal caches' memory.
    with untiled_calls(model, temporal=not image and x.shape[2] > model.chunksize_enc), sliced_layers(model):
        if _single_tile((x.shape[-2] // s, x.shape[-1] // s), tiles):
            z = model.encode(x)
            _drop_caches(model)
        else:
            z = _tiled(model, lambda xt, rows, cols: model.encode(xt)[..., rows, cols], x, tiles, rf.encode, s, 1)
    if image:
        model.set_tile_inference(False)  # as the untiled call on an image leaves it
    return z


def tiled_decode(model, z, tile_size, is_image=False):
    """`model.decode(z, is_image)` computed tile by tile. z: (B, d, T', h, w), already validated;
    tile_size: (height, width) in pixels, multiples of the model's token size."""
    rf = receptive_field(model)
    s = rf.scale
    tiles = (tile_size[0] // s, tile_size[1] // s)

    def call(zt, rows, cols):
        # keep the bottleneck's output tokens within the decoder's reach of the tile's own ones (without a
        # measured decoder reach, the whole decode's: all of the tile's), then the decoder's output tokens
        # that are the tile's own
        reach = rf.decoder if rf.decoder is not None else rf.decode
        keep = [slice(max(0, own.start - before), min(n, own.stop + after))
                for own, n, (before, after) in zip((rows, cols), zt.shape[-2:], reach)]
        own = [slice(o.start - k.start, o.stop - k.start) for o, k in zip((rows, cols), keep)]
        with bottleneck_output_tokens(model, *keep), decoder_output_tokens(model, *own):
            return model.decode(zt, is_image=is_image)

    with untiled_calls(model, temporal=not is_image and z.shape[2] > model.chunksize_dec), sliced_layers(model):
        if _single_tile(z.shape[-2:], tiles):
            x = model.decode(z, is_image=is_image)
            _drop_caches(model)
        else:
            x = _tiled(model, call, z, tiles, rf.decode, 1, s)
    if is_image:
        model.set_tile_inference(False)
    return x
