"""An experiment config resolved and checked: every value is validated (one ValueError naming it) before
any stage runs, and turned into the library's dataclasses."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

COMPONENT_KINDS = ("shapes", "random", "pretrained")
SHAPES_COMPONENT_KEYS = ("vae_steps", "vae_batch_size", "vae_learning_rate", "vae_kl_weight", "vae_block_out_channels",
                         "vae_latent_channels", "stats_images")
SHAPES_SOURCE = "shapes"
PRECOMPUTED_DIR = "precomputed"
DTYPES = ("float32", "bfloat16")
OBJECTIVES_PACKAGE = "ernie_jax.training.objectives"
EVALUATORS_PACKAGE = "ernie_jax.runner.evaluators"
STAGES_PACKAGE = "ernie_jax.runner.stages"


def named_module(package: str, name: str, what: str):
    """`package.name`, imported; a name with no such module is a ValueError naming `what`."""
    if not name or not name.isidentifier() or importlib.util.find_spec(f"{package}.{name}") is None:
        raise ValueError(f"{what} {name!r}: there is no module {package}.{name}")
    return importlib.import_module(f"{package}.{name}")


def part_settings(config: ml_collections.ConfigDict, name: str):
    """(OptimizerConfig, EMA decay) of trained part `name`: `config.train.optimizer` and
    `config.train.ema_decay` with the overrides of `config.parts.NAME.{optimizer, ema_decay}`."""
    from ernie_jax.training.optimizer import OptimizerConfig

    overrides = config.get("parts", {}).get(name, {})
    optimizer = OptimizerConfig(**{**config.train.optimizer, **overrides.get("optimizer", {})})
    return optimizer, overrides.get("ema_decay", config.train.ema_decay)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The config resolved into the library's dataclasses (all values checked before any stage runs)."""

    config: ml_collections.ConfigDict
    workdir: Path
    train: Any  # training.loop.TrainConfig
    optimizer: Any  # training.optimizer.OptimizerConfig
    objective: Any  # the objective module's Config
    curriculum: Any  # data.curriculum.Curriculum
    pipeline: Any  # data.pipeline.PipelineConfig
    rules: tuple
    mesh_ici: dict
    mesh_dcn: dict

    @property
    def objective_module(self):
        return named_module(OBJECTIVES_PACKAGE, self.config.objective.name, "config.objective.name")

    @property
    def part_names(self) -> tuple[str, ...]:
        """The trainable parts of the objective: its module's `trains(config)`, or ("transformer",). The part
        named "transformer" is the DiT the run makes (exported, evaluated); parts the module's
        `part_models(config)` builds are other models (e.g. a discriminator head); every other part is
        another copy of the experiment's DiT (e.g. distillation's critic), starting where "transformer" does."""
        trains = getattr(self.objective_module, "trains", None)
        return ("transformer",) if trains is None else tuple(trains(self.objective))

    @property
    def part_models(self) -> dict:
        """{part name: builder(transformer_config) -> (rngs -> nnx.Module)} of the parts that are not the DiT."""
        models = getattr(self.objective_module, "part_models", None)
        return {} if models is None else dict(models(self.objective))

    def part_settings(self, name: str):
        """(OptimizerConfig, EMA decay) of part `name`: `part_settings(self.config, name)`."""
        return part_settings(self.config, name)

    @property
    def init_path(self) -> str:
        """Where the trained transformer starts: `config.init.path`, with "components" meaning the frozen
        components' pipeline folder (its transformer); "" for random weights."""
        path = self.config.init.path
        return str(self.components_dir) if path == "components" else path

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

    def model_fn(self, transformer_config, param_dtype=jnp.float32):
        from ernie_jax.models.dit import ErnieImageTransformer

        m = self.config.model
        return lambda rngs: ErnieImageTransformer(transformer_config, dtype=jnp.dtype(m.dtype), param_dtype=param_dtype,
                                                  remat=m.remat, attention_impl=m.attention_impl, rngs=rngs)

    @property
    def lora(self):
        """The `models.lora.LoRAConfig` of `config.lora` (None when its rank is 0: the whole DiT trains)."""
        from ernie_jax.models.lora import LoRAConfig

        settings = self.config.get("lora", {})
        if not settings or not settings.get("rank", 0):
            return None
        return LoRAConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in settings.items()
                             if k != "base_dtype"})

    def mesh(self):
        from ernie_jax import parallel

        dcn = self.mesh_dcn if any(size != 1 for size in self.mesh_dcn.values()) else None
        return parallel.make_mesh(self.mesh_ici, dcn)


def check_rules(rules) -> tuple:
    """`config.sharding.rules` as a rule table: (logical name, mesh axis | tuple of mesh axes | None) pairs."""
    from ernie_jax.parallel import MESH_AXES

    table = []
    for entry in rules:
        entry = tuple(entry)
        axes = entry[1] if len(entry) == 2 else None
        axes_tuple = axes if isinstance(axes, (tuple, list)) else (axes,)
        if (len(entry) != 2 or not isinstance(entry[0], str)
                or not all(a is None or a in MESH_AXES for a in axes_tuple)):
            raise ValueError(f"config.sharding.rules entry {entry!r}: must be (logical name, mesh axis, tuple of "
                             f"mesh axes or None), mesh axes from {MESH_AXES}")
        table.append((entry[0], tuple(axes) if isinstance(axes, (tuple, list)) else axes))
    if not table:
        raise ValueError("config.sharding.rules is empty")
    return tuple(table)


