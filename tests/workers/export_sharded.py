"""The runner's export stage on a fully sharded EMA: a checkpoint of the tiny experiment's DiT written on an
8-device fsdp mesh, whose optimizer state is left out (export must not read it), exported with
the export stage; `run` reports the largest difference between the exported transformer and the EMA
weights converted on the host, and how one EMA kernel was split. Run by tests/workers/sharded_runner.py.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from conversions import mistral, vae
from conversions.random_checkpoint import write_random_pipeline
from conversions.transformer import transformer_state_dict
from ernie_jax import parallel
from ernie_jax.runner.config import resolve
from ernie_jax.runner.stages import export
from ernie_jax.runner.stages.train import trainable_parts
from ernie_jax.training.checkpoints import Checkpoints
from ernie_jax.training.state import create_train_state
from experiments.tiny_shapes import get_config


def run(workdir: Path) -> dict:
    components = workdir / "components"
    write_random_pipeline(components, "tiny")
    config = get_config("tiny")
    config.components.update(kind="pretrained", path=str(components))
    config.mesh.ici.fsdp = 8
    config.stages = ("export",)
    experiment = resolve(config, workdir)
    transformer_config = experiment.transformer_config(
        mistral.open_text_encoder(components / "text_encoder").config.hidden_size,
        vae.open_vae(components / "vae").config.packed_channels)
    graphdefs, state = create_train_state(trainable_parts(experiment, transformer_config), seed=config.seed,
                                          mesh=experiment.mesh(), rules=parallel.TRAINING_RULES)
    # Unlike the parameters, so the choice shows.
    ema = {"transformer": jax.tree.map(lambda p: 0.5 * p + 0.125, state.params["transformer"])}
    # No optimizer state in the checkpoint: restoring it would fail.
    state = state.replace(step=state.step + experiment.train.num_steps, ema_params=ema, opt_state=())
    checkpoints = Checkpoints(workdir / "checkpoints")
    checkpoints.save(experiment.train.num_steps, state)
    checkpoints.wait_until_finished()
    checkpoints.close()
    export.run(experiment)

    exported = {}
    for path in sorted((workdir / "pipeline" / "transformer").glob("*.safetensors")):
        exported.update(load_file(path))
    expected = transformer_state_dict(nnx.merge(graphdefs["transformer"], jax.device_get(ema["transformer"])))
    assert sorted(exported) == sorted(expected)
    kernel = ema["transformer"]["layers"]["mlp"]["gate_proj"]["kernel"][...]
    return {"max_difference": max(float(np.abs(exported[k] - expected[k]).max()) for k in expected),
            "dtypes": sorted({str(v.dtype) for v in exported.values()}),
            "kernel_shape": list(kernel.shape), "kernel_shard": list(kernel.sharding.shard_shape(kernel.shape))}

