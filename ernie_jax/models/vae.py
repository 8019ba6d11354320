"""The FLUX.2 VAE (diffusers `AutoencoderKLFlux2`) in Flax NNX, plus the latent packing shared by
sampling and training.

Mirrors `autoencoder_kl_flux2.py` with diffusers' `Encoder`/`Decoder` (vae.py), `UNetMidBlock2D`,
`DownEncoderBlock2D`/`UpDecoderBlock2D` (unet_2d_blocks.py), `ResnetBlock2D` (resnet.py),
`Downsample2D`/`Upsample2D` and the `Attention` mid-block (`AttnProcessor2_0`). Modules run channels-last
(`[B, H, W, C]`, HWIO conv kernels); the public methods take and return diffusers' `[B, C, H, W]`.

Shapes: B batch, H/W image height/width, L latent channels (32), h/w latent height/width (H/8, W/8).
ERNIE-Image's DiT sees *packed* latents `[B, 4L, h/2, w/2]`: 2x2-patchified and normalised with the
VAE's BatchNorm running statistics (`patchify_latents`, `normalize_latents`, and their inverses).

Memory of a 1024x1024 decode, B=1, measured on CPU with `jax.jit(...).lower(abstract args).compile()
.memory_analysis()` (temporaries, excluding the 0.1 GB of bf16 weights): 3.2 GB in bf16, 3.8 GB in fp32.
The peak is the mid-block's single-head attention over 128*128 = 16384 tokens (2.2 GB alone: fp32 logits
and softmax of [16384, 16384]); the largest convolution activations are 0.5 GB each ([1024, 1024, 256]
bf16 after the last upsample) and 0.27 GB at 128 channels. Memory grows linearly with the batch, so
`decode(z, tile_size=64)` decodes overlapping 64x64-latent tiles (9 at 1024^2) one after the other: 1.0 GB
in bf16 (0.4 GB with tile_size=32). Tiles see no context past their borders and have their own GroupNorm
statistics, so the result differs slightly from the untiled decode, exactly as diffusers' `tiled_decode`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.models import layers
from ernie_jax.models.compiled import compiled_method
from ernie_jax.models.config import JsonConfig

DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"
# diffusers hard-codes these inside Encoder/Decoder, independent of the config.
RESNET_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
# The pipeline de-normalises with eps 1e-5, not the config's batch_norm_eps (1e-4 on the hub); a TODO in
# pipeline_ernie_image.py says 1e-5 is the trained value.
LATENT_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class VAEConfig(JsonConfig):
    """The VAE's `config.json`; field names are diffusers' `AutoencoderKLFlux2` arguments, defaults the
    released FLUX.2 VAE's.

    `force_upcast` is in the hub config but is not an `AutoencoderKLFlux2` argument: diffusers and the
    ERNIE pipeline ignore it (the VAE decodes in whatever dtype it was loaded in), and so does this port.
    `batch_norm_eps` and `batch_norm_momentum` describe the unused BatchNorm forward; see `LATENT_NORM_EPS`.
    """

    KIND = "VAE"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK_TYPE,) * 4
    up_block_types: tuple[str, ...] = (UP_BLOCK_TYPE,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 32
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 1024
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, int] = (2, 2)

    def __post_init__(self):
        as_tuple = lambda v: None if v is None else tuple(v) if isinstance(v, (list, tuple)) else v
        for name in ("down_block_types", "up_block_types", "block_out_channels", "decoder_block_out_channels",
                     "sample_size", "patch_size"):
            object.__setattr__(self, name, as_tuple(getattr(self, name)))
        channels = self.block_out_channels + self.decoder_channels
        checks = {
            f"down_block_types must be {len(self.block_out_channels)} x {DOWN_BLOCK_TYPE!r} (one per block)":
                self.down_block_types == (DOWN_BLOCK_TYPE,) * len(self.block_out_channels),
            f"up_block_types must be {len(self.decoder_channels)} x {UP_BLOCK_TYPE!r} (one per decoder block)":
                self.up_block_types == (UP_BLOCK_TYPE,) * len(self.decoder_channels),
            "act_fn must be 'silu' (or its alias 'swish')": self.act_fn in ("silu", "swish"),
            "channel counts and layers_per_block must be positive": min(
                (self.in_channels, self.out_channels, self.latent_channels, self.layers_per_block) + channels,
                default=0) > 0,
            "norm_num_groups must divide every block_out_channels entry": self.norm_num_groups > 0
                and all(c % self.norm_num_groups == 0 for c in channels),
            "patch_size must be two positive ints": isinstance(self.patch_size, tuple) and len(self.patch_size) == 2
                and all(isinstance(p, int) and p > 0 for p in self.patch_size),
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(f"bad VAE config: {message} (got {self})")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def packed_channels(self) -> int:
        """Channels of the packed latents the DiT sees, and the size of the BatchNorm statistics."""
        return math.prod(self.patch_size) * self.latent_channels

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for the released VAE): one x2 per block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)


VAE_PRESETS = {
    # The released FLUX.2 VAE (84,046,371 parameters, plus the two [128] BatchNorm statistics).
    "full": VAEConfig(),
    # Test-sized, with the real 32 latent channels and 2x2 patchify (reference section 7; 1.79M parameters).
    "tiny": VAEConfig(block_out_channels=(32, 64, 64, 64), sample_size=128),
}


SAME_3X3 = ((1, 1), (1, 1))


class ResnetBlock(nnx.Module):
    """`ResnetBlock2D` without time embedding, `[B, H, W, in] -> [B, H, W, out]`:
    conv2(SiLU(GN(conv1(SiLU(GN(x)))))) + skip, the skip a 1x1 `conv_shortcut` only when in != out."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.GroupNorm(in_channels, groups, RESNET_EPS, **kw)
        self.conv1 = layers.conv(in_channels, out_channels, 3, padding=SAME_3X3, rngs=rngs, **kw)
        self.norm2 = layers.GroupNorm(out_channels, groups, RESNET_EPS, **kw)
        self.conv2 = layers.conv(out_channels, out_channels, 3, padding=SAME_3X3, rngs=rngs, **kw)
        self.conv_shortcut = (layers.conv(in_channels, out_channels, 1, padding=((0, 0), (0, 0)), rngs=rngs, **kw)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(layers.silu_fp32(self.norm1(x)))
        h = self.conv2(layers.silu_fp32(self.norm2(h)))  # dropout is 0 in every released config
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nnx.Module):
    """`Downsample2D(padding=0)`: `[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]`.

    The reference pads one zero row/column at the bottom/right only (`F.pad(x, (0, 1, 0, 1))`), then runs a
    3x3 stride-2 conv without padding; the asymmetric padding is expressed in the conv itself.
    """

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = layers.conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """`Upsample2D(use_conv=True)`: nearest x2 (out[i] = in[i // 2]) then a 3x3 conv,
    `[B, H, W, C] -> [B, 2H, 2W, C]`."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = layers.conv(channels, channels, 3, padding=SAME_3X3, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class MidAttention(nnx.Module):
    """The mid-block `Attention`: one head of width C, `[B, H, W, C] -> [B, H, W, C]`.

    x + to_out(softmax(q k^T / sqrt(C)) v) with q, k, v = Linear(GN(x)) over the H*W positions.
    """

    def __init__(self, channels: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = layers.GroupNorm(channels, groups, RESNET_EPS, dtype=dtype, param_dtype=param_dtype)
        self.to_q = layers.linear(channels, channels, axes=("embed", "heads"), **kw)
        self.to_k = layers.linear(channels, channels, axes=("embed", "heads"), **kw)
        self.to_v = layers.linear(channels, channels, axes=("embed", "heads"), **kw)
        self.to_out = layers.linear(channels, channels, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        normed = self.group_norm(x)
        tokens = lambda t: t.reshape(b, h * w, 1, c)
        out = layers.attention(tokens(self.to_q(normed)), tokens(self.to_k(normed)), tokens(self.to_v(normed)),
                               None)
        return x + self.to_out(out.reshape(b, h, w, c))


class MidBlock(nnx.Module):
    """`UNetMidBlock2D`: resnet, optional attention, resnet at constant width, `[B, H, W, C] -> [B, H, W, C]`."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])
        self.attention = MidAttention(channels, groups, **kw) if add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class ResnetStage(nnx.Module):
    """`DownEncoderBlock2D` / `UpDecoderBlock2D`: `num_layers` resnets (the first goes in -> out), then an
    optional `resample` (Downsample or Upsample), `[B, H, W, in] -> [B, H', W', out]`."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, resample, *, dtype,
                 param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, **kw)
                                 for i in range(num_layers)])
        self.resample = resample(out_channels, **kw) if resample is not None else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nnx.Module):
    """diffusers `Encoder(double_z=True)`: `[B, H, W, in_channels] -> [B, H/8, W/8, 2L]` (mean, logvar)."""

    def __init__(self, config: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = layers.conv(config.in_channels, channels[0], 3, padding=SAME_3X3, **kw)
        self.down_blocks = nnx.List([
            ResnetStage(channels[max(i - 1, 0)], c, config.layers_per_block, groups,
                        Downsample if i < len(channels) - 1 else None, **kw)
            for i, c in enumerate(channels)])
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention, **kw)
        self.conv_norm_out = layers.GroupNorm(channels[-1], groups, RESNET_EPS, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = layers.conv(channels[-1], 2 * config.latent_channels, 3, padding=SAME_3X3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(layers.silu_fp32(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """diffusers `Decoder` (group norm): `[B, h, w, L] -> [B, 8h, 8w, out_channels]`, with
    layers_per_block + 1 resnets per up block."""

    def __init__(self, config: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        channels, groups = tuple(reversed(config.decoder_channels)), config.norm_num_groups
        self.conv_in = layers.conv(config.latent_channels, channels[0], 3, padding=SAME_3X3, **kw)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List([
            ResnetStage(channels[max(i - 1, 0)], c, config.layers_per_block + 1, groups,
                        Upsample if i < len(channels) - 1 else None, **kw)
            for i, c in enumerate(channels)])
        self.conv_norm_out = layers.GroupNorm(channels[-1], groups, RESNET_EPS, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = layers.conv(channels[-1], config.out_channels, 3, padding=SAME_3X3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(layers.silu_fp32(self.conv_norm_out(x)))


class LatentStats(nnx.Module):
    """The `bn` BatchNorm2d(affine=False) of the reference, whose forward is never run: only its running
    statistics (`[packed_channels]` each) are used, to (de)normalise packed latents. They are `BatchStat`s,
    so optimisers over `nnx.Param` leave them alone; they are stored in the parameter dtype because
    diffusers' `from_pretrained(torch_dtype=...)` casts buffers too."""

    def __init__(self, num_channels: int, *, param_dtype):
        stat = lambda init: nnx.BatchStat(init((num_channels,), param_dtype), out_sharding=("norm",),
                                          eager_sharding=False)
        self.running_mean = stat(jnp.zeros)
        self.running_var = stat(jnp.ones)


