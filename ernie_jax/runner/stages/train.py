"""Stage `train`: the objective `config.objective.name` on its trainable parts (the transformer; for
distillation also a critic, and any model the objective builds),
reading `data.source` through the frozen VAE and text encoder, or precomputed latents and text features
(the precompute stage's, or the folders `data.precomputed` names), or, for DPO, preference pairs (the pairs
stage's, or the folders `data.preferences` names; with `pairs.refresh_every` N > 0, pairs the policy makes
itself every N updates, WORKDIR/pairs/round-RRRRRR/: `runner.online_pairs`). Writes WORKDIR/checkpoints/ (Orbax: the
trained variables, optimizer state, EMA, step, RNG and the data position), WORKDIR/logs/ (TensorBoard:
train/* metrics, data/*, and what `config.evals` log), WORKDIR/metrics.jsonl (one line per update) and the
evaluators' files.

The transformer (and every other DiT part) starts from `config.init.path` (a pipeline or transformer
folder; "components": the components' pipeline) when set, else from random weights; `config.lora.rank > 0`
trains LoRA adapters on it instead of the whole DiT. `config.parts.NAME.{optimizer, ema_decay}` override
`config.train`'s for part NAME. Frozen models an objective reads (`objective.reads`, e.g. a DPO reference) are loaded from
`config.frozen.NAME.path` in `config.frozen.NAME.dtype`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.runner.config import Experiment
from ernie_jax.runner.stages import latest_step, say, scheduler_shift


@dataclasses.dataclass(frozen=True)
class ObjectiveContext:
    """What an objective's `make(config, context)` may use: the frozen text encoder's features of the empty
    prompt (`training.objectives.flow_matching.EmptyPrompt`, for text dropout and unconditional guidance),
    the scheduler shift the pipeline samples with, and the data's category names (the ids of the batch key
    `category`; empty when the data has none)."""

    empty_prompt: object
    scheduler_shift: float = 1.0
    category_names: tuple[str, ...] = ()


def trainable_parts(experiment: Experiment, transformer_config) -> dict:
    """{part name: its `TrainablePart`} for `experiment.part_names`, each with its optimizer and EMA decay
    (`experiment.part_settings`). A part the objective builds (`experiment.part_models`) is its model; every
    other part is the experiment's DiT, or with `config.lora` LoRA adapters on a frozen base in
    `config.lora.base_dtype` (dropout drawn afresh at every step)."""
    from conversions.lora import diffusers_names
    from ernie_jax.models import lora
    from ernie_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from ernie_jax.training.state import TrainablePart

    adapters, models, parts = experiment.lora, experiment.part_models, {}

    def build_adapted(rngs: nnx.Rngs) -> nnx.Module:
        base = experiment.model_fn(transformer_config, jnp.dtype(experiment.config.lora.base_dtype))
        return lora.add_lora(base(rngs), adapters, rngs, diffusers_names(transformer_config))

    for name in experiment.part_names:
        optimizer, ema_decay = experiment.part_settings(name)
        settings = dict(optimizer=make_optimizer(optimizer), ema_decay=ema_decay,
                        learning_rate=learning_rate_schedule(optimizer))
        if name in models:
            parts[name] = TrainablePart(models[name](transformer_config), **settings)
        elif adapters is None:
            parts[name] = TrainablePart(experiment.model_fn(transformer_config), **settings)
        else:
            parts[name] = TrainablePart(build_adapted, trained=lora.LoRAParam,
                                        stochastic=lora.set_training if adapters.dropout else None, **settings)
    return parts


def load_frozen_transformer(experiment: Experiment, path: str, param_dtype: str, mesh, rules) -> nnx.Module:
    """The transformer of a pipeline or transformer folder, its weights in `param_dtype` where `rules` put
    them on `mesh`, computing as the experiment's model does."""
    from pathlib import Path

    from conversions.transformer import load_transformer

    folder = Path(path)
    if (folder / "model_index.json").is_file():
        folder = folder / "transformer"
    m = experiment.config.model
    return load_transformer(folder, m.dtype, param_dtype=jnp.dtype(param_dtype), attention_impl=m.attention_impl,
                            remat=m.remat, mesh=mesh, axis_rules=rules)


