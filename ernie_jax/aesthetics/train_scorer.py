"""The runner of our aesthetic scorer's experiments (`models.aesthetic_scorer`: a vision tower and a head):

    python -m ernie_jax.main --config experiments/aes_clip.py:VARIANT --workdir DIR [--config.KEY=VALUE ...]

runs `run(config, DIR)` for configs that name this module in `config.runner`. The same trainer as the DiT's
(`training.loop.train`: sharded train state by the config's rule table, AdamW, EMA, Orbax checkpoints with
the data position, a rerun resumes), the objectives under `training/objectives/` (`config.objective.name`:
aesthetic_pairwise, aesthetic_ordinal or aesthetic_regression), but its own model and data: the DiT runner's
stages revolve around the frozen VAE and text encoder, which a scorer has none of.

What it does, under DIR:
- with `config.data.synthetic` settings and a manifest path starting "synthetic:", writes the synthetic set
  (`data.synthetic_aesthetics`) to DIR/synthetic/ once;
- trains the part the objective names (its module's `trains`) on `config.data.train` (a pairs or labels
  manifest, `data.aesthetic_manifest`): checkpoints/, metrics.jsonl, logs/ (TensorBoard);
- scores `config.data.eval` (a labels manifest) with the EMA weights and writes eval.json (`evaluate`): SRCC,
  PLCC and Kendall tau-b against its `rating` column (else `level`), and per-category bias;
- config.json, from which `load_trained_scorer(DIR)` rebuilds the trained scorer as an `images -> scores`
  callable.

The tower (`config.tower`): `kind` "pretrained" loads a transformers CLIP / SigLIP folder (`path`) and its
image processor; "random" builds a `VisionTowerConfig` from the config's fields and preprocesses with
`config.tower.preprocessor` (a preprocessor_config.json dict). `tuning`: "frozen" trains the head only (the
tower's weights are read from where they came from, never checkpointed), "lora" trains LoRA adapters on the
tower (`config.lora`, `models.lora`) and the head, "full" everything.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

SYNTHETIC_PREFIX = "synthetic:"
EVAL_FILE = "eval.json"
CONFIG_FILE = "config.json"


def _dtype(value: str, name: str):
    if value not in ("float32", "bfloat16"):
        raise ValueError(f"config.{name} {value!r} is not one of ('float32', 'bfloat16')")
    return jnp.dtype(value)


@dataclasses.dataclass(frozen=True)
class ScorerExperiment:
    """A scorer config resolved and checked (`resolve`)."""

    config: ml_collections.ConfigDict
    workdir: Path
    objective_module: object
    objective_config: object
    part_name: str
    head: object  # models.aesthetic_scorer.ScorerHeadConfig
    train: object  # training.loop.TrainConfig
    optimizer: object  # training.optimizer.OptimizerConfig
    rules: tuple

    @property
    def tuning(self) -> str:
        return self.config.tower.tuning

    @property
    def lora(self):
        """The tower's `models.lora.LoRAConfig` (tuning "lora"), else None."""
        from ernie_jax.models.lora import LoRAConfig

        if self.tuning != "lora":
            return None
        settings = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.config.lora.items()}
        return LoRAConfig(**settings)

    def manifest_path(self, path: str) -> Path:
        """A manifest path of the config: "synthetic:NAME" is DIR/synthetic/NAME."""
        if path.startswith(SYNTHETIC_PREFIX):
            return self.workdir / "synthetic" / path[len(SYNTHETIC_PREFIX):]
        return Path(path)

    def tower_config(self):
        """The `VisionTowerConfig` of the tower (a pretrained folder's, or the config's for "random")."""
        from ernie_jax.models.vision_tower import VisionTowerConfig

        t = self.config.tower
        if t.kind == "pretrained":
            return VisionTowerConfig.from_hf_config(json.loads((Path(t.path) / "config.json").read_text()))
        fields = {f.name for f in dataclasses.fields(VisionTowerConfig)}
        return VisionTowerConfig(**{k: v for k, v in t.items() if k in fields})

    def preprocessor(self):
        """The `ImagePreprocessor` the tower's images go through."""
        from ernie_jax.data.image_preprocess import ImagePreprocessor

        t = self.config.tower
        if t.kind == "pretrained":
            from conversions.vision_tower import load_image_preprocessor

            return load_image_preprocessor(t.path)
        return ImagePreprocessor.from_config(t.preprocessor.to_dict())

    def _tower_settings(self) -> dict:
        t = self.config.tower
        return dict(dtype=jnp.dtype(t.dtype), attention_impl=t.attention_impl, remat=t.remat)

    def build(self, rngs: nnx.Rngs):
        """A fresh scorer (random tower, fresh head and adapters): the trainer's `TrainablePart.build`. The
        tower's frozen weights are kept in `config.tower.frozen_dtype` unless the whole tower trains."""
        from ernie_jax.models.vision_tower import VisionTower

        frozen_dtype = jnp.float32 if self.tuning == "full" else jnp.dtype(self.config.tower.frozen_dtype)
        tower = VisionTower(self.tower_config(), param_dtype=frozen_dtype, rngs=rngs, **self._tower_settings())
        return self._with_head(tower, rngs)

    def _with_head(self, tower, rngs: nnx.Rngs):
        from ernie_jax.models import lora
        from ernie_jax.models.aesthetic_scorer import AestheticScorer

        if self.lora is not None:
            lora.add_lora(tower, self.lora, rngs)
        return AestheticScorer(tower, self.head, dtype=jnp.dtype(self.config.tower.dtype), rngs=rngs)

    def initial(self) -> dict:
        """{part: the scorer it starts from} for a pretrained tower (its weights, a fresh head and adapters);
        empty for a random one (the part's `build` makes it)."""
        t = self.config.tower
        if t.kind != "pretrained":
            return {}
        from conversions.vision_tower import load_vision_tower

        param_dtype = "float32" if self.tuning == "full" else t.frozen_dtype
        # Read straight into the shardings the rule table gives (no whole copy on one device).
        tower = load_vision_tower(t.path, t.dtype, param_dtype=jnp.dtype(param_dtype), attention_impl=t.attention_impl,
                                  remat=t.remat, mesh=self.mesh(), axis_rules=self.rules)
        return {self.part_name: self._with_head(tower, nnx.Rngs(self.config.seed))}

    def parts(self) -> dict:
        """{part name: its `TrainablePart`}."""
        from ernie_jax.models import lora
        from ernie_jax.models.aesthetic_scorer import trained_variables
        from ernie_jax.training.optimizer import learning_rate_schedule, make_optimizer
        from ernie_jax.training.state import TrainablePart

        dropout = self.lora is not None and self.lora.dropout > 0
        return {self.part_name: TrainablePart(
            self.build, make_optimizer(self.optimizer), ema_decay=self.config.train.ema_decay,
            trained=trained_variables(self.tuning), learning_rate=learning_rate_schedule(self.optimizer),
            stochastic=lora.set_training if dropout else None)}

    def mesh(self):
        from ernie_jax import parallel

        return parallel.make_mesh(dict(self.config.mesh.ici))


