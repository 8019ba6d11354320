"""Our aesthetic scorer: a CLIP or SigLIP image tower (`models.vision_tower`) and a small head giving one score
per image, plus, for ordinal training on levels 1..K, K-1 ordered thresholds (a cumulative-logit / CORAL model:
P(level > k) = sigmoid(score - threshold_k)).

The tower is frozen, LoRA-adapted or fully fine-tuned: that is which variables the trainer updates
(`trained_variables(tuning)`), not a different model. The head reads one feature vector per image
(`ScorerHeadConfig.features`):
- "pooled": the tower's `pooler_output` (CLIP: post-norm class token; SigLIP: the attention-pooling head);
- "embeds": `image_embeds` (CLIP's projected embedding, what the LAION predictor reads; SigLIP: the pooled output);
- "mean_tokens": the mean of `last_hidden_state` over tokens.

Shapes: B batch, C = 3 channels, H = W the tower's image size, F the feature width, K levels.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.models import layers
from ernie_jax.models.aesthetic_head import l2_normalize
from ernie_jax.models.compiled import compiled_method
from ernie_jax.models.lora import LoRAParam
from ernie_jax.models.vision_tower import VisionTower

FEATURES = ("pooled", "embeds", "mean_tokens")
TUNINGS = ("frozen", "lora", "full")
# The thresholds of a fresh ordinal head: evenly spread over +-THRESHOLD_SPAN, around a fresh score's scale.
THRESHOLD_SPAN = 2.0


@dataclasses.dataclass(frozen=True)
class ScorerHeadConfig:
    """`features` (see the module docstring), L2-normalised first if `normalize`; an MLP of `hidden` widths
    (GELU between layers; () is a linear head) down to one score; `num_levels` K >= 2 adds the ordinal
    thresholds for levels 1..K (0: none)."""

    features: str = "pooled"
    normalize: bool = False
    hidden: tuple[int, ...] = ()
    num_levels: int = 0

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if self.features not in FEATURES:
            raise ValueError(f"scorer head features {self.features!r} is not one of {FEATURES}")
        if any(width < 1 for width in self.hidden):
            raise ValueError(f"scorer head hidden widths must be positive, got {self.hidden}")
        if self.num_levels == 1 or self.num_levels < 0:
            raise ValueError(f"scorer head num_levels must be 0 (no thresholds) or >= 2, got {self.num_levels}")


def feature_width(tower: VisionTower, features: str) -> int:
    """F: the width of the tower's output that the head reads."""
    config = tower.config
    if features == "embeds" and config.family == "clip":
        if config.projection_dim is None:
            raise ValueError("scorer head features 'embeds' need a CLIP tower with its visual_projection")
        return config.projection_dim
    if features != "mean_tokens" and config.family == "siglip" and not config.vision_use_head:
        raise ValueError(f"scorer head features {features!r} need SigLIP's pooling head (vision_use_head); "
                         f"use 'mean_tokens'")
    return config.hidden_size


