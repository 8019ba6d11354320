"""One training step `(state, frozen, batch) -> (state, metrics)`: an objective's loss over the named
models, gradients accumulated over microbatches, one optimizer update and EMA per trainable part (or, for an
objective with several `updates`, such as distillation's critic and generator, those updates in turn); and
its sharded, donating jit.

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
from ernie_jax.training.objectives import Objective, example_keys, updates_of
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

    The step runs the objective's updates (`objectives.updates_of`) in order, update u `repeats` times; with
    S runs in all, run j reads slice j of the batch (rows j, j + S, j + 2S, ...: a batch-sharded array's
    slices stay on their devices) and those rows' keys, so the batch size must be a multiple of
    S x microbatches. Each run steps the optimizer and EMA of the parts its update trains.

    metrics: per update, its loss's metrics (averaged over its runs) and its `grad_norm` (over its parts,
    before clipping), prefixed `NAME/` when the update has a name; with several parts also `grad_norm/PART`
    of an unnamed update; each part's `learning_rate` (given its schedule, at its first update of the step;
    suffixed `/PART` with several parts). An objective metric named like the gradient norms is refused.
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
    updates = updates_of(objective)
    runs = sum(update.repeats for update in updates)
    # How many optimizer updates each part makes per step: its schedule's count advances by that much.
    updates_per_step = {name: sum(u.repeats for u in updates if name in u.trains) for name in parts}
    part_index = {name: index for index, name in enumerate(parts)}

    def loss_fn(update, params, others, frozen, micro, keys):
        trainable = {name: _merge(graphdefs[name], params[name], frozen.get(name)) for name in update.trains}
        for name in update.trains:
            if parts[name].stochastic is not None:
                # The first example's key, folded away from what the objective draws from it.
                parts[name].stochastic(trainable[name], jax.random.fold_in(keys[0], 2**31 - 1 - part_index[name]))
        read = {name: nnx.merge(graphdefs[name], frozen[name]) for name in objective.reads}
        read.update({name: _merge(graphdefs[name], others[name], frozen.get(name)) for name in others})
        return update.loss(trainable, read, micro, keys)

    def gradients(update, params, others, frozen, inputs, keys):
        """The update's loss gradients and metrics on one slice, averaged over its microbatches."""
        grad_fn = jax.value_and_grad(lambda p, *rest: loss_fn(update, p, *rest), has_aux=True)

        def accumulate(total, micro):
            (_, metrics), grads = grad_fn(params, others, frozen, *micro)
            return jax.tree.map(jnp.add, total, (grads, metrics)), None

        split = _microbatches((inputs, keys), microbatches)
        first = jax.tree.map(lambda x: x[0], split)
        metric_shapes = jax.eval_shape(lambda: loss_fn(update, params, others, frozen, *first)[1])
        zeros = jax.tree.map(jnp.zeros_like, params), jax.tree.map(
            lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes)
        total, _ = jax.lax.scan(accumulate, zeros, split)
        return jax.tree.map(lambda x: x / microbatches, total)

    def run_update(update, params, opt_state, ema_params, frozen, inputs, keys):
        """One run of `update` on one slice: the new (params, opt_state, ema_params) of its parts and its
        metrics, with `grad_norm` (and `grad_norm/PART` for an unnamed update of several parts)."""
        trained = {name: params[name] for name in update.trains}
        others = {name: params[name] for name in parts if name not in update.trains}
        grads, metrics = gradients(update, trained, others, frozen, inputs, keys)
        new_params, new_opt, new_ema = dict(params), dict(opt_state), dict(ema_params)
        for name in update.trains:
            change, new_opt[name] = parts[name].optimizer.update(grads[name], opt_state[name], params[name])
            new_params[name] = optax.apply_updates(params[name], change)
            if name in ema_params:
                new_ema[name] = ema_update(ema_params[name], new_params[name], parts[name].ema_decay)
        norms = {"grad_norm": optax.global_norm(grads)}
        if not update.name and len(update.trains) > 1:
            norms.update({f"grad_norm/{name}": optax.global_norm(grads[name]) for name in update.trains})
        clash = sorted(set(norms) & set(metrics))
        if clash:  # the trainer's norms would silently replace the objective's values
            raise ValueError(f"the objective's metrics {clash} have the names of the trainer's gradient norms; "
                             f"rename them")
        metrics.update(norms)
        return (new_params, new_opt, new_ema), metrics

    def step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, Metrics]:
        inputs = {k: batch[k] for k in batch_keys(objective, batch)}
        size = jax.tree.leaves(inputs)[0].shape[0]
        if size % (runs * microbatches):
            raise ValueError(f"batch size {size} is not divisible by microbatches={microbatches} x {runs} "
                             f"update run(s) per step")
        keys = example_keys(step_key(state), size)
        slices = (jax.tree.map(lambda x: x[None], (inputs, keys)) if runs == 1
                  else _microbatches((inputs, keys), runs))
        carry = (state.params, state.opt_state, state.ema_params)
        metrics, start = {}, 0
        for update in updates:
            if update.repeats == 1:
                carry, update_metrics = run_update(update, *carry, frozen,
                                                   *jax.tree.map(lambda x, i=start: x[i], slices))
            else:
                def repeat(carry, data, update=update):
                    return run_update(update, *carry, frozen, *data)

                carry, per_run = jax.lax.scan(
                    repeat, carry, jax.tree.map(lambda x, i=start, n=update.repeats: x[i:i + n], slices))
                update_metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), per_run)
            prefix = f"{update.name}/" if update.name else ""
            metrics.update({prefix + k: v for k, v in update_metrics.items()})
            start += update.repeats
        for name, part in parts.items():
            if part.learning_rate is not None:
                suffix = f"/{name}" if len(parts) > 1 else ""
                metrics[f"learning_rate{suffix}"] = part.learning_rate(state.step * updates_per_step[name])
        params, opt_state, ema_params = carry
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