def initial_models(experiment: Experiment, transformer_config, mesh, rules, *, fresh: bool) -> dict:
    """{DiT part name: the model it starts from} when `config.init.path` is set: its weights in
    `config.init.dtype`, loaded once for all DiT parts (with LoRA: one base in `config.lora.base_dtype`, each
    part's fresh adapters on the same arrays, which a resumed run needs as its frozen base; otherwise read
    only for a `fresh` start, as a checkpoint then holds the trained weights). Parts the objective builds
    start from their `build`."""
    config, path = experiment.config, experiment.init_path
    names = [name for name in experiment.part_names if name not in experiment.part_models]
    if not path:
        return {}
    adapters = experiment.lora
    if adapters is None:
        if not fresh:
            return {}
        model = load_frozen_transformer(experiment, path, config.init.dtype, mesh, rules)
        return dict.fromkeys(names, model)
    from conversions.lora import diffusers_names
    from ernie_jax.models import lora

    graphdef, base = nnx.split(load_frozen_transformer(experiment, path, config.lora.base_dtype, mesh, rules))
    return {name: lora.add_lora(nnx.merge(graphdef, base), adapters, nnx.Rngs(config.seed + index),
                                   diffusers_names(transformer_config)) for index, name in enumerate(names)}


def frozen_model(experiment: Experiment, name: str, initial: dict, mesh, rules) -> nnx.Module:
    """The frozen model `name` an objective reads, from `config.frozen.NAME`: `path` "init" is the model
    training starts from (with LoRA the base with its adapters switched off, on the same arrays: one copy of
    the weights; otherwise `config.init.path` in `dtype`), any other path a pipeline or transformer folder."""
    config = experiment.config
    if name not in config.frozen:
        raise ValueError(f"the objective reads the frozen model {name!r}: set config.frozen.{name}.path")
    settings = config.frozen[name]
    if not settings.path:
        raise ValueError(f"config.frozen.{name}.path is empty: set it to a pipeline or transformer folder, or 'init'")
    if settings.path == "init":
        if not experiment.init_path:
            raise ValueError(f"config.frozen.{name}.path is 'init' but config.init.path is empty")
        if experiment.lora is not None:
            from ernie_jax.models import lora

            return lora.without_adapters(initial["transformer"])
        model = initial.get("transformer")
        if model is not None and jax.tree.leaves(nnx.state(model))[0].dtype == jnp.dtype(settings.dtype):
            return model
        return load_frozen_transformer(experiment, experiment.init_path, settings.dtype, mesh, rules)
    return load_frozen_transformer(experiment, settings.path, settings.dtype, mesh, rules)


