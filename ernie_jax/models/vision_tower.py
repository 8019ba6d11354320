"""CLIP and SigLIP image towers (ViTs) in Flax NNX.

Mirrors transformers' `CLIPVisionModel(WithProjection)` and `SiglipVisionModel`. Both are pre-norm ViTs
(LayerNorm -> attention -> residual, LayerNorm -> MLP -> residual, biased projections) over patch tokens
with learned absolute positions; they differ at the ends:
- CLIP: a class token in front, a LayerNorm before the encoder (`pre_layrnorm`, transformers' spelling), no
  patch-embedding bias; the pooled output is post_layernorm(class token) and `image_embeds` its projection
  (`visual_projection`, no bias). `last_hidden_state` is the encoder output *before* post_layernorm.
- SigLIP: no class token, no pre-norm, a patch-embedding bias; `last_hidden_state` is post_layernorm(encoder
  output) and the pooled output comes from a multi-head attention-pooling head (one learned probe query).
The encoder layers are stacked on a leading `layers` axis and scanned, as the DiT's.

Shapes: B batch, C channels (3), H = W image size, p patch size, N = (H / p)^2 patches, S = N (+1 for CLIP's
class token), D hidden size, P projection size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.models import layers
from ernie_jax.models.compiled import compiled_method

FAMILIES = ("clip", "siglip")

# transformers' ACT2FN entries that these towers use.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # SigLIP's
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}

# The vision-config defaults of transformers 5.24 (CLIPVisionConfig, SiglipVisionConfig) for keys a config.json
# leaves out; CLIPConfig's top-level projection_dim defaults to 512 as well.
_HF_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                 num_attention_heads=12, num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, vision_use_head=True),
}
_MODEL_TYPES = {"clip": ("clip", True), "clip_vision_model": ("clip", False), "siglip": ("siglip", True),
                "siglip_vision_model": ("siglip", False)}  # model_type -> (family, vision config nested?)


@dataclasses.dataclass(frozen=True)
class VisionTowerConfig:
    """A CLIP or SigLIP vision config (transformers field names). `projection_dim` is CLIP's projected
    embedding size (None: no `visual_projection`); `vision_use_head` is SigLIP's attention-pooling head."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    num_channels: int = 3
    projection_dim: int | None = None
    vision_use_head: bool = False

    def __post_init__(self):
        checks = {
            f"family must be one of {FAMILIES}": self.family in FAMILIES,
            "hidden_size must be divisible by num_attention_heads": self.hidden_size % self.num_attention_heads == 0,
            "image_size must be at least patch_size (positive)": 0 < self.patch_size <= self.image_size,
            f"hidden_act must be one of {sorted(ACTIVATIONS)}": self.hidden_act in ACTIVATIONS,
            "projection_dim is CLIP's": self.projection_dim is None or self.family == "clip",
            "vision_use_head is SigLIP's": not self.vision_use_head or self.family == "siglip",
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(f"bad vision tower config: {message} (got {self})")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + (self.family == "clip")

    @classmethod
    def from_hf_config(cls, values: dict[str, Any], *, with_projection: bool = True) -> "VisionTowerConfig":
        """From a transformers config.json dict: `CLIPConfig` / `SiglipConfig` (the vision part of a
        `vision_config`, legacy `vision_config_dict` entries winning as in transformers) or `CLIPVisionConfig`
        / `SiglipVisionConfig`. `with_projection=False` drops CLIP's projection (a `CLIPVisionModel` has none).
        Raises ValueError naming the problem."""
        model_type = values.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type must be one of {sorted(_MODEL_TYPES)}, got {model_type!r}")
        family, nested = _MODEL_TYPES[model_type]
        vision = values
        if nested:
            vision = {**(values.get("vision_config") or {}), **(values.get("vision_config_dict") or {})}
            if family == "clip":  # CLIPModel's projection size is a top-level field
                vision["projection_dim"] = values.get("projection_dim", _HF_DEFAULTS["clip"]["projection_dim"])
        merged = {**_HF_DEFAULTS[family], **vision}
        for key in ("image_size", "patch_size"):
            if not isinstance(merged[key], int):
                raise ValueError(f"{key} must be one int (square images and patches), got {merged[key]!r}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"family"}
        config = {k: v for k, v in merged.items() if k in fields}
        if family == "clip" and not with_projection:
            config["projection_dim"] = None
        return cls(family=family, **config)


class VisionTowerOutput(NamedTuple):
    """`last_hidden_state [B, S, D]`, `pooler_output [B, D]` (None for a SigLIP tower without head) and
    `image_embeds`: CLIP's projected embedding `[B, P]` (None without projection), SigLIP's pooled output."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None
    image_embeds: jax.Array | None


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm (affine) over the last axis: statistics and affine in fp32, rounded once."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        param = lambda init: nnx.Param(init((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        self.scale = param(jnp.ones)
        self.bias = param(jnp.zeros)

    def __call__(self, x: jax.Array) -> jax.Array:
        normed = layers.layer_norm(x.astype(jnp.float32), self.eps)
        return (normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class MLP(nnx.Module):
    """fc2(act(fc1(x))), `[..., D] -> [..., D]`, with biases."""

    def __init__(self, config: VisionTowerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = config.hidden_act
        self.fc1 = layers.linear(config.hidden_size, config.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = layers.linear(config.intermediate_size, config.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class Attention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections, scale 1/sqrt(head_dim), no mask,
    `[B, S, D] -> [B, S, D]`."""

    def __init__(self, config: VisionTowerConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.attention_impl = attention_impl
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = layers.linear(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = layers.linear(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = layers.linear(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = layers.linear(d, d, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        heads = lambda t: t.reshape(b, s, self.num_heads, -1)
        out = layers.attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), None,
                               self.attention_impl)
        return self.out_proj(out.reshape(b, s, -1))


class EncoderLayer(nnx.Module):
    """x + attn(layer_norm1(x)), then + mlp(layer_norm2(.)); `[B, S, D] -> [B, S, D]`."""

    def __init__(self, config: VisionTowerConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        norm = lambda: LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = norm()
        self.self_attn = Attention(config, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
        self.layer_norm2 = norm()
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class AttentionPoolingHead(nnx.Module):
    """SigLIP's `SiglipMultiheadAttentionPoolingHead`: one learned probe attends over the tokens
    (torch.nn.MultiheadAttention, its q/k/v projections fused in `in_proj` `[D, 3D]`), then
    `h + mlp(layernorm(h))`; `[B, N, D] -> [B, D]`."""

    def __init__(self, config: VisionTowerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.dtype = dtype
        self.probe = nnx.Param(layers.logical(nnx.initializers.normal(1.0), (None, None, "embed"))(
            rngs.params(), (1, 1, d), param_dtype))
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = layers.linear(d, 3 * d, axes=("embed", "heads"), **kw)
        self.out_proj = layers.linear(d, d, axes=("heads", "embed"), **kw)
        self.layernorm = LayerNorm(d, config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        b, n, d = tokens.shape
        probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (b, 1, d))
        # MultiheadAttention projects the query with the first third of in_proj and keys / values with the
        # others; projecting the tokens by all of it wastes one D x D matmul per token, once per image.
        query = self.in_proj(probe)[..., :d]
        key, value = jnp.split(self.in_proj(tokens)[..., d:], 2, axis=-1)
        heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, -1)
        # One query: no kernel to choose, the portable one is used.
        pooled = layers.attention(heads(query), heads(key), heads(value), None, "xla").reshape(b, 1, d)
        pooled = self.out_proj(pooled)
        return (pooled + self.mlp(self.layernorm(pooled)))[:, 0]


# Logical axes of the residual stream [B, S, D] at layer boundaries.
ACTIVATION_AXES = ("batch", "length", "act_embed")


class VisionTower(nnx.Module):
    """A CLIP or SigLIP ViT: `pixel_values [B, C, H, W]` (the image processor's output, H = W = image_size)
    -> `VisionTowerOutput` with transformers' meanings (see the module docstring).

    `dtype` is the compute dtype and `param_dtype` the storage dtype; `attention_impl` one of
    `layers.ATTENTION_IMPLEMENTATIONS`. A plain call compiles once per input shape (`compiled.compiled_method`).
    """

    def __init__(self, config: VisionTowerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "xla", remat: str = "none", scan_layers: bool = True, rngs: nnx.Rngs):
        layers.check_build_settings(remat, attention_impl)
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers
        d = config.hidden_size
        clip = config.family == "clip"
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.patch_embedding = layers.PatchEmbed(config.num_channels, config.hidden_size, config.patch_size,
                                                 use_bias=not clip, rngs=rngs, **kw)
        # torch's inits: class embedding and positions (nn.Embedding) N(0, 1).
        normal = nnx.initializers.normal(1.0)
        self.class_embedding = (nnx.Param(layers.logical(normal, ("embed",))(rngs.params(), (d,), param_dtype))
                                if clip else nnx.data(None))
        self.position_embedding = nnx.Param(layers.logical(normal, (None, "embed"))(
            rngs.params(), (config.num_positions, d), param_dtype))
        self.pre_layrnorm = LayerNorm(d, config.layer_norm_eps, **kw) if clip else None
        self.layers = layers.create_stacked(
            lambda layer_rngs: EncoderLayer(config, attention_impl=attention_impl, rngs=layer_rngs, **kw),
            config.num_hidden_layers, rngs)
        self.post_layernorm = LayerNorm(d, config.layer_norm_eps, **kw)
        self.head = AttentionPoolingHead(config, rngs=rngs, **kw) if config.vision_use_head else None
        self.visual_projection = (layers.linear(d, config.projection_dim, axes=("embed", "mlp"), use_bias=False,
                                                rngs=rngs, **kw) if config.projection_dim is not None else None)

    @compiled_method
    def __call__(self, pixel_values) -> VisionTowerOutput:
        cfg = self.config
        pixel_values = jnp.asarray(pixel_values)
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
            raise ValueError(f"pixel_values {pixel_values.shape} must be [B, {', '.join(map(str, expected))}]")
        x = self.patch_embedding(pixel_values)
        if self.class_embedding is not None:
            class_token = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (x.shape[0], 1, x.shape[2]))
            x = jnp.concatenate([class_token, x], axis=1)
        x = x + self.position_embedding[...].astype(self.dtype)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)

        def step(layer, carry, _):
            return layers.constrain(layer(carry), ACTIVATION_AXES), None

        x, _ = layers.run_stacked(self.layers, step, layers.constrain(x, ACTIVATION_AXES), remat=self.remat,
                                  scan=self.scan_layers)
        if cfg.family == "clip":
            pooled = self.post_layernorm(x[:, 0])
            embeds = self.visual_projection(pooled) if self.visual_projection is not None else None
            return VisionTowerOutput(x, pooled, embeds)
        x = self.post_layernorm(x)
        pooled = self.head(x) if self.head is not None else None
        return VisionTowerOutput(x, pooled, pooled)


def init_vision_tower(config: VisionTowerConfig, *, seed: int = 0, **kwargs) -> VisionTower:
    """A randomly initialised tower (torch-like inits, norms at 1)."""
    return VisionTower(config, rngs=nnx.Rngs(seed), **kwargs)


def abstract_vision_tower(config: VisionTowerConfig, **kwargs) -> VisionTower:
    """The tower with `jax.ShapeDtypeStruct` leaves: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: VisionTower(config, rngs=nnx.Rngs(0), **kwargs))