class AestheticScorer(nnx.Module):
    """`pixel_values [B, C, H, W]` (the tower's image processor's output) -> scores `[B]` float32.

    `tower` is a built `VisionTower`; the head's parameters are created in `param_dtype` and replicated (no
    logical axis names beyond None: under a million parameters)."""

    def __init__(self, tower: VisionTower, head: ScorerHeadConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.tower = tower
        self.head_config = head
        widths = (feature_width(tower, head.features), *head.hidden, 1)
        self.head = nnx.List([
            layers.linear(fan_in, fan_out, axes=(None, None), use_bias=True, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs) for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True)])
        if head.num_levels:
            # threshold_k = first + sum_{j<k} softplus(gap_j): ordered whatever the parameters are.
            gap = 2 * THRESHOLD_SPAN / max(head.num_levels - 2, 1)
            inverse_softplus = math.log(math.expm1(gap))
            self.first_threshold = nnx.Param(jnp.full((1,), -THRESHOLD_SPAN, param_dtype), out_sharding=(None,),
                                             eager_sharding=False)
            self.threshold_gaps = nnx.Param(jnp.full((head.num_levels - 2,), inverse_softplus, param_dtype),
                                            out_sharding=(None,), eager_sharding=False)
        else:
            self.first_threshold = self.threshold_gaps = nnx.data(None)

    @property
    def num_levels(self) -> int:
        return self.head_config.num_levels

    def features(self, pixel_values: jax.Array) -> jax.Array:
        """The head's input `[B, F]` float32."""
        output = self.tower(pixel_values)
        chosen = {"pooled": output.pooler_output, "embeds": output.image_embeds}.get(self.head_config.features)
        if chosen is None:  # mean_tokens
            chosen = jnp.mean(output.last_hidden_state.astype(jnp.float32), axis=1)
        chosen = chosen.astype(jnp.float32)
        return l2_normalize(chosen) if self.head_config.normalize else chosen

    @compiled_method
    def score(self, pixel_values) -> jax.Array:
        """`[B, C, H, W] -> [B]` float32: the head's output on the tower's features."""
        x = self.features(jnp.asarray(pixel_values))
        for index, projection in enumerate(self.head):
            if index:
                x = jax.nn.gelu(x, approximate=False)
            x = projection(x)
        return x[:, 0].astype(jnp.float32)

    def thresholds(self) -> jax.Array:
        """The ordered thresholds `[K - 1]` float32 (threshold_k between levels k and k + 1)."""
        if self.first_threshold is None:
            raise ValueError("this scorer has no ordinal thresholds: build it with ScorerHeadConfig.num_levels >= 2")
        gaps = jax.nn.softplus(self.threshold_gaps[...].astype(jnp.float32))
        return self.first_threshold[...].astype(jnp.float32)[0] + jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(gaps)])

    def level_logits(self, pixel_values: jax.Array) -> jax.Array:
        """`[B, K - 1]`: logit of P(level > k) = score - threshold_k, k = 1..K-1."""
        return ordinal_logits(self.score(pixel_values), self.thresholds())

    @compiled_method
    def level_probabilities(self, pixel_values) -> jax.Array:
        """`[B, K]` float32: P(level = k), k = 1..K (non-negative, summing to 1)."""
        return level_probabilities(self.level_logits(jnp.asarray(pixel_values)))


def ordinal_logits(scores: jax.Array, thresholds: jax.Array) -> jax.Array:
    """`scores [B]`, `thresholds [K - 1]` -> `[B, K - 1]`: the logits of P(level > k)."""
    return scores[:, None] - thresholds[None, :]


def level_probabilities(logits: jax.Array) -> jax.Array:
    """The logits of P(level > k) `[B, K - 1]` (thresholds ordered) -> P(level = k) `[B, K]`."""
    above = jax.nn.sigmoid(logits)
    ones, zeros = jnp.ones_like(above[:, :1]), jnp.zeros_like(above[:, :1])
    return jnp.concatenate([ones, above], axis=1) - jnp.concatenate([above, zeros], axis=1)


def expected_level(logits: jax.Array) -> jax.Array:
    """E[level] = 1 + sum_k P(level > k), `[B, K - 1] -> [B]`."""
    return 1.0 + jnp.sum(jax.nn.sigmoid(logits), axis=1)


def _outside_tower(path, _) -> bool:
    return path[0] != "tower"


def trained_variables(tuning: str):
    """The nnx filter of the variables the trainer updates for a tower `tuning`: "frozen" the head (and
    thresholds) only; "lora" those and the tower's LoRA adapters (`models.lora.add_lora` on the tower); "full"
    every parameter."""
    head = nnx.All(nnx.Param, _outside_tower)
    filters = {"frozen": head, "lora": nnx.Any(LoRAParam, head), "full": nnx.Param}
    if tuning not in filters:
        raise ValueError(f"tower tuning {tuning!r} is not one of {TUNINGS}")
    return filters[tuning]
