"""Mean squared error of an aesthetic scorer's score against a numeric label per image: the Likert-rating
baseline (the LAION predictor's training loss), `loss = mean_i (s(x_i) - r_i)^2`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from ernie_jax.aesthetics.batch_metrics import concordance, spearman


def regression_loss(scores: jax.Array, targets: jax.Array) -> jax.Array:
    """mean((scores - targets)^2) over `[B]`, in float32."""
    return jnp.mean(jnp.square(scores.astype(jnp.float32) - targets.astype(jnp.float32)))


@dataclasses.dataclass(frozen=True)
class Config:
    """`target`: the batch key of the labels (`ratings`, or `levels` to regress on levels); `model`: the trained
    scorer."""

    target: str = "ratings"
    model: str = "scorer"


@dataclasses.dataclass(frozen=True)
class AestheticRegression:
    """The objective (`objectives.Objective`): batches of `images [B, C, H, W]` (the scorer's pixel values)
    and labels `[B]` under `config.target`; trains the scorer part `config.model`.

    metrics: loss, mae, srcc (in-batch Spearman), concordance (in-batch pairwise accuracy), score_std."""

    config: Config = Config()

    reads = ()

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("images", self.config.target)

    @property
    def trains(self) -> tuple[str, ...]:
        return (self.config.model,)

    def loss(self, trainable: Mapping, frozen: Mapping, batch: Mapping, keys: jax.Array):
        scores, targets = trainable[self.config.model].score(batch["images"]), batch[self.config.target]
        loss = regression_loss(scores, targets)
        return loss, {"loss": loss, "mae": jnp.mean(jnp.abs(scores - targets)), "srcc": spearman(scores, targets),
                      "concordance": concordance(scores, targets), "score_std": jnp.std(scores)}


def trains(config: Config) -> tuple[str, ...]:
    return (config.model,)


def make(config: Config, context=None) -> AestheticRegression:
    return AestheticRegression(config)
