"""Ordinal (cumulative-logit / CORAL) loss of an aesthetic scorer on levels 1..K.

One shared score s(x) and K-1 ordered thresholds theta_1 < ... < theta_{K-1} (the scorer's, see
`models.aesthetic_scorer`) give P(level > k) = sigmoid(s(x) - theta_k). Each threshold is a binary
classification of "level > k", trained with binary cross-entropy, summed over the thresholds and averaged over
the batch (CORAL: Cao, Mirjalili & Raschka 2020):

    loss = -mean_i sum_k [t_ik log sigmoid(z_ik) + (1 - t_ik) log sigmoid(-z_ik)],  z_ik = s(x_i) - theta_k,
                                                                                    t_ik = [level_i > k]

The scorer's thresholds are ordered by construction, so the level probabilities are never negative (CORAL's
rank consistency). The score to rank images by is s(x) itself (E[level] = 1 + sum_k sigmoid(z_k) is a
monotone function of it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from ernie_jax.aesthetics.batch_metrics import concordance, spearman
from ernie_jax.models.aesthetic_scorer import expected_level, level_probabilities, ordinal_logits


def threshold_targets(levels: jax.Array, num_levels: int) -> jax.Array:
    """`levels [B]` in 1..K -> `[B, K - 1]` float32: [level > k] for k = 1..K-1."""
    return (levels[:, None] > jnp.arange(1, num_levels)[None, :]).astype(jnp.float32)


def ordinal_loss(scores: jax.Array, thresholds: jax.Array, levels: jax.Array) -> jax.Array:
    """`scores [B]`, `thresholds [K - 1]`, integer `levels [B]` in 1..K -> the CORAL loss (module docstring)."""
    logits = ordinal_logits(scores.astype(jnp.float32), thresholds.astype(jnp.float32))
    targets = threshold_targets(levels, thresholds.shape[0] + 1)
    per_threshold = targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits)
    return -jnp.mean(jnp.sum(per_threshold, axis=1))


@dataclasses.dataclass(frozen=True)
class Config:
    """`num_levels` K (levels 1..K; the scorer is built with K - 1 thresholds); `model`: the trained scorer."""

    num_levels: int = 10
    model: str = "scorer"

    def __post_init__(self):
        if self.num_levels < 2:
            raise ValueError(f"the ordinal objective needs num_levels >= 2, got {self.num_levels}")


@dataclasses.dataclass(frozen=True)
class AestheticOrdinal:
    """The objective (`objectives.Objective`): batches of `images [B, C, H, W]` (the scorer's pixel values)
    and integer `levels [B]` in 1..K; trains the scorer part `config.model`, which must have K - 1 thresholds.

    metrics: loss, accuracy (most probable level = level), level_mae (|E[level] - level|), srcc (in-batch
    Spearman of the scores and levels), concordance (in-batch pairwise accuracy over pairs of different
    levels), score_std."""

    config: Config = Config()

    batch_keys = ("images", "levels")
    reads = ()

    @property
    def trains(self) -> tuple[str, ...]:
        return (self.config.model,)

    def loss(self, trainable: Mapping, frozen: Mapping, batch: Mapping, keys: jax.Array):
        scorer = trainable[self.config.model]
        if scorer.num_levels != self.config.num_levels:
            raise ValueError(f"the ordinal objective trains {self.config.num_levels} levels but the scorer has "
                             f"{scorer.num_levels} (ScorerHeadConfig.num_levels)")
        scores, thresholds, levels = scorer.score(batch["images"]), scorer.thresholds(), batch["levels"]
        loss = ordinal_loss(scores, thresholds, levels)
        logits = ordinal_logits(scores, thresholds)
        predicted = 1 + jnp.argmax(level_probabilities(logits), axis=1)
        return loss, {"loss": loss, "accuracy": jnp.mean((predicted == levels).astype(jnp.float32)),
                      "level_mae": jnp.mean(jnp.abs(expected_level(logits) - levels)),
                      "srcc": spearman(scores, levels), "concordance": concordance(scores, levels),
                      "score_std": jnp.std(scores)}


def trains(config: Config) -> tuple[str, ...]:
    return (config.model,)


def num_levels(config: Config) -> int:
    """The thresholds the scorer needs: K - 1 for levels 1..K."""
    return config.num_levels


def make(config: Config, context=None) -> AestheticOrdinal:
    return AestheticOrdinal(config)
