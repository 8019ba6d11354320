"""Stage `evaluate`: WORKDIR/eval/samples.png and, on the shapes dataset, scores.json (the shapes detector's
scores of the held-out prompts next to their chance levels, and under "styles" those of the same scenes as
prompts of each style in `evaluation.styles`, such as "keywords", scored on what each prompt names), from
the exported pipeline."""

from __future__ import annotations

import json

import jax
import numpy as np

from ernie_jax.runner.config import SHAPES_SOURCE, Experiment
from ernie_jax.runner.stages import say


def run(experiment: Experiment) -> None:
    from conversions.common import atomic_directory
    from ernie_jax.evaluation.grid import save_grid
    from ernie_jax.pipeline import ErnieImagePipeline

    config, workdir = experiment.config, experiment.workdir
    destination = workdir / "eval"
    if destination.exists():
        say(f"evaluate: done ({destination})")
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
        prompts, scenes = list(e.prompts), None
    if not prompts:
        raise ValueError("evaluate: no prompts (config.evaluation.num_prompts and config.evaluation.prompts)")
    images = generate(prompts)
    styles = {}
    if scored:
        from ernie_jax.data.shapes import heldout_style_prompts

        # The same held-out scenes as prompts of other styles, each scored on the attributes it names.
        for style in e.get("styles", ()):
            styled = heldout_style_prompts(experiment.shapes_config(), e.num_prompts, style)
            styled_images = generate([prompt.text for prompt in styled])
            styles[style] = {"scores": shapes_detector.score_images(styled, styled_images),
                             "chance": shapes_detector.chance_levels(styled, styled_images)
                             if len(styled) > 1 else None}
    if jax.process_index() != 0:
        return
    with atomic_directory(destination) as staging:
        shown = min(len(prompts), 16)
        save_grid(staging / "samples.png", images[:shown], prompts[:shown], scale=max(1, 128 // side))
        if scored:
            report = {"num_prompts": len(prompts), "num_inference_steps": e.num_inference_steps,
                      "guidance_scale": e.guidance_scale,
                      "scores": shapes_detector.score_images(scenes, images),
                      "chance": shapes_detector.chance_levels(scenes, images) if len(scenes) > 1 else None,
                      "styles": styles}
            (staging / "scores.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"evaluate: wrote {destination}" + (f" (all-correct {report['scores']['all']:.3f})" if scored else ""))
