"""One training step `(state, batch) -> (state, metrics)`: flow-matching loss, gradients accumulated over
microbatches, one optimizer update, EMA; and its sharded, donating jit.

A batch is a dict of `latents [B, C, H, W]` (clean, normalised VAE latents), `text [B, T, D]` (zero-padded
text-encoder features) and `text_lens [B]`; the frozen VAE and text encoder run before it (or the data
holds their outputs). Other keys are ignored.

Gradient accumulation is an explicit `lax.scan` over `microbatches` slices of the batch inside the one
compiled step, rather than `optax.MultiSteps`: the optimizer, schedule, EMA and checkpoint interval all
count real updates; no gradient accumulator lives in the optimizer state (nor in checkpoints); one
host call and one batch from the data pipeline per update; and only one microbatch's activations are
alive at a time. The noise, sigmas and text dropout of the whole batch are drawn before the split, so k
microbatches compute the same update as one batch of k times the size.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ernie_jax import parallel
from ernie_jax.training.objectives import flow_matching
from ernie_jax.training.state import TrainState, ema_update

BATCH_KEYS = ("latents", "text", "text_lens")

Metrics = dict[str, jax.Array]


def step_key(state: TrainState) -> jax.Array:
    """The key of the update from `state.step`: a function of the base key and the step only."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def _microbatches(tree, count: int):
    """Leading axis B -> [count, B / count]: microbatch i holds rows i, i + count, ... so that each device's
    rows of a batch-sharded array stay on that device."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, tree)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    objective: flow_matching.FlowMatchingConfig, *, ema_decay: float, microbatches: int = 1,
                    empty_prompt: flow_matching.EmptyPrompt | None = None,
                    learning_rate_fn: optax.Schedule | None = None) -> Callable[[TrainState, dict], tuple]:
    """The pure step `(state, batch) -> (new state, metrics)`.

    metrics: `loss` (weighted, as optimised), `mse`, `grad_norm` (before clipping) and, given
    `learning_rate_fn`, `learning_rate` of this update. `empty_prompt` (the frozen encoder's features of
    "") is required when `objective.text_dropout > 0`.
    """
    if objective.text_dropout > 0 and empty_prompt is None:
        raise ValueError("text_dropout > 0 needs the empty prompt's features (empty_prompt)")
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    if not 0.0 <= ema_decay <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")

    def loss_fn(params, micro, draw):
        model = nnx.merge(graphdef, params)
        return flow_matching.flow_matching_loss(model, micro["latents"], micro["text"], micro["text_lens"], draw,
                                             weighting=objective.weighting, empty_prompt=empty_prompt)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing}; it needs {BATCH_KEYS}")
        inputs = {k: batch[k] for k in BATCH_KEYS}
        size = inputs["latents"].shape[0]
        if size % microbatches:
            raise ValueError(f"batch size {size} is not divisible by microbatches={microbatches}")
        draw = flow_matching.draw_noise(step_key(state), inputs["latents"].shape, objective)

        def accumulate(total, micro):
            (_, metrics), grads = grad_fn(state.params, *micro)
            return jax.tree.map(jnp.add, total, (grads, metrics)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params), {"loss": jnp.float32(0), "mse": jnp.float32(0)}
        total, _ = jax.lax.scan(accumulate, zeros, _microbatches((inputs, draw), microbatches))
        grads, metrics = jax.tree.map(lambda x: x / microbatches, total)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        if learning_rate_fn is not None:
            metrics["learning_rate"] = learning_rate_fn(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_update(state.ema_params, params, ema_decay))
        return new_state, metrics

    return step


def batch_shardings(mesh: Mesh, rules: parallel.Rules, batch: dict) -> dict[str, NamedSharding]:
    """Each batch array split along its leading (batch) axis by the rules."""
    return {k: parallel.batch_sharding(mesh, rules, jnp.shape(v)) for k, v in batch.items()}


def jit_train_step(step, mesh: Mesh, rules: parallel.Rules, state_shardings, batch_sharding: dict):
    """`step` compiled with the state in `state_shardings` (donated: the new state reuses its buffers), the
    batch in `batch_sharding`, replicated metrics, and activations pinned by `rules`."""
    return parallel.jit_sharded(step, mesh, rules, (state_shardings, batch_sharding),
                                (state_shardings, parallel.replicated(mesh)),
                                donate_argnums=(0,))
