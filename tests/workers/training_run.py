"""A small flow-matching run of a one-block tiny DiT on synthetic data, as a process that can be killed.

Usage: python tests/workers/training_run.py CHECKPOINT_DIR LOG.jsonl --num-steps N --checkpoint-every K
       [--max-to-keep M] [--step-delay SECONDS] [--nan-at-step S]

Each update appends {"step", "loss", ..., "first_index"} to LOG.jsonl, where first_index is the dataset
index of the batch's first example (so a resumed run shows which data it saw). Started again with the
same CHECKPOINT_DIR, it resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import grain
import jax.numpy as jnp
import numpy as np

from ernie_jax import parallel
from ernie_jax.models.dit import PRESETS, ErnieImageTransformer
from ernie_jax.training import loop
from ernie_jax.training.objectives import flow_matching
from ernie_jax.training.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from ernie_jax.training.state import TrainablePart

BATCH = 4
TEXT_LEN = 8
TEXT_DIM = 64
LATENT_SHAPE = (128, 4, 4)
CONFIG = dataclasses.replace(PRESETS["tiny"], num_layers=1)


def tiny_model(rngs, dtype=jnp.float32) -> ErnieImageTransformer:
    return ErnieImageTransformer(CONFIG, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def example(index: int, nan: bool = False) -> dict[str, np.ndarray]:
    """Example `index` of the synthetic dataset (inf latents when `nan`)."""
    rng = np.random.default_rng(index)
    latents = rng.standard_normal(LATENT_SHAPE, np.float32)
    if nan:
        latents[:] = np.inf
    return {"latents": latents, "text": rng.standard_normal((TEXT_LEN, TEXT_DIM), np.float32),
            "text_lens": np.int32(1 + index % TEXT_LEN), "index": np.int32(index)}


def dataset(num_steps: int, batch: int = BATCH, nan_at_step: int | None = None) -> grain.MapDataset:
    """Batches of `example`s, enough for `num_steps` updates; the batch of update `nan_at_step` is inf."""
    def make(index):
        return example(index, nan=nan_at_step is not None and index // batch == nan_at_step)

    return grain.MapDataset.range(num_steps * batch).map(make).batch(batch)


def empty_prompt() -> flow_matching.EmptyPrompt:
    return flow_matching.EmptyPrompt(np.random.default_rng(1234).standard_normal((1, TEXT_DIM), np.float32), 1)


OPTIMIZER = OptimizerConfig(learning_rate=1e-3, warmup_steps=2, decay_steps=100, weight_decay=0.01)


def train_config(num_steps: int, checkpoint_every: int, max_to_keep: int = 3) -> loop.TrainConfig:
    return loop.TrainConfig(num_steps=num_steps, seed=0, checkpoint_every=checkpoint_every, max_to_keep=max_to_keep)


def parts(model=tiny_model) -> dict[str, TrainablePart]:
    """The one trainable part, "transformer": `model` with the run's AdamW and EMA decay 0.9."""
    return {"transformer": TrainablePart(model, make_optimizer(OPTIMIZER), ema_decay=0.9,
                                         learning_rate=learning_rate_schedule(OPTIMIZER))}


def objective() -> flow_matching.FlowMatching:
    return flow_matching.FlowMatching(flow_matching.FlowMatchingConfig(shift=3.0, text_dropout=0.25), empty_prompt())


def run(checkpoint_dir, log_path, *, num_steps: int, checkpoint_every: int, max_to_keep: int = 3,
        step_delay: float = 0.0, nan_at_step: int | None = None):
    seen = {}

    def prepare(batch):
        seen["first_index"] = int(batch["index"][0])
        return batch

    log = loop.JsonlMetrics(log_path)

    def record(step, metrics, state):
        log(step, {**metrics, **seen}, state)
        time.sleep(step_delay)

    mesh = parallel.make_mesh({"fsdp": -1})
    return loop.train(train_config(num_steps, checkpoint_every, max_to_keep), parts(), objective(),
                      iter(dataset(num_steps, nan_at_step=nan_at_step).to_iter_dataset()), checkpoint_dir,
                      mesh=mesh, prepare_batch=prepare, callbacks=[record])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir")
    parser.add_argument("log")
    parser.add_argument("--num-steps", type=int, required=True)
    parser.add_argument("--checkpoint-every", type=int, required=True)
    parser.add_argument("--max-to-keep", type=int, default=3)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--nan-at-step", type=int)
    args = parser.parse_args()
    run(args.checkpoint_dir, args.log, num_steps=args.num_steps, checkpoint_every=args.checkpoint_every,
        max_to_keep=args.max_to_keep, step_delay=args.step_delay, nan_at_step=args.nan_at_step)


if __name__ == "__main__":
    main()
