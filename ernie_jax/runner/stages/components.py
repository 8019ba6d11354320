"""Stage `components`: the frozen VAE, text encoder and tokenizer as a pipeline folder (diffusers layout,
placeholder transformer) in WORKDIR/components. `components.kind`: "shapes" trains a small VAE on the shapes
dataset (ernie_jax.training.components), "random" writes tiny random ones (conversions.random_checkpoint),
"pretrained" uses `components.path` as it is."""

from __future__ import annotations

import dataclasses

from ernie_jax.runner.config import Experiment
from ernie_jax.runner.stages import say


def run(experiment: Experiment) -> None:
    c = experiment.config.components
    folder = experiment.components_dir
    if c.kind == "pretrained":
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"config.components.path {folder}: no model_index.json (not a pipeline folder)")
        say(f"components: using {folder}")
        return
    if folder.exists():
        say(f"components: done ({folder})")
        return
    if c.kind == "random":
        from conversions.random_checkpoint import write_random_pipeline

        write_random_pipeline(folder, "tiny", seed=experiment.config.seed)
    else:
        from ernie_jax.training import components

        vae_config = components.shapes_vae(c.vae_block_out_channels, c.vae_latent_channels)
        text_width = components.SHAPES_TEXT_ENCODER.hidden_size
        training = dataclasses.replace(components.SHAPES_VAE_TRAINING, num_steps=c.vae_steps,
                                       learning_rate=c.vae_learning_rate, kl_weight=c.vae_kl_weight,
                                       seed=experiment.config.seed)

        def progress(stage: str, info: dict) -> None:
            if stage == "vae":
                say(f"components: vae step {info['step']}/{c.vae_steps} loss {info['loss']:.4f} "
                     f"({info['seconds']:.0f} s)")

        components.build_components(
            folder, shapes_config=experiment.shapes_config(), vae_config=vae_config, vae_training=training,
            batch_size=c.vae_batch_size, stats_images=c.stats_images,
            transformer_config=experiment.transformer_config(text_width, vae_config.packed_channels),
            scheduler_shift=c.scheduler_shift, seed=experiment.config.seed, progress=progress)
    say(f"components: wrote {folder}")
