"""The ERNIE-Image single-stream DiT in Flax NNX.

Mirrors diffusers `ErnieImageTransformer2DModel` (transformer_ernie_image.py): image tokens then
text tokens in one sequence, 3-axis RoPE, one AdaLN modulation shared by all blocks, fp32
modulation and gating islands. The blocks are stacked on a leading `layers` axis and run with
`jax.lax.scan` under `jax.checkpoint`; `scan_layers=False` runs the same parameters unrolled.

Shapes: B batch, C latent channels, H/W latent height/width, T padded text length, D hidden size,
N image tokens ((H/p)*(W/p)), S = N + T.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ernie_jax.models import layers
from ernie_jax.models.compiled import compiled_method
from ernie_jax.models.config import JsonConfig


@dataclasses.dataclass(frozen=True)
class ErnieImageConfig(JsonConfig):
    """The transformer's `config.json`; field names and defaults are those of the released 8B model."""

    KIND = "transformer"

    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_layers: int = 36
    ffn_hidden_size: int = 12288
    in_channels: int = 128
    out_channels: int = 128
    patch_size: int = 1
    text_in_dim: int = 3072
    rope_theta: float = 256
    rope_axes_dim: tuple[int, int, int] = (32, 48, 48)
    eps: float = 1e-6
    qk_layernorm: bool = True

    def __post_init__(self):
        object.__setattr__(self, "rope_axes_dim", tuple(int(a) for a in self.rope_axes_dim))
        checks = {
            "hidden_size must be divisible by num_attention_heads": self.hidden_size % self.num_attention_heads == 0,
            "rope_axes_dim must have 3 even, non-negative entries": len(self.rope_axes_dim) == 3
            and all(a % 2 == 0 and a >= 0 for a in self.rope_axes_dim),
            # RoPE turns the first sum(rope_axes_dim) channels of each head and passes the rest through.
            "sum(rope_axes_dim) must be at most the head dim (hidden_size / num_attention_heads)":
                sum(self.rope_axes_dim) <= self.head_dim,
            "patch_size must be positive": self.patch_size > 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(f"bad transformer config: {message} (got {self})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_text_proj(self) -> bool:
        return self.text_in_dim != self.hidden_size


# Logical axes of the residual stream [B, S, D] at block boundaries.
ACTIVATION_AXES = ("batch", "length", "act_embed")

PRESETS = {
    # The released ERNIE-Image / ERNIE-Image-Turbo transformer (8,033,490,048 parameters).
    "full": ErnieImageConfig(),
    # Test-sized, with the real head dim, RoPE axes and latent channels (2.05M parameters).
    "tiny": ErnieImageConfig(hidden_size=256, num_attention_heads=2, num_layers=2, ffn_hidden_size=512,
                             text_in_dim=64),
    # Benchmark-sized: real head dim, 8 layers of width 1024 (120.1M parameters).
    "small": ErnieImageConfig(hidden_size=1024, num_attention_heads=8, num_layers=8, ffn_hidden_size=3072,
                              text_in_dim=256),
}


class TimestepEmbedding(nnx.Module):
    """diffusers `TimestepEmbedding`: linear_2(SiLU(linear_1(x))), `[B, D] -> [B, D]`."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = layers.linear(dim, dim, axes=("embed", "mlp"), **kw)
        self.linear_2 = layers.linear(dim, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class SelfAttention(nnx.Module):
    """Multi-head self-attention with per-head RMS q/k norms and ERNIE RoPE, `[B, S, D] -> [B, S, D]`."""

    def __init__(self, config: ErnieImageConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.attention_impl = attention_impl
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = layers.linear(d, d, axes=("embed", "heads"), **kw)
        self.to_k = layers.linear(d, d, axes=("embed", "heads"), **kw)
        self.to_v = layers.linear(d, d, axes=("embed", "heads"), **kw)
        self.to_out = layers.linear(d, d, axes=("heads", "embed"), **kw)
        if config.qk_layernorm:
            # torch.nn.RMSNorm: the weight multiply is fp32, rounded once.
            norm = lambda: layers.RMSNorm(hd, eps=config.eps, round_before_scale=False, axis_name="head_dim",
                                          dtype=dtype, param_dtype=param_dtype)
            self.norm_q, self.norm_k = norm(), norm()
        else:
            self.norm_q = self.norm_k = None

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], key_lengths: jax.Array) -> jax.Array:
        """x `[B, S, D]`; rope (cos, sin) `[B, S, sum(rope_axes_dim)]` in x's dtype; key_lengths `[B]`."""
        b, s, _ = x.shape
        heads = lambda t: t.reshape(b, s, self.num_heads, -1)
        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k = layers.apply_rope(q, *rope), layers.apply_rope(k, *rope)
        out = layers.attention(q, k, v, key_lengths, self.attention_impl)
        return self.to_out(out.reshape(b, s, -1))


class FeedForward(nnx.Module):
    """linear_fc2(up_proj(x) * GELU_erf(gate_proj(x))), `[B, S, D] -> [B, S, D]`, no biases."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = layers.linear(hidden_size, ffn_hidden_size, axes=("embed", "mlp"), **kw)
        self.up_proj = layers.linear(hidden_size, ffn_hidden_size, axes=("embed", "mlp"), **kw)
        self.linear_fc2 = layers.linear(ffn_hidden_size, hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        # torch's F.gelu default is the exact erf form; jax.nn.gelu defaults to the tanh approximation.
        return self.linear_fc2(self.up_proj(x) * jax.nn.gelu(self.gate_proj(x), approximate=False))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """`x * (1 + scale) + shift` in fp32, rounded back to x's dtype (the reference's fp32 island)."""
    out = x.astype(jnp.float32) * (1 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
    return out.astype(x.dtype)


def gated_residual(residual: jax.Array, gate: jax.Array, update: jax.Array) -> jax.Array:
    """`residual + gate * update`: the product in fp32, the add in the residual's dtype."""
    return residual + (gate.astype(jnp.float32) * update.astype(jnp.float32)).astype(residual.dtype)


class Block(nnx.Module):
    """`ErnieImageSharedAdaLNBlock`: modulated attention then modulated MLP, `[B, S, D] -> [B, S, D]`.

    `modulation` holds the six shared `[B, 1, D]` vectors in the order
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
    """

    def __init__(self, config: ErnieImageConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        norm = lambda: layers.RMSNorm(config.hidden_size, eps=config.eps, round_before_scale=True,
                                      axis_name="norm", dtype=dtype, param_dtype=param_dtype)
        self.adaLN_sa_ln = norm()
        self.self_attention = SelfAttention(config, attention_impl=attention_impl, dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs)
        self.adaLN_mlp_ln = norm()
        self.mlp = FeedForward(config.hidden_size, config.ffn_hidden_size, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)

    def __call__(self, x, modulation, rope, key_lengths):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        attention_name, mlp_name = layers.BLOCK_BRANCH_OUTPUTS  # what the "block_outputs" remat policies keep
        h = modulate(self.adaLN_sa_ln(x), shift_msa, scale_msa)
        x = gated_residual(x, gate_msa, checkpoint_name(self.self_attention(h, rope, key_lengths), attention_name))
        h = modulate(self.adaLN_mlp_ln(x), shift_mlp, scale_mlp)
        return gated_residual(x, gate_mlp, checkpoint_name(self.mlp(h), mlp_name))


class FinalNorm(nnx.Module):
    """`ErnieImageAdaLNContinuous`: LayerNorm(x) * (1 + scale) + shift with (scale, shift) = linear(c).

    Takes c without SiLU, splits scale first, and stays in the compute dtype (no fp32 island).
    """

    def __init__(self, hidden_size: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.linear = layers.linear(hidden_size, 2 * hidden_size, axes=("embed", "mlp"), use_bias=True,
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, conditioning: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.linear(conditioning)[:, None, :], 2, axis=-1)
        return layers.layer_norm(x, self.eps) * (1 + scale) + shift


def position_ids(text_lens: jax.Array, grid_h: int, grid_w: int, text_len_padded: int) -> jax.Array:
    """`[B, N + T, 3]` fp32 ids: image token (y, x) -> [text_len_b, y, x], text token j -> [j, 0, 0]."""
    batch = text_lens.shape[0]
    y, x = jnp.meshgrid(jnp.arange(grid_h, dtype=jnp.float32), jnp.arange(grid_w, dtype=jnp.float32),
                        indexing="ij")
    grid = jnp.stack([y.reshape(-1), x.reshape(-1)], axis=-1)
    image_ids = jnp.concatenate([
        jnp.broadcast_to(text_lens.astype(jnp.float32)[:, None, None], (batch, grid_h * grid_w, 1)),
        jnp.broadcast_to(grid[None], (batch, grid_h * grid_w, 2)),
    ], axis=-1)
    text_ids = jnp.zeros((batch, text_len_padded, 3), jnp.float32)
    text_ids = text_ids.at[:, :, 0].set(jnp.arange(text_len_padded, dtype=jnp.float32)[None])
    return jnp.concatenate([image_ids, text_ids], axis=1)


class ErnieImageTransformer(nnx.Module):
    """ERNIE-Image DiT: `(hidden_states [B, C, H, W], timestep [B], text_bth [B, T, text_in_dim], text_lens [B])
    -> velocity [B, out_channels, H, W]`, with diffusers' layouts and meanings.

    `timestep` is on the 0..1000 scale (sigma * 1000). `text_bth` is zero-padded to T; `text_lens` holds
    the true lengths. `dtype` is the compute dtype and `param_dtype` the storage dtype. `attention_impl` is
    one of `layers.ATTENTION_IMPLEMENTATIONS`: "xla", "cudnn" (GPU) or "splash" (TPU; on CPU it runs in
    Pallas interpret mode automatically, for tests).

    A plain call (outside any transformation) compiles once per input shape and dtype and reuses the program
    (`compiled.compiled_method`); inside jax.jit, grad, vmap or nnx transforms it traces the math itself.
    """

    def __init__(
        self,
        config: ErnieImageConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: str = "xla",
        remat: str = "none",
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        layers.check_build_settings(remat, attention_impl)
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers
        d = config.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.x_embedder = layers.PatchEmbed(config.in_channels, d, config.patch_size, use_bias=True, **kw)
        self.text_proj = (layers.linear(config.text_in_dim, d, axes=("embed_in", "embed"), use_bias=False, **kw)
                          if config.has_text_proj else None)
        self.time_embedding = TimestepEmbedding(d, **kw)
        self.adaLN_modulation = layers.linear(d, 6 * d, axes=("embed", "mlp"), use_bias=True, **kw)

        self.layers = layers.create_stacked(
            lambda block_rngs: Block(config, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype,
                                     rngs=block_rngs), config.num_layers, rngs)
        self.final_norm = FinalNorm(d, config.eps, **kw)
        out_features = config.patch_size * config.patch_size * config.out_channels
        self.final_linear = layers.linear(d, out_features, axes=("embed", "conv_out"), use_bias=True, **kw)

    @compiled_method
    def __call__(self, hidden_states, timestep, text_bth, text_lens) -> jax.Array:
        """The velocity `[B, C, H, W]` of `hidden_states [B, C, H, W]` at `timestep [B]` (0..1000) given
        `text_bth [B, T, D_text]` with `text_lens [B]` valid tokens."""
        return self.velocity_and_features(hidden_states, timestep, text_bth, text_lens)[0]

    def velocity_and_features(self, hidden_states, timestep, text_bth, text_lens) -> tuple[jax.Array, jax.Array]:
        """`__call__`'s velocity and the last block's image-token hidden states `[B, N, D]` (N = H W / p^2, before
        the final norm): the features a diffusion-GAN head reads (DMD2)."""
        cfg = self.config
        hidden_states = jnp.asarray(hidden_states)
        b, c, h, w = hidden_states.shape
        p = cfg.patch_size
        if c != cfg.in_channels or h % p or w % p:
            raise ValueError(f"hidden_states {hidden_states.shape} does not fit in_channels={cfg.in_channels}, "
                             f"patch_size={p}")
        text_bth = jnp.asarray(text_bth).astype(self.dtype)
        text_lens = jnp.asarray(text_lens)
        timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))
        if text_bth.ndim != 3 or text_bth.shape[0] != b or text_bth.shape[2] != cfg.text_in_dim:
            raise ValueError(f"text_bth {text_bth.shape} must be [{b}, T, {cfg.text_in_dim}]")
        grid_h, grid_w = h // p, w // p
        num_image = grid_h * grid_w
        text_len_padded = text_bth.shape[1]

        image_tokens = self.x_embedder(hidden_states)
        text_tokens = self.text_proj(text_bth) if self.text_proj is not None else text_bth
        x = jnp.concatenate([image_tokens, text_tokens], axis=1)
        angles = layers.axes_rope_angles(position_ids(text_lens, grid_h, grid_w, text_len_padded),
                                         cfg.rope_axes_dim, cfg.rope_theta)
        # cos/sin in fp32, rounded to the activation dtype once for all blocks.
        rope = (jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype))
        key_lengths = num_image + text_lens.astype(jnp.int32)

        conditioning = self.time_embedding(layers.timestep_sinusoid(timestep, cfg.hidden_size).astype(self.dtype))
        modulation = jnp.split(self.adaLN_modulation(jax.nn.silu(conditioning))[:, None, :], 6, axis=-1)
        x = self._run_blocks(x, tuple(modulation), rope, key_lengths)

        features = x[:, :num_image]
        x = self.final_norm(x, conditioning).astype(x.dtype)
        patches = self.final_linear(x[:, :num_image])
        out = patches.reshape(b, grid_h, grid_w, p, p, cfg.out_channels)
        return out.transpose(0, 5, 1, 3, 2, 4).reshape(b, cfg.out_channels, h, w), features

    def _run_blocks(self, x, modulation, rope, key_lengths):
        def step(block, carry, _):
            return layers.constrain(block(carry, modulation, rope, key_lengths), ACTIVATION_AXES), None

        x, _ = layers.run_stacked(self.layers, step, layers.constrain(x, ACTIVATION_AXES), remat=self.remat,
                                  scan=self.scan_layers)
        return x


def init_transformer(config: ErnieImageConfig, *, seed: int = 0, **kwargs) -> ErnieImageTransformer:
    """A randomly initialised transformer (torch-like uniform init for every weight, norms at 1)."""
    return ErnieImageTransformer(config, rngs=nnx.Rngs(seed), **kwargs)


def abstract_transformer(config: ErnieImageConfig, **kwargs) -> ErnieImageTransformer:
    """The transformer with `jax.ShapeDtypeStruct` leaves: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: ErnieImageTransformer(config, rngs=nnx.Rngs(0), **kwargs))
