"""Training objectives: pure loss functions over named models, one file per method.

An objective is any object with

- `batch_keys`: the batch arrays its loss reads (each with the batch on its leading axis);
- `trains`: the names of the models whose parameters the loss is differentiated for (the train state's
  trainable parts, each with its own optimizer state and EMA);
- `reads`: the names of the frozen models it only evaluates (a DPO reference, distillation teachers);
- `loss(trainable, frozen, batch, keys) -> (loss, metrics)`: `trainable` and `frozen` map those names to
  `nnx.Module`s, `batch` holds `batch_keys`, `keys [B]` is one typed PRNG key per example, and it returns
  a float32 scalar and a dict of float32 scalar metrics (batch means).

One key per example, rather than one per batch, is what lets the trainer split a batch into microbatches
(the keys split with the rows) and still compute the update of the whole batch: every random number an
example sees is drawn from its own key.

An objective may also list `optional_batch_keys`, which the step passes on when the batch has them.

The trainer knows nothing else about an objective. The runner resolves `config.objective.name` to the
module `ernie_jax.training.objectives.<name>`, which has a `Config` dataclass (built from the other
`config.objective` fields) and `make(config, context) -> Objective` (`context`:
`runner.stages.train.ObjectiveContext`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

import jax
from flax import nnx

Metrics = dict[str, jax.Array]


class Objective(Protocol):
    batch_keys: tuple[str, ...]
    trains: tuple[str, ...]
    reads: tuple[str, ...]

    def loss(self, trainable: Mapping[str, nnx.Module], frozen: Mapping[str, nnx.Module],
             batch: Mapping[str, jax.Array], keys: jax.Array) -> tuple[jax.Array, Metrics]: ...


@dataclasses.dataclass(frozen=True)
class Update:
    """One update of a training step: `loss` differentiated for the parts `trains`, run `repeats` times in a row
    (metrics as f"{name}/{key}")."""

    name: str
    trains: tuple[str, ...]
    loss: Callable
    repeats: int = 1


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
    """`[batch_size]` typed keys, example i's from `fold_in(key, i)`: the same example index draws the same
    numbers whatever the batch size."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jax.numpy.arange(batch_size))