def resolve(config: ml_collections.ConfigDict, workdir) -> ScorerExperiment:
    """Checks `config` (ValueError naming the bad value) and resolves it."""
    from ernie_jax.models.aesthetic_scorer import TUNINGS, ScorerHeadConfig
    from ernie_jax.models.layers import ATTENTION_IMPLEMENTATIONS, remat_policy
    from ernie_jax.runner.config import OBJECTIVES_PACKAGE, check_rules, named_module
    from ernie_jax.training.loop import TrainConfig
    from ernie_jax.training.optimizer import OptimizerConfig

    module = named_module(OBJECTIVES_PACKAGE, config.objective.get("name", ""), "config.objective.name")
    settings = {k: v for k, v in config.objective.items() if k != "name"}
    try:
        objective_config = module.Config(**settings)
    except TypeError as error:
        raise ValueError(f"config.objective ({config.objective.name}): {error}") from None
    part_names = tuple(module.trains(objective_config))
    if len(part_names) != 1:
        raise ValueError(f"config.objective ({config.objective.name}) trains {part_names}; a scorer objective "
                         f"trains one part, the scorer")
    t = config.tower
    if t.kind not in ("pretrained", "random"):
        raise ValueError(f"config.tower.kind {t.kind!r} is not one of ('pretrained', 'random')")
    if t.kind == "pretrained" and not (t.path and (Path(t.path) / "config.json").is_file()):
        raise ValueError(f"config.tower.path {t.path!r} is not a transformers CLIP / SigLIP folder (no config.json): "
                         f"set --config.tower.path=FOLDER")
    if t.tuning not in TUNINGS:
        raise ValueError(f"config.tower.tuning {t.tuning!r} is not one of {TUNINGS}")
    _dtype(t.dtype, "tower.dtype")
    _dtype(t.frozen_dtype, "tower.frozen_dtype")
    remat_policy(t.remat)
    if t.attention_impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"config.tower.attention_impl {t.attention_impl!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    # An objective that needs more of the head (the ordinal thresholds) says so: `num_levels(config)`.
    try:
        head = ScorerHeadConfig(**{**config.head, "num_levels": getattr(module, "num_levels", lambda c: 0)(
            objective_config)})
    except TypeError as error:
        raise ValueError(f"config.head: {error}") from None
    d = config.data
    if not d.train:
        raise ValueError("config.data.train is empty: set it to a pairs or labels manifest")
    if d.batch_size < 1 or d.num_steps < 0:
        raise ValueError(f"config.data.batch_size must be >= 1 and num_steps >= 0, got {d.batch_size}, {d.num_steps}")
    tc = config.train
    train = TrainConfig(num_steps=d.num_steps, seed=config.seed, microbatches=tc.microbatches,
                        checkpoint_every=tc.checkpoint_every, max_to_keep=tc.max_to_keep,
                        async_checkpoints=tc.async_checkpoints)
    if not 0.0 <= tc.ema_decay <= 1.0:
        raise ValueError(f"config.train.ema_decay must be in [0, 1], got {tc.ema_decay}")
    experiment = ScorerExperiment(config, Path(workdir), module, objective_config, part_names[0], head, train,
                                  OptimizerConfig(**tc.optimizer), check_rules(config.sharding.rules))
    for name, check in (("tower", experiment.tower_config), ("lora", lambda: experiment.lora)):
        try:
            check()
        except TypeError as error:  # a missing or unknown field
            raise ValueError(f"config.{name}: {error}") from None
    return experiment


