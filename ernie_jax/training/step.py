"""One training step `(state, frozen, batch) -> (state, metrics)`: an objective's loss over the named
models, gradients accumulated over microbatches, one optimizer update and EMA per trainable part; and its
sharded, donating jit.

The objective (`training.objectives`) says which batch keys it reads, which models it trains and which it
only reads; `frozen` holds the frozen states (the rest of a trainable part, such as a LoRA's base, and
whole frozen models, such as a DPO reference) by name. The frozen encoders run before the step (or the data
holds their outputs). Batch keys the objective does not read are ignored.

Gradient accumulation is an explicit `lax.scan` over `microbatches` slices of the batch inside the one
compiled step, rather than `optax.MultiSteps`: the optimizer, schedule, EMA and checkpoint interval all
count real updates; no gradient accumulator lives in the optimizer state (nor in checkpoints); one
host call and one batch from the data pipeline per update; and only one microbatch's activations are
alive at a time. Each example draws its randomness from its own key (`objectives.example_keys`), split
with the rows, so k microbatches compute the same update as one batch of k times the size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ernie_jax import parallel
from ernie_jax.training.objectives import Objective, example_keys
from ernie_jax.training.state import TrainablePart, TrainState, ema_update

Metrics = dict[str, jax.Array]


def step_key(state: TrainState) -> jax.Array:
    """The key of the update from `state.step`: a function of the base key and the step only."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def batch_keys(objective: Objective, batch: Mapping) -> tuple[str, ...]:
    """The keys of `batch` the step passes to `objective`: its `batch_keys` (all required) and those of its
    `optional_batch_keys` the batch has."""
    missing = [k for k in objective.batch_keys if k not in batch]
    if missing:
        raise KeyError(f"the batch lacks {missing}; the objective reads {tuple(objective.batch_keys)}, got "
                       f"{sorted(batch)}")
    return (*objective.batch_keys, *(k for k in getattr(objective, "optional_batch_keys", ()) if k in batch))


def _microbatches(tree, count: int):
    """Leading axis B -> [count, B / count]: microbatch i holds rows i, i + count, ... so that each device's
    rows of a batch-sharded array stay on that device."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, tree)


def _merge(graphdef: nnx.GraphDef, *states) -> nnx.Module:
    return nnx.merge(graphdef, *(s for s in states if s is not None))


def make_train_step(parts: Mapping[str, TrainablePart], graphdefs: Mapping[str, nnx.GraphDef], objective: Objective,
                    *, microbatches: int = 1) -> Callable[[TrainState, dict, dict], tuple]:
    """The pure step `(state, frozen, batch) -> (new state, metrics)`.

    `graphdefs` names the graphdef of every trainable part and frozen model; `frozen` (at call time) the
    state of every frozen model the objective reads, and the rest of a trainable part where it has one.
    metrics: the objective's, `grad_norm` (over all parts, before clipping) and each part's
    `learning_rate` (given its schedule); with several parts also `grad_norm/NAME` and `learning_rate/NAME`.
    """
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    if sorted(objective.trains) != sorted(parts):
        raise ValueError(f"the objective trains {sorted(objective.trains)} but the trainable parts are "
                         f"{sorted(parts)}: every part needs gradients and every trained model a part")
    unknown = sorted(set(objective.reads) - set(graphdefs))
    if unknown or set(objective.reads) & set(parts):
        raise ValueError(f"the objective reads {sorted(objective.reads)}: each must be a frozen model with a "
                         f"graphdef and not a trainable part (graphdefs: {sorted(graphdefs)})")

    def loss_fn(params, frozen, micro, keys):
        trainable = {name: _merge(graphdefs[name], params[name], frozen.get(name)) for name in parts}
        for index, (name, part) in enumerate(parts.items()):
            if part.stochastic is not None:
                # The first example's key, folded away from what the objective draws from it.
                part.stochastic(trainable[name], jax.random.fold_in(keys[0], 2**31 - 1 - index))
        read = {name: nnx.merge(graphdefs[name], frozen[name]) for name in objective.reads}
        return objective.loss(trainable, read, micro, keys)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, Metrics]:
        inputs = {k: batch[k] for k in batch_keys(objective, batch)}
        size = jax.tree.leaves(inputs)[0].shape[0]
        if size % microbatches:
            raise ValueError(f"batch size {size} is not divisible by microbatches={microbatches}")
        keys = example_keys(step_key(state), size)

        def accumulate(total, micro):
            (_, metrics), grads = grad_fn(state.params, frozen, *micro)
            return jax.tree.map(jnp.add, total, (grads, metrics)), None

        split = _microbatches((inputs, keys), microbatches)
        first = jax.tree.map(lambda x: x[0], split)
        metric_shapes = jax.eval_shape(lambda: loss_fn(state.params, frozen, *first)[1])
        zeros = jax.tree.map(jnp.zeros_like, state.params), jax.tree.map(
            lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes)
        total, _ = jax.lax.scan(accumulate, zeros, split)
        grads, metrics = jax.tree.map(lambda x: x / microbatches, total)
        params, opt_state, ema_params = {}, {}, {}
        for name, part in parts.items():
            updates, opt_state[name] = part.optimizer.update(grads[name], state.opt_state[name], state.params[name])
            params[name] = optax.apply_updates(state.params[name], updates)
            ema_params[name] = ema_update(state.ema_params[name], params[name], part.ema_decay)
        metrics["grad_norm"] = optax.global_norm(grads)
        for name, part in parts.items():
            suffix = f"/{name}" if len(parts) > 1 else ""
            if suffix:
                metrics[f"grad_norm{suffix}"] = optax.global_norm(grads[name])
            if part.learning_rate is not None:
                metrics[f"learning_rate{suffix}"] = part.learning_rate(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
        return new_state, metrics

    return step


def batch_shardings(mesh: Mesh, rules: parallel.Rules, batch: dict) -> dict[str, NamedSharding]:
    """Each batch array split along its leading (batch) axis by the rules."""
    return {k: parallel.batch_sharding(mesh, rules, jnp.shape(v)) for k, v in batch.items()}


def jit_train_step(step, mesh: Mesh, rules: parallel.Rules, state_shardings, frozen_shardings, batch_sharding: dict):
    """`step` compiled with the state in `state_shardings` (donated: the new state reuses its buffers), the
    frozen states in `frozen_shardings` (kept), the batch in `batch_sharding`, replicated metrics, and
    activations pinned by `rules`."""
    return parallel.jit_sharded(step, mesh, rules, (state_shardings, frozen_shardings, batch_sharding),
                                (state_shardings, parallel.replicated(mesh)),
                                donate_argnums=(0,))
