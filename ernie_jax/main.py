"""`python -m ernie_jax.main --config experiments/NAME.py[:VARIANT] --workdir DIR [--config.KEY=VALUE ...]`:
run an experiment's stages (`config.stages`, in order), each resumable: a stage whose output is complete
is skipped, and training resumes from its newest checkpoint.

Stages and what they write under DIR:
  components  components/: the frozen VAE, text encoder and tokenizer as a pipeline folder (diffusers
              layout, placeholder transformer). `components.kind`: "shapes" trains a small VAE on the
              shapes dataset (ernie_jax.training.components), "random" writes tiny random ones
              (conversions.random_checkpoint), "pretrained" uses `components.path` as it is.
  precompute  precomputed/SIDEpx/shard-I-of-N/: the frozen VAE's latents and the text encoder's features
              of `data.source`'s records, once per curriculum stage side (each host its shard), in the
              layout of `python -m ernie_jax.data.precompute`; the train stage then reads them.
  train       reads `data.source` through the frozen VAE and text encoder, or precomputed latents and text
              features: the precompute stage's, or the folders `data.precomputed` names (written by
              `python -m ernie_jax.data.precompute`; one per curriculum stage side, or a list of a side's
              host shards); writes
              checkpoints/ (Orbax: parameters, AdamW state, EMA, step, RNG and the data position),
              logs/ (TensorBoard: train/loss, train/mse, train/grad_norm, train/learning_rate, data/*,
              eval/loss, samples), metrics.jsonl (one line per update), samples/step_NNNNNN.png (grids of
              `logging.sample_prompts` with fixed seeds, from the EMA weights).
  export      pipeline/: the trained transformer (EMA unless `export.use_ema` is False) with the frozen
              components, in the diffusers layout: `ErnieImagePipeline.from_pretrained` and
              `python -m ernie_jax.generate --model DIR/pipeline` load it.
  evaluate    eval/: samples.png and, on the shapes dataset, scores.json (the shapes detector's scores
              of the held-out prompts next to their chance levels).

Bad flags, overrides or config values give one `error: ...` line and exit status 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

STAGES = ("components", "precompute", "train", "export", "evaluate")
COMPONENT_KINDS = ("shapes", "random", "pretrained")
SHAPES_COMPONENT_KEYS = ("vae_steps", "vae_batch_size", "vae_learning_rate", "vae_kl_weight", "vae_block_out_channels",
                         "vae_latent_channels", "stats_images")
SHAPES_SOURCE = "shapes"
PRECOMPUTED_DIR = "precomputed"
ENCODER_FOLDERS = ("vae", "text_encoder", "tokenizer")
DTYPES = ("float32", "bfloat16")


# ------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The config resolved into the library's dataclasses (all values checked before any stage runs)."""

    config: ml_collections.ConfigDict
    workdir: Path
    train: object  # training.loop.TrainConfig
    curriculum: object  # data.curriculum.Curriculum
    pipeline: object  # data.pipeline.PipelineConfig
    mesh_ici: dict
    mesh_dcn: dict

    @property
    def components_dir(self) -> Path:
        c = self.config.components
        return Path(c.path) if c.kind == "pretrained" else self.workdir / "components"

    def shapes_config(self):
        from ernie_jax.data.shapes import ShapesConfig

        s = self.config.data.shapes
        return ShapesConfig(height=s.height, width=s.width, max_objects=s.max_objects, seed=self.config.seed)

    def transformer_config(self, text_in_dim: int, channels: int):
        """The DiT's config with the frozen components' text width and latent channels."""
        from ernie_jax.models.dit import ErnieImageConfig

        fields = {f.name for f in dataclasses.fields(ErnieImageConfig)}
        values = {k: v for k, v in self.config.model.items() if k in fields}
        return ErnieImageConfig(**values, text_in_dim=text_in_dim, in_channels=channels, out_channels=channels)

    def precompute_plan(self) -> list[tuple[int, tuple]]:
        """(side, bucket set) of each distinct bucket set of the curriculum, in stage order: what the
        precompute stage encodes."""
        plan = {}
        for side, stage in zip(self.config.data.sides, self.curriculum.stages):
            plan.setdefault(tuple(stage.buckets), side)
        return [(side, buckets) for buckets, side in plan.items()]

    def precompute_folder(self, side: int, shard_index: int, shard_count: int) -> Path:
        return self.workdir / PRECOMPUTED_DIR / f"{side}px" / f"shard-{shard_index:05d}-of-{shard_count:05d}"

    def precomputed(self) -> list:
        """The precomputed folders training reads, one entry (a folder or a list of host shards) per stage
        side: `data.precomputed`, or what the precompute stage writes; empty when training encodes images."""
        if self.config.data.precomputed:
            return list(self.config.data.precomputed)
        if "precompute" not in self.config.stages:
            return []
        count = jax.process_count()
        return [[str(self.precompute_folder(side, i, count)) for i in range(count)] for side, _ in
                self.precompute_plan()]

    def model_fn(self, transformer_config):
        from ernie_jax.models.dit import ErnieImageTransformer

        m = self.config.model
        return lambda rngs: ErnieImageTransformer(transformer_config, dtype=jnp.dtype(m.dtype), param_dtype=jnp.float32,
                                                  remat=m.remat, attention_impl=m.attention_impl, rngs=rngs)