def _synthetic(experiment: ScorerExperiment) -> None:
    """Writes DIR/synthetic/ once when a manifest of the config is there."""
    from ernie_jax.data.synthetic_aesthetics import SyntheticAestheticsConfig, write_synthetic_aesthetics

    paths = [experiment.config.data.train, experiment.config.data.eval]
    folder = experiment.workdir / "synthetic"
    if not any(p.startswith(SYNTHETIC_PREFIX) for p in paths):
        return
    if not folder.is_dir() and jax.process_index() == 0:
        write_synthetic_aesthetics(folder, SyntheticAestheticsConfig(**experiment.config.data.synthetic.to_dict()))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("synthetic aesthetics written")


def training_data(experiment: ScorerExperiment, objective):
    """The train manifest's pipeline, checked against what the objective reads (before any compute)."""
    from ernie_jax.data.aesthetic_manifest import build_scorer_pipeline, read_manifest

    d = experiment.config.data
    manifest = read_manifest(experiment.manifest_path(d.train), d.images_root or None)
    keys = {"pairs": {"images_a", "images_b", "outcome"}}.get(
        manifest.kind, {"images", *manifest.columns} - {"image"})
    missing = sorted(set(objective.batch_keys) - keys)
    if missing:
        raise ValueError(f"config.objective ({experiment.config.objective.name}) reads {missing}, which the "
                         f"{manifest.kind} manifest {manifest.path} does not give ({sorted(keys)})")
    levels = manifest.columns.get("levels")
    if experiment.head.num_levels and levels is not None and levels.max() > experiment.head.num_levels:
        raise ValueError(f"manifest {manifest.path} has level {levels.max()}, above the objective's num_levels "
                         f"{experiment.head.num_levels}")
    count = jax.process_count()
    if d.batch_size % count:
        raise ValueError(f"config.data.batch_size {d.batch_size} is not divisible by the {count} processes")
    preprocess = experiment.preprocessor()
    return build_scorer_pipeline(manifest, preprocess.one, batch_size=d.batch_size // count, seed=experiment.config.seed,
                                 shard_index=jax.process_index(), shard_count=count)


@functools.partial(jax.jit, static_argnums=0)
def _scores(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).score(pixel_values)


class ImageScorer:
    """`images -> scores [N]` float64 of a scorer model (PIL images or uint8 `[H, W, 3]` arrays), preprocessed
    and scored in batches of `batch_size` (the last one padded, so one compiled program serves every call and
    every scorer of the same structure)."""

    def __init__(self, model, preprocess, batch_size: int = 32):
        self.graphdef, self.state = nnx.split(model)
        self.preprocess, self.batch_size = preprocess, batch_size

    def __call__(self, images) -> np.ndarray:
        scores = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start:start + self.batch_size])
            count = len(pixels)
            pixels = np.concatenate([pixels, np.zeros((self.batch_size - count, *pixels.shape[1:]), pixels.dtype)])
            scores.append(np.asarray(_scores(self.graphdef, self.state, pixels))[:count])
        return np.concatenate(scores).astype(np.float64)