def run(experiment: Experiment) -> None:
    from ernie_jax.data.pipeline import build_pipeline
    from ernie_jax.data.precompute import load_encoders
    from ernie_jax.data.precomputed import build_precomputed_pipeline
    from ernie_jax.data.preferences import build_preference_pipeline
    from ernie_jax.runner import evaluators
    from ernie_jax.runner.data import (
        FrozenEncoders,
        open_source,
        precomputed_sources,
        preference_sources,
    )
    from ernie_jax.runner.online_pairs import OnlinePairs, round_settings
    from ernie_jax.training import loop
    from ernie_jax.training.metrics import ProgressBar, TensorBoardWriter
    from ernie_jax.training.objectives.flow_matching import EmptyPrompt
    from ernie_jax.training.state import abstract_parts, part_rests

    config, workdir, num_steps = experiment.config, experiment.workdir, experiment.train.num_steps
    checkpoint_dir = workdir / "checkpoints"
    done = latest_step(checkpoint_dir) or 0
    if done >= num_steps:
        say(f"train: done ({done} of {num_steps} updates)")
        return
    encoders = load_encoders(experiment.components_dir, config.train.encoder_dtype)
    transformer_config = experiment.transformer_config(encoders.text_encoder.config.hidden_size,
                                                       encoders.vae.config.packed_channels)
    parts = trainable_parts(experiment, transformer_config)
    mesh, rules = experiment.mesh(), experiment.rules
    frozen = FrozenEncoders(encoders, config.data.max_text_len)
    online = round_settings(config)
    preferences = [] if online else preference_sources(experiment)
    if online:  # the rounds' pairs, made below once the policy exists
        data, prepare_batch, empty = None, None, frozen.empty_prompt()
    elif preferences:
        data = build_preference_pipeline(preferences, experiment.pipeline)
        empty_features = preferences[0].empty_prompt
        prepare_batch, empty = None, EmptyPrompt(empty_features, len(empty_features))
    elif experiment.precomputed():
        sources = precomputed_sources(experiment)
        # Text padded to max_text_len as FrozenEncoders pads it: the step compiles for the same shapes.
        data = build_precomputed_pipeline(sources, experiment.pipeline, text_multiple=config.data.max_text_len)
        prepare_batch, empty = None, EmptyPrompt(sources[0].empty_prompt, len(sources[0].empty_prompt))
    else:
        data = build_pipeline(open_source(config.data.source, experiment, "train"), experiment.pipeline)
        prepare_batch, empty = frozen, frozen.empty_prompt()
    shift = scheduler_shift(experiment.components_dir)
    objective = experiment.objective_module.make(
        experiment.objective, ObjectiveContext(empty, shift, tuple(getattr(data, "category_names", ()))))
    if sorted(objective.trains) != sorted(parts):
        raise ValueError(f"config.objective ({config.objective.name}) made an objective training "
                         f"{sorted(objective.trains)}, but its module's trains() named {sorted(parts)}")
    initial = initial_models(experiment, transformer_config, mesh, rules, fresh=not done)
    frozen_models = {name: frozen_model(experiment, name, initial, mesh, rules) for name in objective.reads}
    graphdef = abstract_parts(parts, seed=config.seed)[0]["transformer"]
    rest = part_rests(parts, seed=config.seed, mesh=mesh, rules=rules, initial=initial).get("transformer")

    def transformer_of(state, ema: bool = True) -> nnx.Module:
        """The transformer of the state's EMA weights (`ema`) or trained ones, with any frozen rest."""
        params = state.averaged_params() if ema else state.params
        return nnx.merge(graphdef, params["transformer"], *([] if rest is None else [rest]))

    rounds = None
    if online:
        rounds = OnlinePairs(experiment, encoders, mesh, rules, shift,
                             lambda state: transformer_of(state, ema=online.policy == "ema"))
        if not done:
            rounds.make(0, initial["transformer"])

    def data_stats() -> dict[str, float]:
        if rounds is not None:
            return rounds.summary()
        counts = {f"data/category/{name}": float(n) for name, n in data.stats.category_summary().items()}
        return {**data.stats.summary(), **counts}

    # Logs are written by the first process; every process runs the evaluators (collectives).
    writer = progress = None
    callbacks = []
    if jax.process_index() == 0:
        writer = TensorBoardWriter(workdir / "logs", purge_step=done + 1)  # update `done` logs at done + 1
        progress = ProgressBar(num_steps, lambda step: experiment.curriculum.stage_at(step).batch_size,
                               start_step=done)
        callbacks += [progress, writer.train_callback(config.logging.log_every, data_stats),
                      loop.JsonlMetrics(workdir / "metrics.jsonl")]
    context = evaluators.Context(experiment, encoders, frozen, mesh, rules, writer, shift, transformer_of)
    callbacks += evaluators.build(context)
    if rounds is not None:
        callbacks.append(rounds)  # makes each next round's pairs before the loop checkpoints its first update
    try:
        loop.train(experiment.train, parts, objective, data.iterator() if rounds is None else rounds.iterator(),
                   checkpoint_dir, mesh=mesh, rules=rules,
                   initial=initial, frozen=frozen_models, prepare_batch=prepare_batch, callbacks=callbacks)
    finally:
        for log in (progress, writer):
            if log is not None:
                log.close()
    say(f"train: done ({num_steps} updates, checkpoints in {checkpoint_dir})")
