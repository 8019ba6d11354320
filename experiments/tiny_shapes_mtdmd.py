"""MT-DMD on the demo (issue 13): domain experts of the trained demo model, the committee of teachers that
multi-teacher DMD distils into an 8-step student.

    python -m ernie_jax.main --config experiments/tiny_shapes.py --workdir runs/tiny_shapes
    python -m ernie_jax.main --config experiments/tiny_shapes_mtdmd.py:expert_text --workdir runs/expert_text \\
        --config.components.path=runs/tiny_shapes/pipeline
    python -m experiments.mtdmd_shapes_study --base runs/tiny_shapes/pipeline --out runs/mtdmd_study

Every variant continues the demo's exported pipeline (its frozen VAE and text encoder, its EMA transformer as
the start) with flow matching on the demo's own 8000 training records (`precompute` encodes them again with
the pipeline's VAE; the study passes one precomputed folder to all runs instead):
- `expert_text`: the "text" category only (a word in capitals, with 0 or 1 shape): word rendering.
- `expert_layout`: the "counting" category only (two objects of one colour and shape in two named cells).
  Counting is where specialisation can help: it is a fifth of the demo's records and the generalist's
  weakest skill (count 0.53, whole objects 0.37 on the held-out prompts), and its scenes are the demo's only
  multi-object layouts that always have several objects. The "shapes" category is three fifths of the data
  already (a shapes-only run would see nearly the generalist's mix) and half of its scenes hold one object.
- `generalist_continued`: every category, as the demo trained: the control with the experts' compute, so
  that an expert's gain is not just more training.
The category restriction is `data.sampling.category_scales` (a factor per category on its sampling weight).
Each variant has a test-size `tiny_` twin (tiny random components, 2 updates). The DMD students (`student_*`,
the objective `training/objectives/dmd.py`) build on `base_config` as well.

Fine-tuning: 300 updates of 16 images at lr 2e-4 (constant after 10 warm-up updates), EMA 0.99: the
setting of the caption-style study (docs/caption_styles.md), whose continued runs neither collapsed nor
forgot; 300 text-only updates show the expert 4800 text images, about what the generalist saw in its whole
run (2000 x 16 x 1/5).
"""

from __future__ import annotations

import ml_collections

from ernie_jax.data.shapes import CATEGORIES
from experiments.ernie_image_pretrain import _model_fields
from experiments.tiny_shapes import get_config as demo_config

# expert variant -> the category it is fine-tuned on (the study's domains).
EXPERT_DOMAINS = {"expert_text": "text", "expert_layout": "counting"}
CONTROL = "generalist_continued"
FULL_SIZE = (*EXPERT_DOMAINS, CONTROL)
VARIANTS = (*FULL_SIZE, *(f"tiny_{name}" for name in FULL_SIZE))
STEPS = 300


def base_config(tiny: bool) -> ml_collections.ConfigDict:
    """The demo continued from its exported pipeline (`components.path`), every category, flow matching; the
    shared start of the experts and the students. `tiny`: test size from tiny random components."""
    config = demo_config("tiny" if tiny else "")
    config.name = "tiny_shapes_mtdmd"
    config.stages = ("precompute", "train", "export")
    config.components.update(kind="pretrained", path="")
    config.init.update(path="components", dtype="float32")
    config.data.update(stage_steps=(STEPS,), batch_sizes=(16,))
    config.data.sampling.category_scales = {}
    config.train.update(ema_decay=0.99, checkpoint_every=STEPS)
    config.train.optimizer.update(learning_rate=2e-4, warmup_steps=10, decay_steps=STEPS, final_lr_fraction=1.0)
    config.evals.samples.every = STEPS
    config.evals.eval.every = STEPS
    if tiny:
        config.stages = ("components", *config.stages)
        config.components.update(kind="random")
        config.model.update(**_model_fields("tiny"))
        config.data.update(stage_steps=(2,), batch_sizes=(2,))
        config.train.update(checkpoint_every=2)
        config.train.optimizer.update(warmup_steps=1, decay_steps=2)
        config.evals = ml_collections.ConfigDict()  # the study scores the export; the test stays short
    return config


def get_config(variant: str = "expert_text") -> ml_collections.ConfigDict:
    """The config of `variant` (one of VARIANTS)."""
    if variant not in VARIANTS:
        raise ValueError(f"tiny_shapes_mtdmd: unknown variant {variant!r}; choose one of {VARIANTS}")
    name = variant.removeprefix("tiny_")
    config = base_config(tiny=variant.startswith("tiny_"))
    config.name = f"tiny_shapes_mtdmd_{variant}"
    config.variant = variant
    if name in EXPERT_DOMAINS:
        others = [c for c in CATEGORIES if c != EXPERT_DOMAINS[name]]
        config.data.sampling.category_scales = dict.fromkeys(others, 0.0)
    return config
