"""Rank agreement of a batch of scores with its labels, in JAX (jit-able training metrics; `metrics` has the
numpy versions with bootstrap intervals for evaluation). O(B^2) in the batch size, which is what a training
batch affords.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def average_ranks(values: jax.Array) -> jax.Array:
    """`[B] -> [B]` float32 ranks 1..B, ties given their average rank (scipy's `rankdata(method="average")`)."""
    values = jnp.asarray(values, jnp.float32)
    below = jnp.sum(values[None, :] < values[:, None], axis=1)
    equal = jnp.sum(values[None, :] == values[:, None], axis=1)
    return (below + (equal + 1) / 2).astype(jnp.float32)


def spearman(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Spearman's rank correlation (Pearson r of average ranks) of `[B]` and `[B]`; 0 where either is
    constant (no ranking to agree with)."""
    x, y = average_ranks(scores), average_ranks(labels)
    x, y = x - jnp.mean(x), y - jnp.mean(y)
    denominator = jnp.sqrt(jnp.sum(x * x) * jnp.sum(y * y))
    return jnp.where(denominator > 0, jnp.sum(x * y) / jnp.where(denominator > 0, denominator, 1.0), 0.0)


def concordance(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """In-batch pairwise accuracy: among the pairs (i, j) whose labels differ, the fraction the scores order the
    same way (a tied score counts 1/2); 1/2 when all labels are equal."""
    label_order = jnp.sign(labels[:, None] - labels[None, :])
    score_order = jnp.sign(scores[:, None] - scores[None, :])
    compared = label_order != 0
    agreement = jnp.where(score_order == label_order, 1.0, jnp.where(score_order == 0, 0.5, 0.0))
    count = jnp.sum(compared)
    return jnp.where(count > 0, jnp.sum(jnp.where(compared, agreement, 0.0)) / jnp.maximum(count, 1), 0.5)