def to_channels_last(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def to_channels_first(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


class AutoencoderKLFlux2(nnx.Module):
    """The FLUX.2 VAE with diffusers' layouts: `encode(images [B, 3, H, W]) -> (mean, logvar) [B, L, H/8, W/8]`
    and `decode(z [B, L, h, w]) -> images [B, 3, 8h, 8w]` in about [-1, 1].

    `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters and BatchNorm statistics.
    Plain calls of `encode`, `decode` and `decode_tiled` compile once per input shape (and tile size) and reuse
    the program (`compiled.compiled_method`); inside a transformation they trace the math itself.
    """

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        moments, latents = 2 * config.latent_channels, config.latent_channels
        no_pad = ((0, 0), (0, 0))
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = layers.conv(moments, moments, 1, padding=no_pad, **kw) if config.use_quant_conv else None
        self.post_quant_conv = (layers.conv(latents, latents, 1, padding=no_pad, **kw)
                                if config.use_post_quant_conv else None)
        self.bn = LatentStats(config.packed_channels, param_dtype=param_dtype)

    def _check_channels(self, x, channels: int, name: str) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} {x.shape} must be [B, {channels}, H, W]")
        return x.astype(self.dtype)

    @compiled_method
    def encode(self, images) -> tuple[jax.Array, jax.Array]:
        """`images [B, in_channels, H, W]` in [-1, 1] -> `(mean, logvar)`, each `[B, L, ceil(H/8), ceil(W/8)]`.

        These are the parameters of diffusers' `DiagonalGaussianDistribution`: logvar is clamped to
        [-30, 20]; `mode()` is the mean and `sample()` is mean + exp(logvar / 2) * noise.
        """
        x = to_channels_last(self._check_channels(images, self.config.in_channels, "images"))
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(to_channels_first(moments), 2, axis=1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    @compiled_method(static_argnames=("tile_size",))
    def decode(self, z, tile_size: int | None = None) -> jax.Array:
        """`z [B, L, h, w] -> images [B, out_channels, 8h, 8w]` (post_quant_conv, decoder; no clamp).

        With `tile_size` (in latent pixels) and a latent larger than it, decodes overlapping tiles
        (`decode_tiled`); otherwise the whole latent at once.
        """
        z = self._check_channels(z, self.config.latent_channels, "z")
        if tile_size is not None and max(z.shape[2:]) > tile_size:
            return self.decode_tiled(z, tile_size)
        return self._decode(z)

    def _decode(self, z: jax.Array) -> jax.Array:
        x = to_channels_last(z)
        if self.post_quant_conv is not None:
            x = self.post_quant_conv(x)
        return to_channels_first(self.decoder(x))

    @compiled_method(static_argnames=("tile_size", "overlap"))
    def decode_tiled(self, z, tile_size: int, overlap: float = 0.25) -> jax.Array:
        """diffusers' `tiled_decode`: `z [B, L, h, w] -> images [B, out_channels, 8h, 8w]`, decoding
        `tile_size`-latent tiles that start every `int(tile_size * (1 - overlap))` latent pixels.

        Each tile's decoded top and left `int(8 * tile_size * overlap)` pixels are blended linearly with the
        already-blended tile above / to the left, then every tile is cropped to its first
        `8 * tile_size - blend` rows and columns. With `tile_size = sample_size / 8` this is the reference's
        `vae.tiled_decode` (same tiles, same blending order). Peak activation memory is that of one tile;
        the result differs from the untiled decode near tile borders (GroupNorm statistics are per tile).
        """
        z = self._check_channels(z, self.config.latent_channels, "z")
        if tile_size <= 0 or not 0 <= overlap < 1:
            raise ValueError(f"tile_size must be positive and overlap in [0, 1), got {tile_size}, {overlap}")
        sample_tile = tile_size * self.config.scale_factor
        stride = max(int(tile_size * (1 - overlap)), 1)
        blend = int(sample_tile * overlap)
        keep = sample_tile - blend
        rows = self._decode_tiles(z, tile_size, stride)
        for i, row in enumerate(rows):
            for j, tile in enumerate(row):
                if i > 0:
                    tile = blend_edge(rows[i - 1][j], tile, blend, axis=2)
                if j > 0:
                    tile = blend_edge(row[j - 1], tile, blend, axis=3)
                row[j] = tile  # later tiles blend with this blended tile, as the reference's in-place update does
        return jnp.concatenate([jnp.concatenate([t[:, :, :keep, :keep] for t in row], axis=3) for row in rows],
                               axis=2)

    def _decode_tiles(self, z: jax.Array, tile_size: int, stride: int) -> list[list[jax.Array]]:
        """The decoded tiles `[B, out_channels, 8*th, 8*tw]` as rows of a grid, the tile at (i, j) starting at
        latent (i*stride, j*stride). Tiles of one shape are decoded by one `lax.map`, so that XLA runs them
        one after the other and reuses one tile's activation memory (unrolled, it keeps them all alive)."""
        starts_y, starts_x = range(0, z.shape[2], stride), range(0, z.shape[3], stride)
        by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for y in starts_y:
            for x in starts_x:
                shape = (min(tile_size, z.shape[2] - y), min(tile_size, z.shape[3] - x))
                by_shape.setdefault(shape, []).append((y, x))
        decoded = {}
        for (th, tw), corners in by_shape.items():
            tiles = jnp.stack([z[:, :, y:y + th, x:x + tw] for y, x in corners])
            decoded.update(zip(corners, jax.lax.map(self._decode, tiles), strict=True))
        return [[decoded[y, x] for x in starts_x] for y in starts_y]


def blend_edge(before: jax.Array, tile: jax.Array, extent: int, axis: int) -> jax.Array:
    """diffusers' `blend_v`/`blend_h`: the first `extent` rows (axis 2) or columns (axis 3) of `tile` become
    `before[-extent + k] * (1 - k/extent) + tile[k] * (k/extent)`; `[B, C, H, W]` in and out.

    The weights and products are fp32, rounded once to the tile's dtype.
    """
    extent = min(before.shape[axis], tile.shape[axis], extent)
    if extent == 0:
        return tile
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    weight = jnp.asarray(np.arange(extent) / extent, jnp.float32).reshape(shape)
    head = jax.lax.slice_in_dim(tile, 0, extent, axis=axis).astype(jnp.float32)
    tail = jax.lax.slice_in_dim(before, before.shape[axis] - extent, before.shape[axis], axis=axis)
    blended = (tail.astype(jnp.float32) * (1 - weight) + head * weight).astype(tile.dtype)
    return jax.lax.dynamic_update_slice_in_dim(tile, blended, 0, axis=axis)


# ---- Latent packing, shared by sampling (decode direction) and training (encode direction). ----

def patchify_latents(z: jax.Array, patch_size: tuple[int, int] = (2, 2)) -> jax.Array:
    """`[B, C, 2h, 2w] -> [B, 4C, h, w]` (for 2x2): new channel `c*4 + 2*dy + dx` holds `z[c, 2i+dy, 2j+dx]`.

    The pipeline's `_patchify_latents`: view(b, c, h, 2, w, 2).permute(0, 1, 3, 5, 2, 4).
    """
    b, c, h, w = z.shape
    ph, pw = patch_size
    if h % ph or w % pw:
        raise ValueError(f"latents {z.shape} are not divisible into {ph}x{pw} patches")
    patches = z.reshape(b, c, h // ph, ph, w // pw, pw).transpose(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * ph * pw, h // ph, w // pw)


def unpatchify_latents(packed: jax.Array, patch_size: tuple[int, int] = (2, 2)) -> jax.Array:
    """The exact inverse of `patchify_latents`: `[B, 4C, h, w] -> [B, C, 2h, 2w]` (for 2x2)."""
    b, c, h, w = packed.shape
    ph, pw = patch_size
    if c % (ph * pw):
        raise ValueError(f"packed latents {packed.shape} have channels not divisible by {ph * pw}")
    patches = packed.reshape(b, c // (ph * pw), ph, pw, h, w).transpose(0, 1, 4, 2, 5, 3)
    return patches.reshape(b, c // (ph * pw), h * ph, w * pw)


def _latent_std_and_mean(packed, running_mean, running_var, eps):
    """`[1, C, 1, 1]` std and mean in the latents' dtype: sqrt(var + eps) is computed in the statistics'
    dtype and then cast, as the pipeline does (bf16 statistics in a bf16 pipeline)."""
    std = jnp.sqrt(running_var + jnp.asarray(eps, running_var.dtype)).astype(packed.dtype)
    return std.reshape(1, -1, 1, 1), running_mean.astype(packed.dtype).reshape(1, -1, 1, 1)


def normalize_latents(packed: jax.Array, running_mean: jax.Array, running_var: jax.Array,
                      eps: float = LATENT_NORM_EPS) -> jax.Array:
    """`[B, C, h, w]` packed VAE latents -> DiT latents `(x - mean) / sqrt(var + eps)`, in the latents' dtype.

    `running_mean`/`running_var` are `[C]`; eps 1e-5 matches the pipeline's hard-coded decode direction.
    """
    std, mean = _latent_std_and_mean(packed, running_mean, running_var, eps)
    return (packed - mean) / std


def denormalize_latents(packed: jax.Array, running_mean: jax.Array, running_var: jax.Array,
                        eps: float = LATENT_NORM_EPS) -> jax.Array:
    """The pipeline's post-loop `latents * sqrt(var + 1e-5) + mean`, `[B, C, h, w] -> [B, C, h, w]`,
    in the latents' dtype (two roundings in bf16, like torch)."""
    std, mean = _latent_std_and_mean(packed, running_mean, running_var, eps)
    return packed * std + mean


def decode_packed_latents(vae: AutoencoderKLFlux2, packed: jax.Array, tile_size: int | None = None) -> jax.Array:
    """DiT latents `[B, 4L, h, w]` -> images `[B, out_channels, 16h, 16w]` (for 2x2 patches and the 8x VAE):
    de-normalise, unpatchify, decode; exactly ErnieImagePipeline's code after the denoising loop."""
    packed = jnp.asarray(packed)
    z = denormalize_latents(packed, vae.bn.running_mean[...], vae.bn.running_var[...])
    return vae.decode(unpatchify_latents(z, vae.config.patch_size), tile_size=tile_size)


def encode_to_packed_latents(vae: AutoencoderKLFlux2, images) -> jax.Array:
    """Images `[B, in_channels, H, W]` -> DiT latents `[B, 4L, H/16, W/16]`: patchify the posterior mean
    (no sampling) and normalise with the BatchNorm statistics (the training direction)."""
    mean, _ = vae.encode(images)
    packed = patchify_latents(mean, vae.config.patch_size)
    return normalize_latents(packed, vae.bn.running_mean[...], vae.bn.running_var[...])


def init_vae(config: VAEConfig, *, seed: int = 0, **kwargs) -> AutoencoderKLFlux2:
    """A randomly initialised VAE (torch-like uniform init, norms at 1, statistics mean 0 / var 1)."""
    return AutoencoderKLFlux2(config, rngs=nnx.Rngs(seed), **kwargs)


def abstract_vae(config: VAEConfig, **kwargs) -> AutoencoderKLFlux2:
    """The VAE with `jax.ShapeDtypeStruct` leaves: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: AutoencoderKLFlux2(config, rngs=nnx.Rngs(0), **kwargs))