def resolve(config: ml_collections.ConfigDict, workdir) -> Experiment:
    """Checks `config` and builds its dataclasses; raises ValueError naming the bad value."""
    from ernie_jax.data.buckets import stage_buckets
    from ernie_jax.data.categories import SamplingConfig
    from ernie_jax.data.curriculum import Curriculum, Stage
    from ernie_jax.data.pipeline import PipelineConfig
    from ernie_jax.models import layers
    from ernie_jax.training import loop
    from ernie_jax.training.objectives import flow_matching
    from ernie_jax.training.optimizer import OptimizerConfig

    unknown = [s for s in config.stages if s not in STAGES]
    if unknown or not config.stages:
        raise ValueError(f"config.stages {tuple(config.stages)}: each must be one of {STAGES}")
    if config.components.kind not in COMPONENT_KINDS:
        raise ValueError(f"config.components.kind {config.components.kind!r} is not one of {COMPONENT_KINDS}")
    missing = [key for key in SHAPES_COMPONENT_KEYS if key not in config.components]
    if config.components.kind == "shapes" and missing:
        raise ValueError(f"config.components.kind 'shapes' needs config.components.{', '.join(missing)} (the VAE's "
                         f"training settings; see experiments/tiny_shapes.py)")
    if config.components.kind == "pretrained" and not config.components.path:
        raise ValueError("config.components.path is empty: set --config.components.path=PIPELINE_FOLDER")
    if "precompute" in config.stages and (config.data.precomputed or not config.data.source):
        raise ValueError("config.stages has 'precompute', which encodes config.data.source: set data.source and "
                         "leave config.data.precomputed empty (or drop the stage to train from "
                         "data.precomputed)")
    if not config.data.source and not config.data.precomputed:
        raise ValueError("config.data.source is empty: set --config.data.source to 'shapes', a tfds dataset folder "
                         "or an image folder (or --config.data.precomputed to precomputed folders)")
    data = config.data
    if not len(data.stage_steps) == len(data.batch_sizes) == len(data.sides) >= 1:
        raise ValueError(f"config.data.stage_steps {tuple(data.stage_steps)}, batch_sizes {tuple(data.batch_sizes)} "
                         f"and sides {tuple(data.sides)} must be non-empty and of equal length")
    stages, start = [], 0
    for steps, batch, side in zip(data.stage_steps, data.batch_sizes, data.sides):
        buckets = stage_buckets(side) if data.aspect_buckets else ((side, side),)
        stages.append(Stage(start, start + steps, buckets, batch, name=f"{side}px"))
        start += steps
    curriculum = Curriculum(tuple(stages))
    pipeline = PipelineConfig(curriculum, SamplingConfig(**data.sampling), max_crop_fraction=data.max_crop_fraction,
                              seed=config.seed)
    t = config.train
    train = loop.TrainConfig(
        num_steps=curriculum.total_steps, seed=config.seed, microbatches=t.microbatches, ema_decay=t.ema_decay,
        objective=flow_matching.FlowMatchingConfig(**t.objective), optimizer=OptimizerConfig(**t.optimizer),
        checkpoint_every=t.checkpoint_every, max_to_keep=t.max_to_keep, async_checkpoints=t.async_checkpoints)
    layers.remat_policy(config.model.remat)
    if config.model.attention_impl not in layers.ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention_impl {config.model.attention_impl!r} is not one of "
                         f"{layers.ATTENTION_IMPLEMENTATIONS}")
    for name in ("log_every", "sample_every", "eval_every"):
        if config.logging[name] < 1:
            raise ValueError(f"config.logging.{name} must be >= 1, got {config.logging[name]}")
    for name, value in (("model.dtype", config.model.dtype), ("train.encoder_dtype", config.train.encoder_dtype),
                        ("export.dtype", config.export.dtype)):
        if value not in DTYPES:
            raise ValueError(f"config.{name} {value!r} is not one of {DTYPES}")
    if data.max_text_len < 1:
        raise ValueError(f"config.data.max_text_len must be >= 1, got {data.max_text_len}")
    experiment = Experiment(config, Path(workdir), train, curriculum, pipeline, dict(config.mesh.ici),
                            dict(config.mesh.dcn))
    experiment.transformer_config(text_in_dim=8, channels=128)  # checks the model fields on their own
    if data.source == SHAPES_SOURCE or data.eval_source == SHAPES_SOURCE:
        experiment.shapes_config()  # checks the shapes settings
    return experiment


