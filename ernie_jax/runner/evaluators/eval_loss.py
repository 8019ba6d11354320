"""`{"type": "eval_loss", "every": N, "source": SRC, "batch_size": B, "objective": {...}}`: every N updates
(and after the last) the flow-matching loss of the EMA transformer on the held-out records of SRC ("shapes":
the shapes dataset's held-out split; or a folder), at the current stage's first bucket, with fixed noise (so
values at different steps compare), written as `NAME/loss`. `objective` holds the `FlowMatchingConfig`
fields of the sigma draw and weighting (text dropout is never applied).

The loss is compiled for the training mesh and rules: the EMA weights in their training shardings, the batch
split as a training batch.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from ernie_jax import parallel
from ernie_jax.runner.evaluators import Context, due
from ernie_jax.training.objectives import example_keys, flow_matching


class EvalLoss:
    def __init__(self, name: str, settings, context: Context):
        from ernie_jax.runner.data import open_source

        self.name, self.settings, self.context = name, settings, context
        self.source = open_source(settings.source, context.experiment, "heldout")
        self._batches = {}
        objective = dataclasses.replace(flow_matching.FlowMatchingConfig(**settings.get("objective", {})),
                                        text_dropout=0.0)

        def loss(weights, batch, key):
            model = nnx.merge(self._graphdef, weights)
            keys = example_keys(key, batch["latents"].shape[0])
            draw = flow_matching.draw_noise(keys, batch["latents"].shape, objective)
            value, _ = flow_matching.flow_matching_loss(model, batch["latents"], batch["text"], batch["text_lens"],
                                                        draw, weighting=objective.weighting)
            return value

        # The arguments' own shardings: the EMA weights as the train state holds them, the batch split as
        # `batches` puts it.
        self._loss = parallel.jit_sharded(loss, context.mesh, context.rules, None, parallel.replicated(context.mesh))

    def batches(self, bucket) -> list[dict]:
        """The held-out records at `bucket`, encoded once, in batches of `batch_size`."""
        if bucket not in self._batches:
            from ernie_jax.data.buckets import resize_and_crop
            from ernie_jax.data.sources import decode_image, record_caption

            mesh, rules, size = self.context.mesh, self.context.rules, self.settings.batch_size
            records = [self.source[i] for i in range(len(self.source))]
            batches = []
            for first in range(0, len(records) - size + 1, size):
                chunk = records[first:first + size]
                images = np.stack([resize_and_crop(decode_image(r["image"]), bucket) for r in chunk])
                batch = self.context.frozen({"images": images, "captions": [record_caption(r) for r in chunk]})
                # The same rows in every process: each builds its shards of the global batch.
                batches.append({k: parallel.put_array(v, parallel.batch_sharding(mesh, rules, v.shape))
                                for k, v in batch.items()})
            if not batches:
                raise ValueError(f"the eval source has {len(records)} records, fewer than one batch of {size}")
            self._batches[bucket] = batches
        return self._batches[bucket]

    def __call__(self, step: int, metrics: dict, state) -> None:
        experiment = self.context.experiment
        if not due(step, self.settings.every, experiment.train.num_steps):
            return
        batches = self.batches(experiment.curriculum.stage_at(step).buckets[0])
        key = jax.random.key(experiment.config.seed + 1)
        self._graphdef, weights = nnx.split(self.context.transformer(state))
        losses = [float(self._loss(weights, b, jax.random.fold_in(key, i))) for i, b in enumerate(batches)]
        if jax.process_index() == 0:
            self.context.writer.scalars(step + 1, {f"{self.name}/loss": float(np.mean(losses))})


def make(name: str, settings, context: Context) -> EvalLoss:
    return EvalLoss(name, settings, context)
