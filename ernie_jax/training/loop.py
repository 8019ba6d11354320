"""The training loop: restore-or-create the sharded train state of the named trainable models, place the
frozen ones, run the compiled step of an objective on each batch,
report metrics to callbacks, checkpoint every K steps, stop on a non-finite loss.

A run killed at any moment and started again with the same arguments resumes from its newest complete
checkpoint and computes exactly the losses the uninterrupted run computes from there: the state, the
data iterator's position and the step (from which each update's random key is derived) are all in
the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ernie_jax import parallel
from ernie_jax.training.checkpoints import Checkpoints
from ernie_jax.training.objectives import Objective
from ernie_jax.training.state import (
    TrainablePart,
    TrainState,
    abstract_train_state,
    create_train_state,
    part_rests,
    place,
    shardings_of,
)
from ernie_jax.training.step import (
    batch_keys,
    batch_shardings,
    jit_train_step,
    make_train_step,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long to train and how to checkpoint. `checkpoint_every` counts updates; the last step is always
    saved. `microbatches` splits each batch for gradient accumulation inside the step."""

    num_steps: int
    seed: int = 0
    microbatches: int = 1
    checkpoint_every: int = 1000
    max_to_keep: int = 3
    async_checkpoints: bool = True

    def __post_init__(self):
        if self.num_steps < 0 or self.checkpoint_every < 1:
            raise ValueError(f"need num_steps >= 0 and checkpoint_every >= 1, got {self.num_steps}, "
                             f"{self.checkpoint_every}")
        if self.microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {self.microbatches}")


class Callback(Protocol):
    """Called after every update with the update's index (the state's step before it), its metrics as
    Python floats, and the new state (e.g. for evaluation or sample grids every N steps)."""

    def __call__(self, step: int, metrics: dict[str, float], state: TrainState) -> None: ...


class JsonlMetrics:
    """A callback appending `{"step": s, **metrics}` as one JSON line per update to `path` (flushed).

    A resumed run redoes the updates after its checkpoint, which a killed run may already have logged: its
    first call drops the lines of that step and later ones (atomically), so the file reads as an
    uninterrupted run's."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self._started = False

    def _drop_from(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            # A line without its newline is one the killed run did not finish writing.
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] < step]
        staging = f"{self.path}.tmp-{os.getpid()}"
        with open(staging, "w") as f:
            f.writelines(kept)
        os.replace(staging, self.path)

    def __call__(self, step: int, metrics: dict[str, float], state: TrainState) -> None:
        if not self._started:
            self._drop_from(step)
            self._started = True
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


class NonFiniteLossError(FloatingPointError):
    """The loss of an update was NaN or infinite; that update's state was not saved."""


def _to_device(batch: dict, shardings: dict) -> dict:
    """Host arrays (this process's rows) -> global arrays in the batch shardings."""
    return {k: jax.device_put(v, shardings[k]) if isinstance(v, jax.Array)
            else jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}


def train(config: TrainConfig, parts: Mapping[str, TrainablePart], objective: Objective,
          data_iterator: Iterator[dict], checkpoint_dir: str | os.PathLike, *, mesh: Mesh,
          rules: parallel.Rules = parallel.TRAINING_RULES, initial: Mapping[str, nnx.Module] | None = None,
          frozen: Mapping[str, nnx.Module] | None = None, prepare_batch: Callable[[dict], dict] | None = None,
          callbacks: Sequence[Callback] = ()) -> TrainState:
    """Trains the `parts` on `objective` until `config.num_steps` updates are done; returns the final state.

    `parts` name the trainable models (`state.TrainablePart`); a part named in `initial` starts from that
    model (its trained variables are copied into float32 master weights; the rest, e.g. a LoRA's base, is
    held frozen), the others from their `build`. `frozen` names the models the objective only reads (a DPO
    reference, teachers); their states are placed by `rules` and never checkpointed.
    `data_iterator` yields dicts holding at least `objective.batch_keys` as this process's rows (other keys
    are left on the host) and is a grain iterator, so its position is checkpointed. `prepare_batch` runs on
    each element first: the place for the frozen VAE and text encoder when the data holds images and
    captions rather than latents and features.
    Raises NonFiniteLossError naming the step whose loss (any metric `loss` or `UPDATE/loss`) is NaN/inf, after pending saves finish (the
    newest checkpoint is then the last good one).
    """
    if not (hasattr(data_iterator, "get_state") and hasattr(data_iterator, "set_state")):
        raise TypeError(f"data_iterator must be a grain iterator (with get_state/set_state, so that its position is "
                        f"checkpointed), got {type(data_iterator).__name__}")
    graphdefs, abstract = abstract_train_state(parts, seed=config.seed, mesh=mesh, rules=rules)
    frozen_states = part_rests(parts, seed=config.seed, mesh=mesh, rules=rules, initial=initial)
    for name, model in (frozen or {}).items():
        if name in parts:
            raise ValueError(f"{name!r} is both a trainable part and a frozen model")
        graphdefs[name], frozen_state = nnx.split(model)
        frozen_states[name] = place(frozen_state, mesh, rules)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen_states)
    step_fn = make_train_step(parts, graphdefs, objective, microbatches=config.microbatches)
    ckpt = Checkpoints(checkpoint_dir, max_to_keep=config.max_to_keep, async_save=config.async_checkpoints)
    try:
        if ckpt.latest_step() is not None:
            state = ckpt.restore(abstract, data_iterator)
        else:
            _, state = create_train_state(parts, seed=config.seed, mesh=mesh, rules=rules, initial=initial)
        step = int(state.step)
        compiled = None
        while step < config.num_steps:
            try:
                batch = next(data_iterator)
            except StopIteration:
                raise RuntimeError(f"the data iterator ran out at step {step} of {config.num_steps}") from None
            batch = batch if prepare_batch is None else prepare_batch(batch)
            batch = {k: batch[k] for k in batch_keys(objective, batch)}
            if compiled is None:
                shardings = batch_shardings(mesh, rules, batch)
                compiled = jit_train_step(step_fn, mesh, rules, shardings_of(abstract), frozen_shardings, shardings)
            state, metrics = compiled(state, frozen_states, _to_device(batch, shardings))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            bad = {k: v for k, v in metrics.items() if (k == "loss" or k.endswith("/loss")) and not math.isfinite(v)}
            if bad:
                ckpt.wait_until_finished()
                raise NonFiniteLossError(
                    f"{', '.join(f'{k} is {v}' for k, v in bad.items())} at step {step}; stopped without saving it "
                    f"(the newest checkpoint in {ckpt.directory} is step {ckpt.latest_step()})")
            for callback in callbacks:
                callback(step, metrics, state)
            step += 1
            if step % config.checkpoint_every == 0 or step == config.num_steps:
                ckpt.save(step, state, data_iterator)
    finally:
        ckpt.wait_until_finished()
        ckpt.close()
    return state
