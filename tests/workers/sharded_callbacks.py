"""The runner's sample-grid and eval-loss callbacks on an 8-device fsdp mesh, against the same computations
on one device from the gathered EMA weights. `run` reports the largest pixel difference of the grids,
the eval losses, and whether each program took the EMA weights in their training shardings (split, never
gathered). Run by tests/workers/sharded_runner.py.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from conversions.random_checkpoint import write_random_pipeline
from ernie_jax import parallel
from ernie_jax.data.precompute import load_encoders
from ernie_jax.evaluation.grid import image_grid
from ernie_jax.pipeline import ErnieImagePipeline
from ernie_jax.runner import evaluators
from ernie_jax.runner.config import resolve
from ernie_jax.runner.data import FrozenEncoders
from ernie_jax.runner.stages import scheduler_shift
from ernie_jax.runner.stages.train import trainable_parts
from ernie_jax.training.objectives import example_keys, flow_matching
from ernie_jax.training.state import create_train_state
from experiments.tiny_shapes import get_config

RULES = parallel.TRAINING_RULES


class Writer:
    def __init__(self):
        self.images, self.values = {}, {}

    def image(self, step, tag, image):
        self.images[tag] = np.asarray(image)

    def scalars(self, step, values):
        self.values.update(values)


def record_programs(programs: list):
    """parallel.jit_sharded, recording each program's function and input shardings."""
    jit_sharded = parallel.jit_sharded

    def recording(fn, mesh, rules, in_shardings, *args, **kwargs):
        programs.append((getattr(fn, "func", fn), in_shardings))
        return jit_sharded(fn, mesh, rules, in_shardings, *args, **kwargs)

    parallel.jit_sharded = recording


def same_shardings(shardings, arrays) -> bool:
    return all(s == a.sharding for s, a in zip(jax.tree.leaves(shardings), jax.tree.leaves(arrays), strict=True))


def run(workdir: Path) -> dict:
    components = workdir / "components"
    write_random_pipeline(components, "tiny")
    encoders = load_encoders(components)
    config = get_config("tiny")
    config.components.update(kind="pretrained", path=str(components))
    config.mesh.ici.fsdp = 8
    config.evals.eval.batch_size = 8  # both batches split 8 ways (4 prompts x CFG)
    config.evals.samples.steps = 2
    experiment = resolve(config, workdir)
    transformer_config = experiment.transformer_config(encoders.text_encoder.config.hidden_size,
                                                       encoders.vae.config.packed_channels)
    mesh = experiment.mesh()
    graphdefs, state = create_train_state(trainable_parts(experiment, transformer_config), seed=0, mesh=mesh,
                                          rules=RULES)
    graphdef = graphdefs["transformer"]
    host_ema = jax.device_get(state.ema_params["transformer"])
    shift = scheduler_shift(components)
    programs = []
    record_programs(programs)
    writer = Writer()
    last = experiment.train.num_steps - 1
    frozen = FrozenEncoders(encoders, config.data.max_text_len)
    context = evaluators.Context(experiment, encoders, frozen, mesh, RULES, writer, shift,
                                 lambda s: nnx.merge(graphdef, s.ema_params["transformer"]))
    callbacks = dict(zip(config.evals.keys(), evaluators.build(context)))
    grids, evaluation = callbacks["samples"], callbacks["eval"]
    grids(last, {}, state)
    evaluation(last, {}, state)

    # One device, the gathered EMA: the grid and the loss as the callbacks computed them before.
    log = config.evals.samples
    prompts = list(log.prompts)
    pipe = ErnieImagePipeline(nnx.merge(graphdef, host_ema), encoders.vae, None, None, shift=shift)
    images = pipe(prompt_embeds=encoders.encode_prompt(prompts), negative_prompt_embeds=encoders.encode_prompt(
        [""]) * len(prompts), height=64, width=64, num_inference_steps=log.steps,
        guidance_scale=log.guidance, seed=log.seed, output_type="np").images
    objective = flow_matching.FlowMatchingConfig(**config.evals.eval.objective)
    (batch,) = evaluation.batches(experiment.curriculum.stage_at(last).buckets[0])
    host_batch = {k: np.asarray(v) for k, v in batch.items()}
    keys = example_keys(jax.random.fold_in(jax.random.key(config.seed + 1), 0), host_batch["latents"].shape[0])
    draw = flow_matching.draw_noise(keys, host_batch["latents"].shape, objective)
    loss, _ = jax.jit(lambda p: flow_matching.flow_matching_loss(
        nnx.merge(graphdef, p), host_batch["latents"], host_batch["text"], host_batch["text_lens"], draw,
        weighting=objective.weighting))(host_ema)

    denoise = [shardings for fn, shardings in programs if getattr(fn, "__name__", "") == "denoise_loop"]
    ema = state.ema_params["transformer"]
    compiled = evaluation._loss.lower(ema, batch, jax.random.key(0)).compile()
    kernel = ema["layers"]["mlp"]["gate_proj"]["kernel"][...]
    return {"grid_difference": int(np.abs(writer.images["samples"].astype(int)
                                          - image_grid(images, prompts).astype(int)).max()),
            "images_std": float(images.std()),
            "eval_loss": writer.values["eval/loss"], "reference_loss": float(loss),
            "denoise_programs": len(denoise),
            "denoise_weights_as_trained": len(denoise) == 1 and same_shardings(denoise[0][0], ema),
            "eval_weights_as_trained": same_shardings(compiled.input_shardings[0][0], ema),
            "eval_batch_split": [list(a.sharding.shard_shape(a.shape)) for a in jax.tree.leaves(batch)][0],
            "kernel_shard": list(kernel.sharding.shard_shape(kernel.shape))}

