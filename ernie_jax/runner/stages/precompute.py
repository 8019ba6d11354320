"""Stage `precompute`: the frozen VAE's latents and the text encoder's features of `data.source`'s records
in WORKDIR/precomputed/SIDEpx/shard-I-of-N/, once per curriculum stage side (each host its shard), in the
layout of `python -m ernie_jax.data.precompute`; the train stage then reads them."""

from __future__ import annotations

import jax

from ernie_jax.runner.config import Experiment
from ernie_jax.runner.data import open_source
from ernie_jax.runner.stages import say


def run(experiment: Experiment) -> None:
    from ernie_jax.data.precompute import (
        PrecomputeConfig,
        load_encoders,
        model_fingerprint,
        precompute,
    )

    config, components = experiment.config, experiment.components_dir
    shard, count = jax.process_index(), jax.process_count()
    todo = []
    for side, buckets in experiment.precompute_plan():
        folder = experiment.precompute_folder(side, shard, count)
        if folder.exists():
            say(f"precompute: done ({folder})")
        else:
            todo.append((side, buckets, folder))
    if todo:
        # Opened, loaded and fingerprinted once for every side left to encode.
        encoders = load_encoders(components, config.train.encoder_dtype)
        source = open_source(config.data.source, experiment, "train")
        fingerprint = model_fingerprint(components)
    for side, buckets, folder in todo:
        settings = PrecomputeConfig(buckets, side if config.data.aspect_buckets else None,
                                    config.data.max_crop_fraction, config.data.max_text_len,
                                    dtype=config.train.encoder_dtype,
                                    caption_styles=experiment.pipeline.caption_styles)
        metadata = precompute(encoders, source, folder, settings, shard_index=shard, shard_count=count,
                              model_fingerprint=fingerprint, model=str(components.resolve()), progress=shard == 0)
        say(f"precompute: wrote {folder} ({metadata['records']} records, skipped {metadata['skipped']})")
    if count > 1:
        from jax.experimental import multihost_utils

        # Training reads every host's shard folder (a shared workdir): wait until all are written.
        multihost_utils.sync_global_devices("precompute")
