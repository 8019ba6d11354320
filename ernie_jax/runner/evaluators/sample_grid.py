"""`{"type": "sample_grid", "every": N, "prompts": [...], "seed": S, "steps": K, "guidance": G}`: every N
updates (and after the last) the EMA transformer samples the prompts (seed S, K steps, CFG G, at the current
curriculum stage's first bucket) into `WORKDIR/NAME/step_NNNNNN.png` and the TensorBoard image NAME.

The denoising loop runs on the training mesh with the training rules, over the EMA weights where they lie
(never gathered); the VAE decodes on the mesh too.
"""

from __future__ import annotations

import jax
from flax import nnx

from ernie_jax.runner.evaluators import Context, due


class SampleGrid:
    def __init__(self, name: str, settings, context: Context):
        self.name, self.settings, self.context = name, settings, context
        self.prompts = list(settings.prompts)
        encoders = context.encoders
        self.positive = encoders.encode_prompt(self.prompts)
        self.negative = encoders.encode_prompt([""]) * len(self.prompts)
        # The pipeline places its VAE on the mesh: a copy, so the frozen encoders' stays where training uses it.
        self.vae = nnx.clone(encoders.vae)

    def __call__(self, step: int, metrics: dict, state) -> None:
        from ernie_jax.evaluation.grid import image_grid, save_grid
        from ernie_jax.pipeline import ErnieImagePipeline

        experiment, s, c = self.context.experiment, self.settings, self.context
        if not self.prompts or not due(step, s.every, experiment.train.num_steps):
            return
        bucket = experiment.curriculum.stage_at(step).buckets[0]
        pipe = ErnieImagePipeline(c.transformer(state), self.vae, None, None, shift=c.shift, mesh=c.mesh,
                                  rules={"transformer": c.rules})
        images = pipe(prompt_embeds=self.positive, negative_prompt_embeds=self.negative, height=bucket.height,
                      width=bucket.width, num_inference_steps=s.steps, guidance_scale=s.guidance, seed=s.seed,
                      output_type="np").images
        if jax.process_index() == 0:
            folder = c.workdir / self.name
            folder.mkdir(parents=True, exist_ok=True)
            save_grid(folder / f"step_{step + 1:06d}.png", images, self.prompts)
            c.writer.image(step + 1, self.name, image_grid(images, self.prompts))


def make(name: str, settings, context: Context) -> SampleGrid:
    return SampleGrid(name, settings, context)