# ------------------------------------------------------------------------------------------- data


def open_source(spec: str, experiment: Experiment, split: str):
    """A record source: "shapes" (the synthetic dataset's `split`), a tfds dataset folder or an image folder."""
    if spec == SHAPES_SOURCE:
        from ernie_jax.data.shapes import ShapesSource

        s = experiment.config.data.shapes
        num = s.num_records if split == "train" else s.num_eval_records
        return ShapesSource(experiment.shapes_config(), split, num)
    from ernie_jax.data.precompute import open_source as open_path

    if not Path(spec).is_dir():
        raise ValueError(f"data source {spec!r} is neither 'shapes' nor a folder")
    return open_path(spec)


def precomputed_sources(experiment: Experiment) -> list:
    """`experiment.precomputed()` as PrecomputedSources, checked against the experiment's frozen components
    (the features must come from the text encoder and VAE that sample grids, eval loss and export use)."""
    from ernie_jax.data.precompute import model_fingerprint
    from ernie_jax.data.precomputed import PrecomputedSource

    expected = model_fingerprint(experiment.components_dir)
    sources = []
    for entry in experiment.precomputed():
        source = PrecomputedSource(entry if isinstance(entry, str) else list(entry))
        if source.metadata["model_fingerprint"] != expected:
            raise ValueError(f"precomputed features {entry!r} were made with other encoders than "
                             f"{experiment.components_dir} (model fingerprints differ)")
        if source.metadata["max_text_len"] > experiment.config.data.max_text_len:
            raise ValueError(f"precomputed features {entry!r} keep up to {source.metadata['max_text_len']} "
                             f"text tokens, more than config.data.max_text_len "
                             f"{experiment.config.data.max_text_len}")
        sources.append(source)
    return sources


