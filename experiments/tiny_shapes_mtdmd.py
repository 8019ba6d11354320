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
Each variant has a test-size `tiny_` twin (tiny random components, 2 updates).

The 8-step students (`training/objectives/dmd.py`), from the same start (student and critic both the demo
teacher, `init.path`), distilled with the same compute:
- `student_dmd2`: single-teacher DMD2, the demo teacher ("init") with the demo's evaluation CFG 3 as the real
  score;
- `student_mtdmd`: the committee: the text expert (`frozen.expert_text.path`, an `expert_text` run's
  pipeline; the study passes the one of the same seed) for the "text" records, the teacher for the others
  (`domain_routes`). The layout expert gets no gate: it was not better than the generalist on counting
  (docs/mtdmd_shapes.md), and routing to it would only add noise;
- `student_dmd2_noised_data`: the ablation of backward simulation: `student_dmd2` with the student's input
  at step k the data noised to sigma_k;
- `student_dmd2_gan`: `student_dmd2` with DMD2's GAN head on the critic's features (generator weight 5e-3,
  discriminator 1e-2, the head trained in the critic updates at the critic's learning rate);
  `student_dmd2_gan10` the same head at ten times those weights;
- `student_dmd2_ttur1`: `student_dmd2` with one critic update per generator update instead of five (TTUR 1),
  each update still on 8 records.
- `student_dmd2_ode`: `student_dmd2` with DMD v1's regression to the teacher's ODE outputs (`regression_weight`
  0.25, DMD v1's weight) on 2000 (noise, output) pairs the `ode_pairs` stage makes from the demo teacher at 50
  Euler steps with CFG 3 (measured on 2 shared CPU cores: 1.1 to 2.0 pairs a second, 17 to 31 minutes); the
  students' stages list `ode_pairs`, which does nothing for the others. The whole objective then trains on
  those 2000 records' prompts (not the 8000), so the ablation also narrows the DMD term's prompts:
  `--config.ode_pairs.records=0` pairs every record (4 times as long) and keeps student_dmd2's draws exactly.
The student samples at 8 steps, cfg 1, on the pipeline's shifted grid; backward simulation, DMD2's coupled
DM + CA terms, TTUR 5 (`critic_updates`): one training step = 5 critic updates and 1 generator update, each
on its own 8 of the batch's 48 records.

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
# student variant -> {category: the frozen teacher its DMD real score comes from}; other categories: "teacher".
STUDENTS = {"student_dmd2": {}, "student_mtdmd": {"text": "expert_text"}}
# ablation variant -> (the student it changes, its objective fields).
ABLATIONS = {"student_dmd2_noised_data": ("student_dmd2", {"student_input": "noised_data"}),
             # DMD2's SDXL weights (generator 5e-3, discriminator 1e-2) on the same DMD loss scale.
             "student_dmd2_gan": ("student_dmd2", {"gan_weight": 5e-3, "gan_discriminator_weight": 1e-2}),
             # Ten times DMD2's weights: at 5e-3 the head's term was 0.7 % of the generator loss and changed no
             # detector score (docs/mtdmd_shapes.md), so this asks whether it matters once it weighs ~7 %.
             "student_dmd2_gan10": ("student_dmd2", {"gan_weight": 5e-2, "gan_discriminator_weight": 1e-1}),
             "student_dmd2_ttur1": ("student_dmd2", {"critic_updates": 1}),
             # DMD v1's regression weight (lambda_reg, as training_algorithms.md 2.1 gives it). Per element, the
             # DMD term pulls x by its direction normalised per sample by mean|x - x0_real| (DMD v1's weighting
             # too): O(1); the regression pulls x_ode by 2 x 0.25 (x_ode - ode_target), half its latent error: as
             # strong while the student is about one unit of the normalised latents from the teacher's output,
             # weaker as it closes in (DMD v1's LPIPS had a scale of its own; this is latent MSE).
             "student_dmd2_ode": ("student_dmd2", {"regression_weight": 0.25})}
FULL_SIZE = (*EXPERT_DOMAINS, CONTROL, *STUDENTS, *ABLATIONS)
VARIANTS = (*FULL_SIZE, *(f"tiny_{name}" for name in FULL_SIZE))
STEPS = 300
# Students: training steps (each `critic_updates` critic + 1 generator update) and the records of each update
# (a step's batch is split between its updates).
STUDENT_STEPS = 250
STUDENT_UPDATE_BATCH = 8
# The records that get teacher ODE pairs for the regression ablation (the smallest source indices).
ODE_PAIRS = 2000


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
    if name in ABLATIONS:
        name, fields = ABLATIONS[name]
        student_config(config, STUDENTS[name], tiny=variant.startswith("tiny_"), objective_fields=fields)
    elif name in STUDENTS:
        student_config(config, STUDENTS[name], tiny=variant.startswith("tiny_"))
    return config


def student_config(config: ml_collections.ConfigDict, experts: dict[str, str], tiny: bool,
                   objective_fields: dict | None = None) -> None:
    """Turns `base_config` into a DMD student run: `experts` {category: frozen teacher name} routes those
    categories' records to that teacher (`frozen.NAME.path` to set, "" until then), every other one to the
    starting model ("teacher"); `objective_fields` change the objective (an ablation)."""
    teachers = ("teacher", *dict.fromkeys(experts.values()))
    # domain_routes are by category id, and the data numbers the categories it finds in sorted order.
    routes = tuple(experts.get(category, "teacher") for category in sorted(CATEGORIES)) if experts else ()
    config.objective = ml_collections.ConfigDict({
        "name": "dmd", "teachers": teachers, "student_steps": 8, "student_input": "backward_simulation",
        "guidance_scale": 3.0,  # the demo's evaluation CFG (experiments/tiny_shapes.py)
        "decoupled": False, "domain_routes": routes, "critic_updates": 5, "gan_weight": 0.0})
    config.objective.update(objective_fields or {})
    config.frozen = ml_collections.ConfigDict({"teacher": {"path": "init", "dtype": "float32"}})
    # The teacher's ODE pairs (the regression term's targets): made by the `ode_pairs` stage only for a run whose
    # objective reads them (regression_weight > 0), from the demo teacher at its evaluation CFG and 50 steps.
    stages = list(config.stages)
    config.stages = (*stages[:stages.index("precompute") + 1], "ode_pairs", *stages[stages.index("precompute") + 1:])
    config.ode_pairs = ml_collections.ConfigDict({
        "teacher": "teacher", "records": 16 if tiny else ODE_PAIRS, "seed": 0, "num_inference_steps": 4 if tiny else 50,
        "guidance_scale": config.objective.guidance_scale, "batch_size": 16})
    for name in teachers[1:]:
        config.frozen[name] = ml_collections.ConfigDict({"path": "", "dtype": "float32"})
    steps = 2 if tiny else STUDENT_STEPS
    # Every update sees as many records whatever the TTUR ratio: a ratio ablation changes the critic's number of
    # updates, not their size.
    updates = config.objective.critic_updates + 1
    config.data.update(stage_steps=(steps,), batch_sizes=((1 if tiny else STUDENT_UPDATE_BATCH) * updates,))
    config.train.update(ema_decay=0.95, checkpoint_every=steps)
    config.train.optimizer.update(learning_rate=5e-5, warmup_steps=1 if tiny else 10, decay_steps=steps,
                                  final_lr_fraction=1.0, weight_decay=0.0)
    # The critic tracks the moving student: twice the student's learning rate, no EMA (only its live weights
    # are read).
    config.parts = ml_collections.ConfigDict({"critic": {"optimizer": {"learning_rate": 1e-4}, "ema_decay": 0.0}})
    if config.objective.gan_weight > 0:  # the head is trained with the critic, as in DMD2
        config.parts.discriminator = ml_collections.ConfigDict(config.parts.critic.to_dict())
    if not tiny:
        config.evals.samples.update(every=steps, steps=8, guidance=1.0)  # the grid at the student's setting
        config.evals.eval.every = steps
