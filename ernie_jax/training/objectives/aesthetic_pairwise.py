"""Bradley-Terry (RankNet) loss of an aesthetic scorer on pairwise judgments, ties as half a win.

A judgment of images a and b has outcome y = 1 (a better), 0 (b better) or 1/2 (a tie). With the score
difference d = s(a) - s(b) and P(a beats b) = sigmoid(d), the loss is the cross-entropy

    loss = -[y log sigmoid(d) + (1 - y) log sigmoid(-d)]

averaged over the batch: a tie pulls d towards 0 (its gradient sigmoid(d) - 1/2 vanishes there). Scores are
defined up to a shift; only their differences are trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

# Manifest outcome -> y, P(image a is the better one).
OUTCOMES = {"left": 1.0, "right": 0.0, "tie": 0.5}


def bradley_terry_loss(scores_a: jax.Array, scores_b: jax.Array, outcome: jax.Array) -> jax.Array:
    """Mean over pairs of -[y log sigmoid(s_a - s_b) + (1 - y) log sigmoid(s_b - s_a)]; all `[B]`, y in [0, 1]."""
    difference = scores_a.astype(jnp.float32) - scores_b.astype(jnp.float32)
    y = outcome.astype(jnp.float32)
    return -jnp.mean(y * jax.nn.log_sigmoid(difference) + (1 - y) * jax.nn.log_sigmoid(-difference))


def pair_accuracy(scores_a: jax.Array, scores_b: jax.Array, outcome: jax.Array) -> jax.Array:
    """Among the pairs with a winner, the fraction whose scores order them the same way (equal scores count
    1/2); 1/2 when every pair is a tie."""
    label_order = jnp.sign(outcome.astype(jnp.float32) - 0.5)
    score_order = jnp.sign(scores_a - scores_b)
    agreement = jnp.where(score_order == label_order, 1.0, jnp.where(score_order == 0, 0.5, 0.0))
    decided = label_order != 0
    count = jnp.sum(decided)
    return jnp.where(count > 0, jnp.sum(jnp.where(decided, agreement, 0.0)) / jnp.maximum(count, 1), 0.5)


@dataclasses.dataclass(frozen=True)
class Config:
    """`model`: the name of the trained scorer part."""

    model: str = "scorer"


@dataclasses.dataclass(frozen=True)
class AestheticPairwise:
    """The objective (`objectives.Objective`): batches of `images_a`, `images_b` `[B, C, H, W]` (the scorer's
    pixel values) and `outcome [B]` float (1: a better, 0: b better, 1/2: a tie); trains the scorer part
    `config.model` (a `models.aesthetic_scorer.AestheticScorer`), reads nothing else.

    metrics: loss, accuracy (`pair_accuracy`), margin (mean |s_a - s_b|), score_std."""

    config: Config = Config()

    batch_keys = ("images_a", "images_b", "outcome")
    reads = ()

    @property
    def trains(self) -> tuple[str, ...]:
        return (self.config.model,)

    def loss(self, trainable: Mapping, frozen: Mapping, batch: Mapping, keys: jax.Array):
        # One forward over both images of every pair: the tower runs once, on 2B images.
        images = jnp.concatenate([batch["images_a"], batch["images_b"]])
        scores_a, scores_b = jnp.split(trainable[self.config.model].score(images), 2)
        loss = bradley_terry_loss(scores_a, scores_b, batch["outcome"])
        return loss, {"loss": loss, "accuracy": pair_accuracy(scores_a, scores_b, batch["outcome"]),
                      "margin": jnp.mean(jnp.abs(scores_a - scores_b)),
                      "score_std": jnp.std(jnp.concatenate([scores_a, scores_b]))}


def trains(config: Config) -> tuple[str, ...]:
    return (config.model,)


def make(config: Config, context=None) -> AestheticPairwise:
    return AestheticPairwise(config)
