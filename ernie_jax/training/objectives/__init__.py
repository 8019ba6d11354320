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

An objective that trains its models in turns (distillation: a critic several times, then the generator)
lists them as `updates`, a tuple of `Update`s: each names the parts it trains, its own loss and how many
times it runs per training step. A training step runs them in order, each run on its own slice of the
step's batch; inside a run's loss, `trainable` holds that update's parts and `frozen` the objective's
`reads` and every other trainable part at its current parameters (read, not differentiated). Without
`updates`, an objective is one update of all its `trains` with its `loss` (`updates_of`).

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
    """One optimizer update of the parts `trains` on `loss` (`(trainable, frozen, batch, keys) -> (loss,
    metrics)`, as `Objective.loss`), run `repeats` times in a row per training step. `name` prefixes its
    metrics (`NAME/KEY`, averaged over the repeats)."""

    name: str
    trains: tuple[str, ...]
    loss: Callable[..., tuple[jax.Array, Metrics]]
    repeats: int = 1

    def __post_init__(self):
        if "/" in self.name:
            raise ValueError(f"an update's name must not contain '/', got {self.name!r}")
        if not self.trains:
            raise ValueError(f"update {self.name!r} trains no part")
        if self.repeats < 1:
            raise ValueError(f"update {self.name!r}: repeats must be >= 1, got {self.repeats}")


def updates_of(objective: Objective) -> tuple[Update, ...]:
    """The objective's `updates`, checked against its `trains`; or, without them, one update of all its
    `trains` on its `loss`, named "" (its metrics keep their own names)."""
    updates = tuple(getattr(objective, "updates", ()))
    if not updates:
        return (Update("", tuple(objective.trains), objective.loss),)
    trained = [name for update in updates for name in update.trains]
    if sorted(set(trained)) != sorted(objective.trains):
        raise ValueError(f"the updates train {sorted(set(trained))} but the objective trains "
                         f"{sorted(objective.trains)}")
    names = [update.name for update in updates]
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"an objective's updates need distinct non-empty names, got {names}")
    return updates


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
    """`[batch_size]` typed keys, example i's from `fold_in(key, i)`: the same example index draws the same
    numbers whatever the batch size."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jax.numpy.arange(batch_size))
