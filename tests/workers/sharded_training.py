"""Runs two training steps of the tiny DiT (float32, text dropout, 2 microbatches)
on one device and on 8-device meshes and prints, as JSON, per mesh: the largest relative error of the
losses, parameters, EMA parameters and Adam moments against the single-device run, and how one kernel,
its first Adam moment and the batch are split.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/workers/sharded_training.py MESH...
(MESH as in MESHES, e.g. fsdp=4,tensor=2)
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import numpy as np

from ernie_jax import parallel
from ernie_jax.training import state, step
from tests.workers.common import relative_error
from tests.workers.training_run import dataset, objective, parts, train_config

# Name -> the mesh; "explicit" is made the standard JAX way (jax.make_mesh: Explicit axes).
MESHES = {"fsdp=4,tensor=2": lambda: parallel.make_mesh({"fsdp": 4, "tensor": 2}),
          "data=2,fsdp=4": lambda: parallel.make_mesh({"data": 2, "fsdp": 4}),
          "fsdp=4,tensor=2,explicit": lambda: jax.make_mesh((1, 4, 1, 2), parallel.MESH_AXES)}
BATCH = 8
STEPS = 2


def run(mesh):
    """(losses, final state on the host, shard shapes) of STEPS updates on `mesh`."""
    config = dataclasses.replace(train_config(STEPS, 1), microbatches=2)
    rules = parallel.TRAINING_RULES
    trainable = parts()
    graphdefs, train_state = state.create_train_state(trainable, seed=config.seed, mesh=mesh, rules=rules)
    step_fn = step.make_train_step(trainable, graphdefs, objective(), microbatches=config.microbatches)
    batches = [{k: v for k, v in b.items() if k != "index"} for b in dataset(STEPS, batch=BATCH)]
    shardings = step.batch_shardings(mesh, rules, batches[0])
    compiled = step.jit_train_step(step_fn, mesh, rules, jax.tree.map(lambda x: x.sharding, train_state), {},
                                   shardings)
    losses = []
    for batch in batches:
        batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
        train_state, metrics = compiled(train_state, {}, batch)
        losses.append(float(metrics["loss"]))
    kernel = train_state.params["transformer"]["layers"]["mlp"]["gate_proj"]["kernel"][...]
    moment = train_state.opt_state["transformer"][1][0].mu["layers"]["mlp"]["gate_proj"]["kernel"][...]
    shards = {"kernel": list(kernel.shape), "kernel_shard": list(kernel.addressable_shards[0].data.shape),
              "moment_shard": list(moment.addressable_shards[0].data.shape),
              "latents_shard": list(batch["latents"].addressable_shards[0].data.shape)}
    return np.array(losses), jax.device_get(train_state), shards


def main(names):
    expected_losses, expected, _ = run(parallel.make_mesh({}, devices=jax.devices()[:1]))
    results = {}
    for name in names:
        losses, actual, shards = run(MESHES[name]())
        errors = {part: max(relative_error(a, e) for a, e in zip(jax.tree.leaves(getattr(actual, part)),
                                                                  jax.tree.leaves(getattr(expected, part))))
                  for part in ("params", "ema_params", "opt_state")}
        results[name] = dict(loss=relative_error(losses, expected_losses), **errors, **shards,
                             losses=losses.tolist(), step=int(actual.step))
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