class FrozenEncoders:
    """The train step's batch from the data pipeline's: the frozen VAE on the images (one compile per bucket)
    and the text encoder on the captions (features cut or zero-padded to `max_text_len` tokens)."""

    def __init__(self, encoders, max_text_len: int):
        self.encoders = encoders
        self.max_text_len = max_text_len
        self._vae_graphdef, self._vae_state = nnx.split(encoders.vae)

    def latents(self, images: np.ndarray) -> jax.Array:
        """uint8 `[B, h, w, 3]` -> normalised packed latents `[B, C, h', w']` float32."""
        from ernie_jax.data.precompute import encode_images, vae_input

        latents = encode_images(self._vae_graphdef, self._vae_state, jnp.asarray(vae_input(np.asarray(images))))
        return latents.astype(jnp.float32)

    def text(self, captions) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> features float32 `[B, max_text_len, D]` (cut, then zero-padded) and lengths int32 `[B]`."""
        from ernie_jax.data.precomputed import batch_text_features

        features = [np.asarray(f[: self.max_text_len], np.float32)
                    for f in self.encoders.encode_prompt([str(c) for c in captions])]
        return batch_text_features(features, self.max_text_len)

    def __call__(self, batch: dict) -> dict:
        text, lengths = self.text(batch["captions"])
        return {"latents": self.latents(batch["images"]), "text": text, "text_lens": lengths}

    def empty_prompt(self):
        from ernie_jax.training.objectives.flow_matching import EmptyPrompt

        text, lengths = self.text([""])
        return EmptyPrompt(text[0, : lengths[0]], int(lengths[0]))


# ------------------------------------------------------------------------------------------- callbacks


def _due(step: int, every: int, num_steps: int) -> bool:
    """Whether the callback of update `step` should act: every `every` updates and after the last."""
    return (step + 1) % every == 0 or step + 1 == num_steps


class SampleGrids:
    """A `loop.train` callback: every `every` updates (and after the last), the EMA transformer samples
    `prompts` (seed `seed`, at the current stage's first bucket) into `folder/step_NNNNNN.png` and the
    TensorBoard image `samples`. The denoising loop runs on the training `mesh` with the training `rules`,
    over the EMA weights where they lie (never gathered); the VAE decodes on the mesh too."""

    def __init__(self, experiment: Experiment, encoders, graphdef, shift: float, folder: Path, writer, *, mesh,
                 rules):
        self.prompts = list(experiment.config.logging.sample_prompts)
        self.experiment, self.graphdef, self.shift = experiment, graphdef, shift
        self.folder, self.writer, self.mesh, self.rules = folder, writer, mesh, rules
        self.positive = encoders.encode_prompt(self.prompts)
        self.negative = encoders.encode_prompt([""]) * len(self.prompts)
        # The pipeline places its VAE on the mesh: a copy, so the frozen encoders' stays where training uses it.
        self.vae = nnx.clone(encoders.vae)

    def __call__(self, step: int, metrics: dict, state) -> None:
        from ernie_jax.evaluation.grid import image_grid, save_grid
        from ernie_jax.pipeline import ErnieImagePipeline

        log, num_steps = self.experiment.config.logging, self.experiment.train.num_steps
        if not self.prompts or not _due(step, log.sample_every, num_steps):
            return
        bucket = self.experiment.curriculum.stage_at(step).buckets[0]
        pipe = ErnieImagePipeline(nnx.merge(self.graphdef, state.ema_params), self.vae, None, None, shift=self.shift,
                                  mesh=self.mesh, rules={"transformer": self.rules})
        images = pipe(prompt_embeds=self.positive, negative_prompt_embeds=self.negative, height=bucket.height,
                      width=bucket.width, num_inference_steps=log.sample_steps, guidance_scale=log.sample_guidance,
                      seed=log.sample_seed, output_type="np").images
        if jax.process_index() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_grid(self.folder / f"step_{step + 1:06d}.png", images, self.prompts)
            self.writer.image(step + 1, "samples", image_grid(images, self.prompts))


class EvalLoss:
    """A `loop.train` callback: every `every` updates (and after the last), the flow-matching loss of the EMA
    weights on `num_eval_records` held-out records at the current stage's first bucket, with fixed noise
    (so values at different steps compare), written as `eval/loss`. The loss is compiled for the training
    `mesh` and `rules`: the EMA weights in their training shardings, the batch split as a training batch."""

    def __init__(self, experiment: Experiment, source, frozen: FrozenEncoders, graphdef, writer, *, mesh, rules):
        from ernie_jax import parallel
        from ernie_jax.training.objectives import flow_matching

        self.experiment, self.source, self.frozen, self.writer = experiment, source, frozen, writer
        self.mesh, self.rules = mesh, rules
        self._batches = {}
        objective = dataclasses.replace(experiment.train.objective, text_dropout=0.0)

        def loss(params, batch, key):
            draw = flow_matching.draw_noise(key, batch["latents"].shape, objective)
            value, _ = flow_matching.flow_matching_loss(nnx.merge(graphdef, params), batch["latents"], batch["text"],
                                                     batch["text_lens"], draw, weighting=objective.weighting)
            return value

        # The arguments' own shardings: the EMA weights as the train state holds them, the batch split as
        # `batches` puts it.
        self._loss = parallel.jit_sharded(loss, mesh, rules, None, parallel.replicated(mesh))

    def batches(self, bucket) -> list[dict]:
        """The held-out records at `bucket`, encoded once, in batches of `logging.eval_batch_size`."""
        if bucket not in self._batches:
            from ernie_jax import parallel
            from ernie_jax.data.buckets import resize_and_crop
            from ernie_jax.data.sources import decode_image, record_caption

            size = self.experiment.config.logging.eval_batch_size
            records = [self.source[i] for i in range(len(self.source))]
            batches = []
            for first in range(0, len(records) - size + 1, size):
                chunk = records[first:first + size]
                images = np.stack([resize_and_crop(decode_image(r["image"]), bucket) for r in chunk])
                batch = self.frozen({"images": images, "captions": [record_caption(r) for r in chunk]})
                # The same rows in every process: each builds its shards of the global batch.
                batches.append({k: parallel.put_array(v, parallel.batch_sharding(self.mesh, self.rules, v.shape))
                                for k, v in batch.items()})
            if not batches:
                raise ValueError(f"the eval source has {len(records)} records, fewer than one batch of {size}")
            self._batches[bucket] = batches
        return self._batches[bucket]

    def __call__(self, step: int, metrics: dict, state) -> None:
        log, num_steps = self.experiment.config.logging, self.experiment.train.num_steps
        if not _due(step, log.eval_every, num_steps):
            return
        batches = self.batches(self.experiment.curriculum.stage_at(step).buckets[0])
        key = jax.random.key(self.experiment.config.seed + 1)
        losses = [float(self._loss(state.ema_params, b, jax.random.fold_in(key, i))) for i, b in enumerate(batches)]
        if jax.process_index() == 0:
            self.writer.scalars(step + 1, {"eval/loss": float(np.mean(losses))})


# ------------------------------------------------------------------------------------------- stages


def _latest_step(folder: Path) -> int | None:
    from ernie_jax.training.checkpoints import Checkpoints

    if not folder.is_dir():
        return None
    checkpoints = Checkpoints(folder)
    try:
        return checkpoints.latest_step()
    finally:
        checkpoints.close()


def _say(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


def run_components(experiment: Experiment) -> None:
    c = experiment.config.components
    folder = experiment.components_dir
    if c.kind == "pretrained":
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"config.components.path {folder}: no model_index.json (not a pipeline folder)")
        _say(f"components: using {folder}")
        return
    if folder.exists():
        _say(f"components: done ({folder})")
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
                _say(f"components: vae step {info['step']}/{c.vae_steps} loss {info['loss']:.4f} "
                     f"({info['seconds']:.0f} s)")

        components.build_components(
            folder, shapes_config=experiment.shapes_config(), vae_config=vae_config, vae_training=training,
            batch_size=c.vae_batch_size, stats_images=c.stats_images,
            transformer_config=experiment.transformer_config(text_width, vae_config.packed_channels),
            scheduler_shift=c.scheduler_shift, seed=experiment.config.seed, progress=progress)
    _say(f"components: wrote {folder}")


def run_precompute(experiment: Experiment) -> None:
    from ernie_jax.data.precompute import PrecomputeConfig, load_encoders, model_fingerprint, precompute

    config, components = experiment.config, experiment.components_dir
    shard, count = jax.process_index(), jax.process_count()
    todo = []
    for side, buckets in experiment.precompute_plan():
        folder = experiment.precompute_folder(side, shard, count)
        if folder.exists():
            _say(f"precompute: done ({folder})")
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
                                    dtype=config.train.encoder_dtype)
        metadata = precompute(encoders, source, folder, settings, shard_index=shard, shard_count=count,
                              model_fingerprint=fingerprint, model=str(components.resolve()), progress=shard == 0)
        _say(f"precompute: wrote {folder} ({metadata['records']} records, skipped {metadata['skipped']})")
    if count > 1:
        from jax.experimental import multihost_utils

        # Training reads every host's shard folder (a shared workdir): wait until all are written.
        multihost_utils.sync_global_devices("precompute")


def _mesh(experiment: Experiment):
    from ernie_jax import parallel

    dcn = experiment.mesh_dcn if any(size != 1 for size in experiment.mesh_dcn.values()) else None
    return parallel.make_mesh(experiment.mesh_ici, dcn)


def _scheduler_shift(folder: Path) -> float:
    from ernie_jax.pipeline import scheduler_shift

    return scheduler_shift(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))


def run_train(experiment: Experiment) -> None:
    from ernie_jax import parallel
    from ernie_jax.data.pipeline import build_pipeline
    from ernie_jax.data.precompute import load_encoders
    from ernie_jax.data.precomputed import build_precomputed_pipeline
    from ernie_jax.training import loop
    from ernie_jax.training.metrics import ProgressBar, TensorBoardWriter
    from ernie_jax.training.objectives.flow_matching import EmptyPrompt

    config, workdir, num_steps = experiment.config, experiment.workdir, experiment.train.num_steps
    checkpoint_dir = workdir / "checkpoints"
    done = _latest_step(checkpoint_dir) or 0
    if done >= num_steps:
        _say(f"train: done ({done} of {num_steps} updates)")
        return
    encoders = load_encoders(experiment.components_dir, config.train.encoder_dtype)
    transformer_config = experiment.transformer_config(encoders.text_encoder.config.hidden_size,
                                                       encoders.vae.config.packed_channels)
    model_fn = experiment.model_fn(transformer_config)
    graphdef = nnx.split(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))), nnx.Param, ...)[0]
    mesh = _mesh(experiment)
    frozen = FrozenEncoders(encoders, config.data.max_text_len)
    if experiment.precomputed():
        sources = precomputed_sources(experiment)
        # Text padded to max_text_len as FrozenEncoders pads it: the step compiles for the same shapes.
        data = build_precomputed_pipeline(sources, experiment.pipeline, text_multiple=config.data.max_text_len)
        prepare_batch, empty = None, EmptyPrompt(sources[0].empty_prompt, len(sources[0].empty_prompt))
    else:
        data = build_pipeline(open_source(config.data.source, experiment, "train"), experiment.pipeline)
        prepare_batch, empty = frozen, frozen.empty_prompt()

    def data_stats() -> dict[str, float]:
        counts = {f"data/category/{name}": float(n) for name, n in data.stats.category_summary().items()}
        return {**data.stats.summary(), **counts}

    # Logs are written by the first process; every process runs the sampling and eval callbacks (collectives).
    writer = progress = None
    callbacks = []
    if jax.process_index() == 0:
        writer = TensorBoardWriter(workdir / "logs", purge_step=done + 1)  # update `done` logs at done + 1
        progress = ProgressBar(num_steps, lambda step: experiment.curriculum.stage_at(step).batch_size,
                               start_step=done)
        callbacks += [progress, writer.train_callback(config.logging.log_every, data_stats),
                      loop.JsonlMetrics(workdir / "metrics.jsonl")]
    rules = parallel.TRAINING_RULES
    callbacks.append(SampleGrids(experiment, encoders, graphdef, _scheduler_shift(experiment.components_dir),
                                 workdir / "samples", writer, mesh=mesh, rules=rules))
    if config.data.eval_source:
        callbacks.append(EvalLoss(experiment, open_source(config.data.eval_source, experiment, "heldout"), frozen,
                                  graphdef, writer, mesh=mesh, rules=rules))
    try:
        loop.train(experiment.train, model_fn, data.iterator(), checkpoint_dir, mesh=mesh,
                   rules=rules, empty_prompt=empty if experiment.train.objective.text_dropout > 0
                   else None, prepare_batch=prepare_batch, callbacks=callbacks)
    finally:
        for log in (progress, writer):
            if log is not None:
                log.close()
    _say(f"train: done ({num_steps} updates, checkpoints in {checkpoint_dir})")


def _link_or_copy(source: str, destination: str) -> None:
    """Hard-links a file (no copy of large weights on the same file system), else copies it."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def run_export(experiment: Experiment) -> None:
    from conversions import mistral, transformer, vae
    from conversions.common import atomic_directory
    from conversions.safetensors_io import write_sharded
    from ernie_jax import parallel
    from ernie_jax.training.checkpoints import Checkpoints
    from ernie_jax.training.optimizer import make_optimizer
    from ernie_jax.training.state import abstract_train_state

    config, workdir, num_steps = experiment.config, experiment.workdir, experiment.train.num_steps
    destination = workdir / "pipeline"
    if destination.exists():
        _say(f"export: done ({destination})")
        return
    done = _latest_step(workdir / "checkpoints")
    if done != num_steps:
        raise ValueError(f"export: training is not finished ({done or 0} of {num_steps} updates in "
                         f"{workdir / 'checkpoints'}); run the train stage first")
    components = experiment.components_dir
    text_width = mistral.open_text_encoder(components / "text_encoder").config.hidden_size
    channels = vae.open_vae(components / "vae").config.packed_channels
    transformer_config = experiment.transformer_config(text_width, channels)
    optimizer = make_optimizer(experiment.train.optimizer)
    graphdef, abstract = abstract_train_state(experiment.model_fn(transformer_config), optimizer,
                                              seed=config.seed, mesh=_mesh(experiment), rules=parallel.TRAINING_RULES)
    checkpoints = Checkpoints(workdir / "checkpoints")
    try:
        weights = checkpoints.restore_weights(abstract, ema=config.export.use_ema, step=done)
    finally:
        checkpoints.close()
    dtype = jnp.dtype(config.export.dtype)
    # Cast where the weights lie, then gathered by every process (a collective); only the first writes.
    weights = jax.tree.map(lambda value: parallel.to_host(value.astype(dtype)), weights)
    if jax.process_index() != 0:
        return
    tensors = transformer.transformer_state_dict(nnx.merge(graphdef, weights))
    with atomic_directory(destination) as staging:
        for name in ENCODER_FOLDERS:
            shutil.copytree(components / name, staging / name, copy_function=_link_or_copy)
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
    _say(f"export: wrote {destination} (step {done}, {'EMA' if config.export.use_ema else 'raw'} weights, "
         f"{config.export.dtype})")


def run_evaluate(experiment: Experiment) -> None:
    from conversions.common import atomic_directory
    from ernie_jax.evaluation.grid import save_grid
    from ernie_jax.pipeline import ErnieImagePipeline

    config, workdir = experiment.config, experiment.workdir
    destination = workdir / "eval"
    if destination.exists():
        _say(f"evaluate: done ({destination})")
        return
    e = config.evaluation
    pipe = ErnieImagePipeline.from_pretrained(workdir / "pipeline", dtype=config.export.dtype)
    side = config.data.sides[-1]

    def generate(prompts: list[str]) -> np.ndarray:
        images = []
        for first in range(0, len(prompts), e.batch_size):
            out = pipe(prompt=prompts[first:first + e.batch_size], negative_prompt="", height=side, width=side,
                       num_inference_steps=e.num_inference_steps, guidance_scale=e.guidance_scale,
                       seed=e.seed + first, output_type="np", use_pe=False)
            images.append(np.rint(np.clip(out.images, 0, 1) * 255).astype(np.uint8))
        return np.concatenate(images)

    scored = config.data.source == SHAPES_SOURCE and e.num_prompts > 0
    if scored:
        from ernie_jax.data.shapes import heldout_prompts
        from ernie_jax.evaluation import shapes_detector

        prompts, scenes = map(list, zip(*heldout_prompts(experiment.shapes_config(), e.num_prompts)))
    else:
        prompts, scenes = list(config.logging.sample_prompts), None
    if not prompts:
        raise ValueError("evaluate: no prompts (config.evaluation.num_prompts and config.logging.sample_prompts)")
    images = generate(prompts)
    if jax.process_index() != 0:
        return
    with atomic_directory(destination) as staging:
        shown = min(len(prompts), 16)
        save_grid(staging / "samples.png", images[:shown], prompts[:shown], scale=max(1, 128 // side))
        if scored:
            report = {"num_prompts": len(prompts), "num_inference_steps": e.num_inference_steps,
                      "guidance_scale": e.guidance_scale,
                      "scores": shapes_detector.score_images(scenes, images),
                      "chance": shapes_detector.chance_levels(scenes, images) if len(scenes) > 1 else None}
            (staging / "scores.json").write_text(json.dumps(report, indent=2) + "\n")
    _say(f"evaluate: wrote {destination}" + (f" (all-correct {report['scores']['all']:.3f})" if scored else ""))


RUNNERS = {"components": run_components, "precompute": run_precompute, "train": run_train, "export": run_export,
           "evaluate": run_evaluate}


def run(config: ml_collections.ConfigDict, workdir) -> Experiment:
    """Runs `config.stages` in order under `workdir` (created if missing); returns the resolved experiment."""
    experiment = resolve(config, workdir)
    experiment.workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (experiment.workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    for stage in config.stages:
        RUNNERS[stage](experiment)
    return experiment


# ------------------------------------------------------------------------------------------- command line


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "experiment config: experiments/NAME.py[:VARIANT]",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "output folder (created if missing; a rerun resumes in it)")
    return config, workdir


def main(argv=None) -> int:
    from absl import flags, logging

    from conversions.common import run_command

    argv = list(sys.argv if argv is None else argv)
    config_flag, workdir_flag = _define_flags()
    try:
        rest = flags.FLAGS(argv)
        config = config_flag.value
        if config is not None:
            config.get("stages")  # a config file that failed to load raises here
    except (AttributeError, KeyError) as error:  # how ml_collections reports overriding a key the config lacks
        print(f"error: the config has no key {str(error).strip(chr(34) + chr(39))!r} (check the --config.* "
              f"overrides)", file=sys.stderr)
        return 1
    except (flags.Error, TypeError, ValueError, OSError) as error:
        # A config file that fails to load is reported with its traceback: its last line names the cause.
        print("error: " + [line.strip() for line in str(error).splitlines() if line.strip()][-1], file=sys.stderr)
        return 1
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
        return 1
    if workdir_flag.value is None or config is None:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 1
    logging.set_verbosity(logging.WARNING)
    return run_command(lambda _: run(config, workdir_flag.value))


if __name__ == "__main__":
    sys.exit(main())
