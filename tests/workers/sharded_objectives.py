"""Runs one update of a post-training objective on random tiny DiTs on one device and on meshes, and
prints, as JSON, per mesh: the largest relative error of the metrics, parameters, EMA parameters and Adam
moments against the single-device run, and how the trained DiT's kernel and the batch are split.

- dmd: one DMD step (5 critic + GAN-head updates, then one generator update) of a student and critic against
  a frozen teacher;
- dpo: one stabilized-DPO update (anchors, weighted pairs) of a policy against a frozen reference.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/workers/sharded_objectives.py OBJECTIVE MESH...
(OBJECTIVE dmd or dpo, MESH as in MESHES, e.g. data=2,fsdp=2,tensor=2; 4 devices are enough for fsdp=2,tensor=2)
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from flax import nnx

from ernie_jax import parallel
from ernie_jax.training import state, step
from ernie_jax.training.objectives import dmd, dpo
from ernie_jax.training.objectives.flow_matching import EmptyPrompt
from tests.workers.common import relative_error
from tests.workers.training_run import CONFIG, LATENT_SHAPE, OPTIMIZER, TEXT_DIM, TEXT_LEN, tiny_model

# Every axis the trainer shards over at once: weights over fsdp x tensor, the batch over data x fsdp.
MESHES = {"data=2,fsdp=2,tensor=2": lambda: parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
          "fsdp=4,tensor=2": lambda: parallel.make_mesh({"fsdp": 4, "tensor": 2}),
          "fsdp=2,tensor=2": lambda: parallel.make_mesh({"fsdp": 2, "tensor": 2})}
# DMD: six updates a step, each on its own slice, each slice split 4 ways over data x fsdp.
DMD_BATCH = 6 * 4
DMD_SETTINGS = dmd.Config(student_steps=2, student_shift=3.0, guidance_scale=3.0, gan_weight=0.5, gan_hidden=8,
                          critic={"sigma_scheme": "uniform", "text_dropout": 0.25})
# DPO: eight pairs split 4 ways; the report's anchors, errors summed over the latent (beta in mean units).
DPO_BATCH = 8
DPO_SETTINGS = dpo.DPOConfig(beta=0.05 * int(np.prod(LATENT_SHAPE)), lambda_win=0.35, lambda_lose=0.15,
                             reduction="sum", weighted_pairs=True)


def random_model(rngs: nnx.Rngs) -> nnx.Module:
    """The tiny DiT with noise on every weight: its zero-initialised output layer would make every velocity 0."""
    model = tiny_model(rngs)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(rngs.params(), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [leaf + 0.05 * jax.random.normal(key, leaf.shape, leaf.dtype)
                                                   for leaf, key in zip(leaves, keys)]))
    return model


def dmd_setup():
    """(objective, trained parts' builders, frozen models, batch) of the DMD step."""
    rng = np.random.default_rng(0)
    empty = EmptyPrompt(np.random.default_rng(1234).standard_normal((1, TEXT_DIM), np.float32), 1)
    builders = {"transformer": random_model, "critic": random_model,
                "discriminator": dmd.part_models(DMD_SETTINGS)["discriminator"](CONFIG)}
    batch = {"latents": rng.standard_normal((DMD_BATCH, *LATENT_SHAPE), np.float32),
             "text": rng.standard_normal((DMD_BATCH, TEXT_LEN, TEXT_DIM), np.float32),
             "text_lens": rng.integers(1, TEXT_LEN + 1, DMD_BATCH).astype(np.int32)}
    return dmd.DMD(DMD_SETTINGS, empty), builders, {"teacher": random_model(nnx.Rngs(7))}, batch


def dpo_setup():
    """(objective, trained parts' builders, frozen models, batch) of the DPO update."""
    rng = np.random.default_rng(0)
    batch = {"latents_chosen": rng.standard_normal((DPO_BATCH, *LATENT_SHAPE), np.float32),
             "latents_rejected": rng.standard_normal((DPO_BATCH, *LATENT_SHAPE), np.float32),
             "text_bth": rng.standard_normal((DPO_BATCH, TEXT_LEN, TEXT_DIM), np.float32),
             "text_lens": rng.integers(1, TEXT_LEN + 1, DPO_BATCH).astype(np.int32),
             "pair_weights": rng.uniform(0.5, 1.0, DPO_BATCH).astype(np.float32)}
    return dpo.DPO(DPO_SETTINGS), {"transformer": random_model}, {"reference": random_model(nnx.Rngs(7))}, batch


OBJECTIVES = {"dmd": dmd_setup, "dpo": dpo_setup}


def run(objective_name: str, mesh):
    """(metrics, final state on the host, shard shapes) of one update of `objective_name` on `mesh`."""
    from ernie_jax.training.optimizer import learning_rate_schedule, make_optimizer

    rules = parallel.TRAINING_RULES
    objective, builders, frozen_models, batch = OBJECTIVES[objective_name]()
    parts = {name: state.TrainablePart(build, make_optimizer(OPTIMIZER), ema_decay=0.9,
                                       learning_rate=learning_rate_schedule(OPTIMIZER))
             for name, build in builders.items()}
    graphdefs, train_state = state.create_train_state(parts, seed=0, mesh=mesh, rules=rules)
    graphdefs = {**graphdefs, **{name: nnx.graphdef(model) for name, model in frozen_models.items()}}
    frozen = {name: state.place(nnx.state(model), mesh, rules) for name, model in frozen_models.items()}
    shardings = step.batch_shardings(mesh, rules, batch)
    step_fn = step.make_train_step(parts, graphdefs, objective)
    compiled = step.jit_train_step(step_fn, mesh, rules, jax.tree.map(lambda x: x.sharding, train_state),
                                   jax.tree.map(lambda x: x.sharding, frozen), shardings)
    batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
    train_state, metrics = compiled(train_state, frozen, batch)
    kernel = train_state.params["transformer"]["layers"]["mlp"]["gate_proj"]["kernel"][...]
    first_key = next(iter(batch))
    shards = {"kernel_shard": list(kernel.addressable_shards[0].data.shape),
              "batch_shard": list(batch[first_key].addressable_shards[0].data.shape)}
    return {k: float(v) for k, v in metrics.items()}, jax.device_get(train_state), shards


def main(objective_name: str, names: list[str]):
    expected_metrics, expected, _ = run(objective_name, parallel.make_mesh({}, devices=jax.devices()[:1]))
    results = {}
    for name in names:
        metrics, actual, shards = run(objective_name, MESHES[name]())
        errors = {part: max(relative_error(a, e) for a, e in zip(jax.tree.leaves(getattr(actual, part)),
                                                                  jax.tree.leaves(getattr(expected, part))))
                  for part in ("params", "ema_params", "opt_state")}
        # Each metric against its own size (the losses and norms differ by orders of magnitude).
        metric_errors = {k: abs(metrics[k] - v) / max(abs(v), 1e-12) for k, v in expected_metrics.items()}
        worst = max(metric_errors, key=metric_errors.get)
        results[name] = dict(metrics=metric_errors[worst], worst_metric=worst, **errors, **shards,
                             values=metrics)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