def resolve(config: ml_collections.ConfigDict, workdir) -> Experiment:
    """Checks `config` and builds its dataclasses; raises ValueError naming the bad value."""
    from ernie_jax.data.buckets import stage_buckets
    from ernie_jax.data.categories import SamplingConfig
    from ernie_jax.data.curriculum import Curriculum, Stage
    from ernie_jax.data.pipeline import PipelineConfig
    from ernie_jax.data.prompt_styles import StyleMix
    from ernie_jax.models import layers
    from ernie_jax.runner import online_pairs
    from ernie_jax.training import loop
    from ernie_jax.training.optimizer import OptimizerConfig

    if not config.stages:
        raise ValueError("config.stages is empty")
    for stage in config.stages:
        named_module(STAGES_PACKAGE, stage, "config.stages entry")
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
    online = online_pairs.round_settings(config)  # checks the online pairs settings
    if not (config.data.source or config.data.precomputed or config.data.get("preferences")
            or "pairs" in config.stages or online):
        raise ValueError("config.data.source is empty: set --config.data.source to 'shapes', a tfds dataset folder "
                         "or an image folder (or --config.data.precomputed to precomputed folders, or "
                         "--config.data.preferences to preference folders)")
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
    # A mix that keeps every dense caption (keep_dense 1) rewrites nothing: it is no mix.
    styles = data.get("caption_styles", {})
    caption_styles = (StyleMix(**{k: (dict(v) if k == "weights" else v) for k, v in styles.items()})
                      if styles and styles.get("keep_dense", 1.0) < 1.0 else None)
    pipeline = PipelineConfig(curriculum, SamplingConfig(**data.sampling), max_crop_fraction=data.max_crop_fraction,
                              seed=config.seed, caption_styles=caption_styles)
    t = config.train
    train = loop.TrainConfig(num_steps=curriculum.total_steps, seed=config.seed, microbatches=t.microbatches,
                             checkpoint_every=t.checkpoint_every, max_to_keep=t.max_to_keep,
                             async_checkpoints=t.async_checkpoints)
    if not 0.0 <= t.ema_decay <= 1.0:
        raise ValueError(f"config.train.ema_decay must be in [0, 1], got {t.ema_decay}")
    optimizer = OptimizerConfig(**t.optimizer)
    settings = {k: v for k, v in config.objective.items() if k != "name"}
    module = named_module(OBJECTIVES_PACKAGE, config.objective.get("name", ""), "config.objective.name")
    try:
        objective = module.Config(**settings)
    except TypeError as error:  # an unknown or missing field
        raise ValueError(f"config.objective ({config.objective.name}): {error}") from None
    for name, evaluator in config.evals.items():
        named_module(EVALUATORS_PACKAGE, evaluator.get("type", ""), f"config.evals.{name}.type")
        if evaluator.get("every", 0) < 1:
            raise ValueError(f"config.evals.{name}.every must be >= 1, got {evaluator.get('every')}")
    layers.remat_policy(config.model.remat)
    if config.model.attention_impl not in layers.ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention_impl {config.model.attention_impl!r} is not one of "
                         f"{layers.ATTENTION_IMPLEMENTATIONS}")
    if config.logging.log_every < 1:
        raise ValueError(f"config.logging.log_every must be >= 1, got {config.logging.log_every}")
    for name, value in (("model.dtype", config.model.dtype), ("train.encoder_dtype", config.train.encoder_dtype),
                        ("export.dtype", config.export.dtype)):
        if value not in DTYPES:
            raise ValueError(f"config.{name} {value!r} is not one of {DTYPES}")
    if data.max_text_len < 1:
        raise ValueError(f"config.data.max_text_len must be >= 1, got {data.max_text_len}")
    experiment = Experiment(config, Path(workdir), train, optimizer, objective, curriculum, pipeline,
                            check_rules(config.sharding.rules), dict(config.mesh.ici), dict(config.mesh.dcn))
    experiment.transformer_config(text_in_dim=8, channels=128)  # checks the model fields on their own
    if "transformer" not in experiment.part_names:
        raise ValueError(f"config.objective ({config.objective.name}) trains {experiment.part_names}: one part must "
                         f"be 'transformer', the DiT the run makes")
    for name, overrides in config.get("parts", {}).items():
        if name not in experiment.part_names:
            raise ValueError(f"config.parts.{name}: the objective's parts are {experiment.part_names}")
        unknown = sorted(set(overrides) - {"optimizer", "ema_decay"})
        if unknown:
            raise ValueError(f"config.parts.{name}: unknown keys {unknown} (known: optimizer, ema_decay)")
        try:
            experiment.part_settings(name)
        except TypeError as error:
            raise ValueError(f"config.parts.{name}.optimizer: {error}") from None
        if not 0.0 <= overrides.get("ema_decay", 0.0) <= 1.0:
            raise ValueError(f"config.parts.{name}.ema_decay must be in [0, 1], got {overrides.ema_decay}")
    experiment.lora  # checks the LoRA settings
    if experiment.lora is not None and not config.init.path:
        raise ValueError("config.lora.rank > 0 trains adapters on a pretrained DiT: set config.init.path")
    sources = [data.source, *(e.get("source") for e in config.evals.values())]
    if SHAPES_SOURCE in sources:
        experiment.shapes_config()  # checks the shapes settings
    return experiment