def scorer_model(experiment: ScorerExperiment, *, ema: bool = True, trained: bool = True):
    """The scorer of the newest checkpoint (its EMA weights unless `ema` is False) or, `trained=False`, the
    untrained one training starts from (as the trainer initialises it)."""
    from ernie_jax.training.checkpoints import Checkpoints
    from ernie_jax.training.state import abstract_train_state, create_train_state, part_rests

    parts, initial, name = experiment.parts(), experiment.initial(), experiment.part_name
    mesh, seed, rules = experiment.mesh(), experiment.config.seed, experiment.rules
    if trained:
        graphdefs, abstract = abstract_train_state(parts, seed=seed, mesh=mesh, rules=rules)
        checkpoints = Checkpoints(experiment.workdir / "checkpoints")
        try:
            weights = checkpoints.restore_weights(abstract, ema=ema)
        finally:
            checkpoints.close()
    else:
        graphdefs, state = create_train_state(parts, seed=seed, mesh=mesh, rules=rules, initial=initial)
        weights = state.params
    rest = part_rests(parts, seed=seed, mesh=mesh, rules=rules, initial=initial).get(name)
    return nnx.merge(graphdefs[name], weights[name], *([] if rest is None else [rest]))


def evaluate(experiment: ScorerExperiment, model) -> dict:
    """SRCC, PLCC (raw and after the 4-parameter logistic fit) and Kendall tau-b of `model`'s scores on
    `config.data.eval` against its `rating` column (else `level`); with categories in the manifest also
    `category_bias`, {category: mean residual of the logistic-mapped scores} (positive: rated too high)."""
    from PIL import Image

    from ernie_jax.aesthetics.metrics import agreement_summary
    from ernie_jax.data.aesthetic_manifest import read_manifest

    d = experiment.config.data
    manifest = read_manifest(experiment.manifest_path(d.eval), d.images_root or None)
    target_key = "ratings" if "ratings" in manifest.columns else "levels"
    if manifest.kind != "labels" or target_key not in manifest.columns:
        raise ValueError(f"config.data.eval {manifest.path}: needs a labels manifest (image, rating or level)")
    images = []
    for path in manifest.columns["image"]:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    scores = ImageScorer(model, experiment.preprocessor(), d.batch_size)(images)
    target = manifest.columns[target_key].astype(np.float64)
    names = np.asarray(manifest.category_names)[manifest.columns["category"]]
    return {"images": len(images), "target": target_key, **agreement_summary(scores, target, names)}


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, path)


def load_trained_scorer(workdir, *, ema: bool = True, batch_size: int = 32) -> ImageScorer:
    """The `images -> scores` callable of a training run's folder: its config.json and newest checkpoint (EMA
    weights unless `ema` is False; a frozen tower or LoRA base is read from where the config says)."""
    workdir = Path(workdir)
    if not (workdir / CONFIG_FILE).is_file():
        raise ValueError(f"{workdir} holds no {CONFIG_FILE}: not the folder of a scorer training run")
    experiment = resolve(ml_collections.ConfigDict(json.loads((workdir / CONFIG_FILE).read_text())), workdir)
    return ImageScorer(scorer_model(experiment, ema=ema), experiment.preprocessor(), batch_size)


def run(config: ml_collections.ConfigDict, workdir) -> dict:
    """Trains (resuming in `workdir`) and evaluates; returns the evaluation ({} without `data.eval`)."""
    from ernie_jax.runner.stages import latest_step, say
    from ernie_jax.training import loop
    from ernie_jax.training.metrics import ProgressBar, TensorBoardWriter

    experiment = resolve(config, workdir)
    experiment.workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        _write_atomically(experiment.workdir / CONFIG_FILE, config.to_json_best_effort(indent=2) + "\n")
    _synthetic(experiment)
    objective = experiment.objective_module.make(experiment.objective_config, None)
    data = training_data(experiment, objective)
    checkpoint_dir = experiment.workdir / "checkpoints"
    done, num_steps = latest_step(checkpoint_dir) or 0, experiment.train.num_steps
    if done < num_steps:
        callbacks, logs = [], []
        if jax.process_index() == 0:
            writer = TensorBoardWriter(experiment.workdir / "logs", purge_step=done + 1)
            progress = ProgressBar(num_steps, lambda step: config.data.batch_size, start_step=done)
            logs = [progress, writer]
            callbacks = [progress, writer.train_callback(config.logging.log_every),
                         loop.JsonlMetrics(experiment.workdir / "metrics.jsonl")]
        try:
            loop.train(experiment.train, experiment.parts(), objective, data.iterator(), checkpoint_dir,
                       mesh=experiment.mesh(), rules=experiment.rules, initial=experiment.initial(),
                       callbacks=callbacks)
        finally:
            for log in logs:
                log.close()
    say(f"train: done ({num_steps} updates, checkpoints in {checkpoint_dir})")
    if not config.data.eval:
        return {}
    results = evaluate(experiment, scorer_model(experiment))
    if jax.process_index() == 0:
        _write_atomically(experiment.workdir / EVAL_FILE, json.dumps(results, indent=2) + "\n")
    say(f"evaluate: {json.dumps(results)}")
    return results
