"""Runs one DMD step (5 critic + GAN-head updates, then one generator update) of a random tiny DiT student and
critic against a frozen random tiny DiT teacher on one device and on 8-device meshes, and prints, as JSON, per
mesh: the largest relative error of the metrics, parameters, EMA parameters and Adam moments against the
single-device run, and how the student's kernel and the batch are split.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/workers/sharded_dmd.py MESH...
(MESH as in MESHES, e.g. data=2,fsdp=2,tensor=2)
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from flax import nnx

from ernie_jax import parallel
from ernie_jax.training import state, step
from ernie_jax.training.objectives import dmd
from ernie_jax.training.objectives.flow_matching import EmptyPrompt
from tests.workers.common import relative_error
from tests.workers.training_run import CONFIG, LATENT_SHAPE, OPTIMIZER, TEXT_DIM, TEXT_LEN, tiny_model

# Every axis the trainer shards over at once: weights over fsdp x tensor, the batch over data x fsdp.
MESHES = {"data=2,fsdp=2,tensor=2": lambda: parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
          "fsdp=4,tensor=2": lambda: parallel.make_mesh({"fsdp": 4, "tensor": 2})}
# Six updates a step, each on its own slice, each slice split 4 ways over data x fsdp.
BATCH = 6 * 4
SETTINGS = dmd.Config(student_steps=2, student_shift=3.0, guidance_scale=3.0, gan_weight=0.5, gan_hidden=8,
                      critic={"sigma_scheme": "uniform", "text_dropout": 0.25})


def random_model(rngs: nnx.Rngs) -> nnx.Module:
    """The tiny DiT with noise on every weight: its zero-initialised output layer would make every velocity 0."""
    model = tiny_model(rngs)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(rngs.params(), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [leaf + 0.05 * jax.random.normal(key, leaf.shape, leaf.dtype)
                                                   for leaf, key in zip(leaves, keys)]))
    return model


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"latents": rng.standard_normal((BATCH, *LATENT_SHAPE), np.float32),
            "text": rng.standard_normal((BATCH, TEXT_LEN, TEXT_DIM), np.float32),
            "text_lens": rng.integers(1, TEXT_LEN + 1, BATCH).astype(np.int32)}


def run(mesh):
    """(metrics, final state on the host, shard shapes) of one DMD step on `mesh`."""
    from ernie_jax.training.optimizer import learning_rate_schedule, make_optimizer

    rules = parallel.TRAINING_RULES
    empty = EmptyPrompt(np.random.default_rng(1234).standard_normal((1, TEXT_DIM), np.float32), 1)
    objective = dmd.DMD(SETTINGS, empty)
    builders = {"transformer": random_model, "critic": random_model,
                "discriminator": dmd.part_models(SETTINGS)["discriminator"](CONFIG)}
    parts = {name: state.TrainablePart(build, make_optimizer(OPTIMIZER), ema_decay=0.9,
                                       learning_rate=learning_rate_schedule(OPTIMIZER))
             for name, build in builders.items()}
    graphdefs, train_state = state.create_train_state(parts, seed=0, mesh=mesh, rules=rules)
    teacher = random_model(nnx.Rngs(7))
    graphdefs = {**graphdefs, "teacher": nnx.graphdef(teacher)}
    frozen = {"teacher": state.place(nnx.state(teacher), mesh, rules)}
    batch = inputs()
    shardings = step.batch_shardings(mesh, rules, batch)
    step_fn = step.make_train_step(parts, graphdefs, objective)
    compiled = step.jit_train_step(step_fn, mesh, rules, jax.tree.map(lambda x: x.sharding, train_state),
                                   jax.tree.map(lambda x: x.sharding, frozen), shardings)
    batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
    train_state, metrics = compiled(train_state, frozen, batch)
    kernel = train_state.params["transformer"]["layers"]["mlp"]["gate_proj"]["kernel"][...]
    shards = {"kernel_shard": list(kernel.addressable_shards[0].data.shape),
              "latents_shard": list(batch["latents"].addressable_shards[0].data.shape)}
    return {k: float(v) for k, v in metrics.items()}, jax.device_get(train_state), shards


def main(names):
    expected_metrics, expected, _ = run(parallel.make_mesh({}, devices=jax.devices()[:1]))
    results = {}
    for name in names:
        metrics, actual, shards = run(MESHES[name]())
        errors = {part: max(relative_error(a, e) for a, e in zip(jax.tree.leaves(getattr(actual, part)),
                                                                  jax.tree.leaves(getattr(expected, part))))
                  for part in ("params", "ema_params", "opt_state")}
        # Each metric against its own size (the losses and norms differ by orders of magnitude).
        metric_errors = {k: abs(metrics[k] - v) / max(abs(v), 1e-12) for k, v in expected_metrics.items()}
        worst = max(metric_errors, key=metric_errors.get)
        results[name] = dict(metrics=metric_errors[worst], worst_metric=worst, **errors, **shards,
                             generator_loss=metrics["generator/loss"], critic_loss=metrics["critic/loss"])
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
