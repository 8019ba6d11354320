"""ERNIE-Image MT-DMD: distribution-matching distillation of a trained ERNIE-Image pipeline's DiT (the
released one, a converted checkpoint or your own SFT / DPO run's export) into an 8-step student sampled at
cfg 1 (ERNIE-Image-Turbo's preset), with the real score from one frozen teacher (DMD2) or a routed committee
of expert teachers (the report's MT-DMD), at 1024^2 multi-aspect.

    python -m ernie_jax.main --config experiments/ernie_image_mtdmd.py:8xh100 --workdir /mnt/runs/mtdmd \\
        --config.components.path=/data/ERNIE-Image --config.data.source=/data/my_prompt_records

The exported pipeline (WORKDIR/pipeline/, diffusers-loadable, its transformer the student) samples with
ERNIE-Image-Turbo's preset, 8 steps at guidance 1.0:

    python -m ernie_jax.generate --model /mnt/runs/mtdmd/pipeline --turbo --prompt "..."

(with a student trained for another step count, `objective.student_steps=N`, add `--steps N`: the student
learnt the pipeline's shifted sigma grid at N steps).

Variants: a mesh preset of the pre-training config (`8xh100`, `v5p-64`, `v6e-256`: same meshes, attention
kernels and device memory) or `tiny` (test size on a CPU: tiny random components, whose random transformer
stands in for the trained teacher), each optionally with `-lora` (rank 64 adapters on the student and on the
critic, both over one frozen bf16 base that is also the teacher: one copy of the 8B weights).

Parts (ernie_jax/training/objectives/dmd.py): the student `transformer` (what export writes) and the fake
score `critic` both start from the components' transformer (`init.path` "components"), each with its own
Adam and EMA (`config.parts`); the teacher is that same transformer frozen in bf16 (`frozen.teacher.path`
"init"; with LoRA the base with the adapters off). One step is `critic_updates` (TTUR, 5) critic updates and
one generator update, each on its own sixth of the batch, so the global batch is (critic_updates + 1) x the
devices (one image per device per update). The data's records only give prompts (and the latents' shapes):
the student makes its own samples (backward simulation over its 8-step grid), so captions matter, pixels
do not, unless the GAN head is on (`objective.gan_weight > 0`: the real latents are its positives).

Hyperparameters (training_algorithms.md sections 2.2-2.3; the report gives none for MT-DMD): FastGen's
FLUX DMD2 (lr 1e-5 for student and critic, 5 critic updates per generator update, sigmas U(0, 1), ~5k
updates), DMD2's AdamW (0.9, 0.999, weight decay 0.01, clip 10), the teacher's CFG 4.0 (the base pipeline's
guidance, ERNIE-Image's default) in x0 space, no GAN head by default (DMD2's FLUX recipe weighs it 0.03:
`--config.objective.gan_weight=0.03`). LoRA trains at 10x the learning rate.

DMD v1's regression to the teacher's ODE outputs (off: `objective.regression_weight` 0), for ablation: with
`--config.objective.regression_weight=0.25 --config.stages="('components','precompute','ode_pairs','train',
'export','evaluate')"` the `ode_pairs` stage samples the frozen teacher from seeded noise for the first
`ode_pairs.records` (1000) precomputed records, at 50 Euler steps with the teacher's CFG, and training reads
those records with their pairs (dmd.py's regression term). Each pair costs 100 teacher forwards at 1024^2, and
the stage samples on one device per host: plan hours.

Expert teachers (MT-DMD): `with_expert_teachers(config, {"text": "/ckpt/text_expert", ...}, ...)` adds
frozen teachers from pipeline or transformer folders (fine-tunes of the base, e.g. exports of SFT runs on
one domain each) and the gate that routes between them; the variant suffix `-experts` (e.g.
`8xh100-experts`) sets up a two-expert committee on top of the base teacher (`EXPERT_GATE`) whose folders
you give as `--config.frozen.text.path=/ckpt/text_expert --config.frozen.layout.path=/ckpt/layout_expert`.
Each expert costs one more bf16 copy of the 8B weights per device shard (`memory_plans` plans it;
docs/memory_plans.md has the table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ml_collections

from experiments.ernie_image_pretrain import memory_plans  # noqa: F401 (memory_plans: this config's)
from experiments.ernie_image_sft import MESHES, post_training_config

VARIANTS = tuple(f"{mesh}{lora}{experts}" for mesh in MESHES for lora in ("", "-lora")
                 for experts in ("", "-experts"))
SIDE = 1024
STUDENT_STEPS = 8
CRITIC_UPDATES = 5
GUIDANCE = 4.0
# The `-experts` variant's committee: the base teacher plus a text-rendering and a layout expert. The layout
# expert supervises high noise (sigma > 0.6, where composition is decided), the text expert low noise
# (sigma < 0.3, where glyphs are drawn), each sharing its bin with the base teacher, which alone takes the
# middle (the report's routing along the trajectory, section 2.5; the edges are guesses to tune). Routing by
# prompt domain (`domain_routes`, one route per data category) and by term (`objective_routes`, e.g.
# {"ca": "text"}) go through the same helper.
EXPERT_GATE = {
    "sigma_edges": (0.3, 0.6),
    "sigma_routes": ({"teacher": 1.0, "text": 1.0}, "teacher", {"teacher": 1.0, "layout": 1.0}),
    "objective_routes": {},
}


def with_expert_teachers(config: ml_collections.ConfigDict, experts: Mapping[str, str], *,
                         sigma_edges: Sequence[float] = (), sigma_routes: Sequence = (),
                         domain_routes: Sequence = (), objective_routes: Mapping | None = None,
                         dtype: str = "bfloat16") -> ml_collections.ConfigDict:
    """`config` with the frozen teachers `experts` (name -> a pipeline or transformer folder, or "init" for the
    starting model; held in `dtype`)
    added to the committee after the existing ones, and the gate (dmd.Config's fields): `sigma_edges`
    (ascending interior sigma edges) with one `sigma_routes` route per bin, `domain_routes` (one route per
    data category id, in the order of the data's category names), `objective_routes` ({"dm" / "ca": route}).
    A route is a teacher name (one-hot) or a mapping name -> weight; a gate's weight is the normalised product
    of its three routes."""
    for name, path in experts.items():
        if name in config.frozen:
            raise ValueError(f"expert teacher {name!r} is already a frozen model of this config")
        config.frozen[name] = ml_collections.ConfigDict({"path": path, "dtype": dtype})
    config.objective.teachers = (*config.objective.teachers, *experts)
    config.objective.update(sigma_edges=tuple(sigma_edges), sigma_routes=tuple(sigma_routes),
                            domain_routes=tuple(domain_routes), objective_routes=dict(objective_routes or {}))
    return config


def get_config(variant: str = "8xh100") -> ml_collections.ConfigDict:
    """The MT-DMD config for `variant` (one of VARIANTS)."""
    if variant not in VARIANTS:
        raise ValueError(f"ernie_image_mtdmd: unknown variant {variant!r}; choose one of {VARIANTS}")
    experts = variant.endswith("-experts")
    base_variant = variant.removesuffix("-experts")
    config, mesh, lora = post_training_config("ernie_image_mtdmd", base_variant)
    config.name, config.variant = f"ernie_image_mtdmd_{variant}", variant
    config.frozen = ml_collections.ConfigDict({"teacher": {"path": "init", "dtype": "bfloat16"}})
    config.objective = ml_collections.ConfigDict({
        "name": "dmd", "teachers": ("teacher",), "student_steps": STUDENT_STEPS,
        "student_shift": None,  # the pipeline's scheduler shift: the grid `--turbo` samples on
        "student_input": "backward_simulation", "guidance_scale": GUIDANCE,
        "dm_sigmas": {"sigma_scheme": "uniform"}, "ca_sigmas": {"sigma_scheme": "uniform"},
        "critic": {"sigma_scheme": "uniform", "weighting": "none", "text_dropout": 0.0},
        "critic_updates": CRITIC_UPDATES, "gan_weight": 0.0, "regression_weight": 0.0})
    devices = 1
    for size in config.mesh.ici.values():
        devices *= max(size, 1)
    batch = (CRITIC_UPDATES + 1) * devices
    config.data.update(stage_steps=(5_000,), batch_sizes=(batch,), sides=(SIDE,))
    learning_rate = 1e-4 if lora else 1e-5
    config.train.optimizer.update(learning_rate=learning_rate, warmup_steps=100, decay_steps=5_000,
                                  final_lr_fraction=1.0, b1=0.9, b2=0.999, weight_decay=0.0 if lora else 0.01,
                                  clip_norm=10.0)
    config.train.ema_decay = 0.999
    config.train.checkpoint_every = 500
    # The critic tracks the student's current distribution: its own average is never used.
    config.parts = ml_collections.ConfigDict({"critic": {"ema_decay": 0.0}})
    config.evals.samples.update(every=500, steps=STUDENT_STEPS, guidance=1.0)
    config.evaluation.update(num_inference_steps=STUDENT_STEPS, guidance_scale=1.0)
    if mesh == "tiny":
        config.init.dtype = "float32"
        config.frozen.teacher.dtype = "float32"
        config.lora.update(rank=4 if lora else 0, alpha=4.0, base_dtype="float32")
        config.objective.update(student_steps=2, guidance_scale=2.0)
        config.data.update(stage_steps=(2,), batch_sizes=(CRITIC_UPDATES + 1,), sides=(32,))
        config.data.shapes.update(height=32, width=32)
        config.train.optimizer.update(learning_rate=1e-2 if lora else 1e-3, warmup_steps=0, decay_steps=2)
        config.evals = ml_collections.ConfigDict({})
        config.evaluation.update(num_prompts=0, num_inference_steps=2)
    # The regression term's pairs (made only when regression_weight > 0 and the ode_pairs stage runs).
    config.ode_pairs = ml_collections.ConfigDict({
        "teacher": "teacher", "records": 1000, "seed": 0, "num_inference_steps": 50,
        "guidance_scale": config.objective.guidance_scale, "batch_size": 4})
    if experts:
        # Folders to set on the command line; at test size the starting model itself ("init") stands in.
        path = "init" if mesh == "tiny" else ""
        with_expert_teachers(config, {"text": path, "layout": path}, **EXPERT_GATE, dtype=config.frozen.teacher.dtype)
    return config
