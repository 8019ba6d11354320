"""Stage `export`: the trained transformer (its EMA unless `export.use_ema` is False or its `ema_decay` is 0,
which keeps none) with the frozen components, in the diffusers layout, in WORKDIR/pipeline:
`ErnieImagePipeline.from_pretrained` and `python -m ernie_jax.generate --model WORKDIR/pipeline` load it.
With LoRA (`config.lora.rank > 0`) the transformer there is the base with the adapters merged, and
WORKDIR/pipeline/lora/pytorch_lora_weights.safetensors holds the adapters in the diffusers/PEFT format
(diffusers: `pipe.load_lora_weights(WORKDIR / "pipeline" / "lora")` on the base pipeline)."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.runner.config import Experiment
from ernie_jax.runner.stages import latest_step, say

ENCODER_FOLDERS = ("vae", "text_encoder", "tokenizer")
# The file name diffusers' `load_lora_weights(folder)` looks for.
LORA_FILE = "pytorch_lora_weights.safetensors"


def _link_or_copy(source: str, destination: str) -> None:
    """Hard-links a file (no copy of large weights on the same file system), else copies it."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def trained_transformer(experiment: Experiment, *, ema: bool, step: int) -> nnx.Module:
    """The transformer of checkpoint `step` (its EMA weights, or with `ema=False` the trained ones) in the
    shardings training used; with LoRA the adapters on the frozen base they were trained on."""
    from conversions import mistral, vae
    from ernie_jax.models import lora
    from ernie_jax.runner.stages.train import initial_models, trainable_parts
    from ernie_jax.training.checkpoints import Checkpoints
    from ernie_jax.training.state import abstract_train_state, split_part

    components = experiment.components_dir
    transformer_config = experiment.transformer_config(
        mistral.open_text_encoder(components / "text_encoder").config.hidden_size,
        vae.open_vae(components / "vae").config.packed_channels)
    mesh = experiment.mesh()
    graphdefs, abstract = abstract_train_state(trainable_parts(experiment, transformer_config),
                                               seed=experiment.config.seed, mesh=mesh, rules=experiment.rules)
    checkpoints = Checkpoints(experiment.workdir / "checkpoints")
    try:
        weights = checkpoints.restore_weights(abstract, ema=ema, step=step)["transformer"]
    finally:
        checkpoints.close()
    if experiment.lora is None:
        return nnx.merge(graphdefs["transformer"], weights)
    base = initial_models(experiment, transformer_config, mesh, experiment.rules, fresh=True)["transformer"]
    return nnx.merge(graphdefs["transformer"], weights, split_part(base, lora.LoRAParam)[2])


def run(experiment: Experiment) -> None:
    from conversions import transformer
    from conversions.common import atomic_directory
    from conversions.lora import save_lora
    from conversions.safetensors_io import write_sharded
    from ernie_jax import parallel
    from ernie_jax.models import lora

    config, workdir, num_steps = experiment.config, experiment.workdir, experiment.train.num_steps
    destination = workdir / "pipeline"
    if destination.exists():
        say(f"export: done ({destination})")
        return
    done = latest_step(workdir / "checkpoints")
    if done != num_steps:
        raise ValueError(f"export: training is not finished ({done or 0} of {num_steps} updates in "
                         f"{workdir / 'checkpoints'}); run the train stage first")
    model = trained_transformer(experiment, ema=config.export.use_ema, step=done)
    components, transformer_config = experiment.components_dir, model.config
    dtype = jnp.dtype(config.export.dtype)

    def on_host(module: nnx.Module, cast) -> nnx.Module:
        # Cast where the weights lie, then gathered by every process (a collective); only the first writes.
        graphdef, state = nnx.split(module)
        return nnx.merge(graphdef, jax.tree.map(lambda value: parallel.to_host(cast(value)), state))

    adapted = None if experiment.lora is None else on_host(model, lambda value: value)
    merged = on_host(model if adapted is None else lora.merge_lora(model), lambda value: value.astype(dtype))
    if jax.process_index() != 0:
        return
    tensors = transformer.transformer_state_dict(merged)
    with atomic_directory(destination) as staging:
        for name in ENCODER_FOLDERS:
            shutil.copytree(components / name, staging / name, copy_function=_link_or_copy)
        if adapted is not None:
            (staging / "lora").mkdir()
            save_lora(adapted, staging / "lora" / LORA_FILE)
        (staging / "transformer").mkdir()
        write_sharded(staging / "transformer", "diffusion_pytorch_model", tensors, 5 * 10**9)
        (staging / "transformer" / "config.json").write_text(
            json.dumps(transformer.diffusers_config(transformer_config), indent=2) + "\n")
        scheduler = json.loads((components / "scheduler" / "scheduler_config.json").read_text())
        scheduler["shift"] = float(config.components.scheduler_shift)
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        index = json.loads((components / "model_index.json").read_text())
        index.update(pe=[None, None], pe_tokenizer=[None, None])
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    averaged = config.export.use_ema and experiment.part_settings("transformer")[1] > 0
    say(f"export: wrote {destination} (step {done}, {'EMA' if averaged else 'trained'} weights, "
         f"{config.export.dtype})")
