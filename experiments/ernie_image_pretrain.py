"""ERNIE-Image pre-training: the 8B DiT from scratch with flow matching on the report's 256^2 -> 512^2 ->
1024^2 multi-aspect curriculum, the released FLUX.2 VAE and Mistral text encoder frozen.

    python -m ernie_jax.main --config experiments/ernie_image_pretrain.py:v5p-64 --workdir /mnt/runs/pretrain \\
        --config.components.path=/data/ERNIE-Image --config.data.source=/data/my_tfds_dataset

Variants (mesh, per-stage global batch, remat, attention kernel, device memory):
  8xh100    one host of 8 H100 80GB: fsdp=8, batches 512/128/32, cudnn attention
  v5p-64    a TPU v5p-64 slice (32 chips, 95 GiB each): fsdp=32, batches 2048/512/128, splash attention
  v6e-256   a TPU v6e-256 slice (256 chips, 32 GiB each): fsdp=256, batches 4096/1024/512, splash attention
  tiny      the same run at test size on a CPU: tiny random components (conversions.random_checkpoint), a
            2-layer DiT, shapes images, the curriculum scaled to 64 -> 128 px, one update per stage.
All use AdamW on float32 master weights with bf16 compute (on accelerators), full remat, EMA. The report
gives no stage lengths or batch sizes (training_algorithms.md sections 6, 8.11): those here are config
values to tune. `memory_plans(config)` checks with `ernie_jax.plan` that each stage fits the devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import ml_collections

from ernie_jax.models.dit import PRESETS
from ernie_jax.parallel import TRAINING_RULES

# name: (mesh ici sizes, per-stage global batch, attention kernel, device memory for the plan)
MESH_PRESETS = {
    "8xh100": ({"fsdp": 8}, (512, 128, 32), "cudnn", "80GiB"),
    "v5p-64": ({"fsdp": 32}, (2048, 512, 128), "splash", "95GiB"),
    "v6e-256": ({"fsdp": 256}, (4096, 1024, 512), "splash", "32GiB"),
}
VARIANTS = (*MESH_PRESETS, "tiny")
SAMPLE_PROMPTS = (
    "a photo of a cat sitting on a wooden table, soft morning light",
    'a minimalist poster with the word "ERNIE" in bold red letters',
    "an isometric illustration of a lighthouse at dusk",
    "a bowl of ramen, top view, studio lighting",
)


def _model_fields(preset: str) -> dict:
    fields = dataclasses.asdict(PRESETS[preset])
    for derived in ("in_channels", "out_channels", "text_in_dim"):  # taken from the frozen components
        fields.pop(derived)
    fields["rope_axes_dim"] = tuple(fields["rope_axes_dim"])
    return fields


def get_config(variant: str = "8xh100") -> ml_collections.ConfigDict:
    """The pre-training config for `variant` (one of VARIANTS)."""
    if variant not in VARIANTS:
        raise ValueError(f"ernie_image_pretrain: unknown variant {variant!r}; choose one of {VARIANTS}")
    config = ml_collections.ConfigDict()
    config.name = f"ernie_image_pretrain_{variant}"
    config.variant = variant
    config.seed = 0
    config.stages = ("components", "train", "export", "evaluate")
    config.components = ml_collections.ConfigDict({
        "kind": "pretrained",        # the released ERNIE-Image folder: its VAE, text encoder and tokenizer
        "path": "",                  # required: --config.components.path=/path/to/ERNIE-Image
        "scheduler_shift": 4.0,
    })
    config.data = ml_collections.ConfigDict({
        "source": "",                # a tfds dataset folder or an image folder (records with captions); required
                                     # unless "precomputed" is set
        # Folders of `python -m ernie_jax.data.precompute` (one per stage side, or a list of a side's host
        # shards): when set, training reads their latents and text features instead of running the encoders.
        "precomputed": (),
        # Preference folders (data.preferences: a manifest's or generated pairs) that DPO trains on instead.
        "preferences": (),
        "shapes": {"height": 64, "width": 64, "max_objects": 2, "num_records": 0, "num_eval_records": 0},
        "stage_steps": (200_000, 100_000, 50_000),
        "batch_sizes": (256, 64, 16),
        "sides": (256, 512, 1024),
        "aspect_buckets": True,
        "max_crop_fraction": 0.25,
        "max_text_len": 256,
        "sampling": {"category_formula": "tempered", "tau": 0.5, "within_category": "softmax"},
        "caption_styles": {},        # SFT's prompt-style mix (data.prompt_styles.StyleMix fields); empty: none
    })
    config.model = ml_collections.ConfigDict(dict(
        **_model_fields("full"), dtype="bfloat16", remat="full", attention_impl="cudnn"))
    sigmas = {"sigma_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "shift": 4.0,
              "weighting": "none"}
    config.objective = ml_collections.ConfigDict({"name": "flow_matching", **sigmas, "text_dropout": 0.1})
    config.init = ml_collections.ConfigDict({"path": "", "dtype": "float32"})
    config.frozen = ml_collections.ConfigDict({})
    config.train = ml_collections.ConfigDict({
        "microbatches": 1, "ema_decay": 0.9999, "checkpoint_every": 2000, "max_to_keep": 3, "async_checkpoints": True,
        "encoder_dtype": "bfloat16",
        "optimizer": {"learning_rate": 1e-4, "warmup_steps": 5000, "decay_steps": 350_000,
                      "final_lr_fraction": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.01,
                      "clip_norm": 1.0},
    })
    config.mesh = ml_collections.ConfigDict({
        "ici": {"data": 1, "fsdp": -1, "context": 1, "tensor": 1},
        "dcn": {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}})
    config.plan = ml_collections.ConfigDict({"device_memory": "80GiB", "attention": "splash"})
    config.sharding = ml_collections.ConfigDict({"rules": TRAINING_RULES})
    config.logging = ml_collections.ConfigDict({"log_every": 50})
    # An eval-loss entry needs held-out records: add {"type": "eval_loss", "every": 5000, "source": FOLDER,
    # "batch_size": 16, "objective": sigmas} under a name of your choice.
    config.evals = ml_collections.ConfigDict({
        "samples": {"type": "sample_grid", "every": 5000, "prompts": SAMPLE_PROMPTS, "seed": 0, "steps": 50,
                    "guidance": 4.0}})
    config.evaluation = ml_collections.ConfigDict({
        "num_prompts": 0, "prompts": SAMPLE_PROMPTS, "num_inference_steps": 50, "guidance_scale": 4.0, "batch_size": 4,
        "seed": 0})
    config.export = ml_collections.ConfigDict({"dtype": "bfloat16", "use_ema": True})

    if variant in MESH_PRESETS:
        ici, batches, attention, memory = MESH_PRESETS[variant]
        config.mesh.ici.update(ici)
        config.data.batch_sizes = batches
        config.model.attention_impl = attention
        config.plan.device_memory = memory
    else:
        config.components.update(kind="random")
        config.data.update(source="shapes", stage_steps=(1, 1), batch_sizes=(2, 2),
                           sides=(64, 128), aspect_buckets=False, max_text_len=32)
        config.data.shapes.update(height=128, width=128, num_records=16, num_eval_records=4)
        config.model.update(**_model_fields("tiny"), dtype="float32", attention_impl="xla")
        config.train.update(checkpoint_every=1, encoder_dtype="float32")
        config.objective.shift = 1.0
        config.train.optimizer.update(warmup_steps=1, decay_steps=2)
        config.logging.update(log_every=1)
        config.evals.samples.update(every=2, steps=2)
        config.evaluation.update(num_prompts=0, num_inference_steps=2)
        config.export.dtype = "float32"
    return config


def memory_plans(config: ml_collections.ConfigDict, *, num_layers: int | None = None,
                 stages: tuple[int, ...] | None = None, timeout: float = 1800) -> list[dict]:
    """For each curriculum stage (or those in `stages`), `ernie_jax.plan`'s per-device memory of one training
    step of `config`'s DiT on its mesh (the trainer's update: square images of the stage side, the stage's
    batch in `config.train.microbatches` microbatches, `config.plan.attention` standing in for the
    accelerator's flash kernel; parameters, Adam moments and the EMA weights of the parts whose
    `part_settings` decay is not 0) and `fits` against
    `config.plan.device_memory`. Post-training configs plan their own step: `config.objective.name` (DPO: the
    stage's batch counts pairs, the frozen reference in `config.frozen.reference.dtype`; DMD: student,
    critic, the `config.objective.teachers` in the first one's dtype and the GAN head when `gan_weight > 0`)
    and `config.lora` (rank > 0: its adapters on the base frozen in `config.lora.base_dtype`, which with DPO
    is also the reference, `config.frozen.reference.path` "init", and with DMD the first teacher). `num_layers`
    shrinks the model for a quick check. Each plan runs in its own process (it emulates the mesh's devices)."""
    from ernie_jax.plan import OBJECTIVES, parse_bytes
    from ernie_jax.runner.config import part_settings

    shape = {k: v for k, v in config.model.items() if k in _model_fields("full") and k != "num_layers"}
    if shape != {k: v for k, v in _model_fields("full").items() if k != "num_layers"}:
        raise ValueError("memory_plans plans the released 8B transformer's shape (ernie_jax.plan's 'full' preset); "
                         "config.model differs from it beyond num_layers")
    ici = {axis: size for axis, size in config.mesh.ici.items() if size != 1}
    if any(size < 1 for size in ici.values()):
        raise ValueError(f"memory_plans needs explicit mesh sizes (no -1), got {dict(config.mesh.ici)}")
    mesh = ",".join(f"{axis}={size}" for axis, size in ici.items()) or "fsdp=1"
    layers = num_layers or config.model.num_layers
    objective = config.objective.name
    if objective not in OBJECTIVES:
        raise ValueError(f"memory_plans plans the objectives {OBJECTIVES}, got config.objective.name {objective!r}")
    training = ["--objective", objective]
    rank = config.get("lora", {}).get("rank", 0)
    if rank:
        targets = config.lora.target_modules
        if isinstance(targets, str):
            raise ValueError("memory_plans plans LoRA target_modules given as module names, not a regular expression")
        if objective == "dpo" and config.frozen.reference.path != "init":
            raise ValueError("memory_plans plans LoRA-DPO against the base itself: config.frozen.reference.path "
                             "'init'")
        if objective == "dmd" and config.frozen[config.objective.teachers[0]].path != "init":
            raise ValueError("memory_plans plans LoRA-DMD with the base itself as the first teacher: "
                             f"config.frozen.{config.objective.teachers[0]}.path 'init'")
        training += ["--lora-rank", str(rank), "--lora-targets", ",".join(targets),
                     "--frozen-dtype", config.lora.base_dtype]
    elif objective == "dpo":
        training += ["--frozen-dtype", config.frozen.reference.dtype]
    elif objective == "dmd":
        training += ["--frozen-dtype", config.frozen[config.objective.teachers[0]].dtype]
    if objective == "dmd":
        training += ["--teachers", str(len(config.objective.teachers))]
        training += ["--gan"] if config.objective.get("gan_weight", 0.0) > 0 else []
    trained = ("transformer", *(("critic", "discriminator") if objective == "dmd" else ()))
    without_ema = [name for name in trained if part_settings(config, name)[1] == 0]
    training += ["--without-ema", ",".join(without_ema)] if without_ema else []
    budget = parse_bytes(config.plan.device_memory)
    reports = []
    for index, (side, batch) in enumerate(zip(config.data.sides, config.data.batch_sizes)):
        if stages is not None and index not in stages:
            continue
        if batch % config.train.microbatches:
            raise ValueError(f"stage {index}: batch {batch} is not divisible by microbatches "
                             f"{config.train.microbatches}")
        argv = [sys.executable, "-m", "ernie_jax.plan", "--mode", "train", "--resolution", str(side),
                "--batch", str(batch), "--microbatches", str(config.train.microbatches),
                "--text-len", str(config.data.max_text_len),
                "--mesh", mesh, "--remat", config.model.remat, "--preset", "full", "--num-layers", str(layers),
                "--attention", config.plan.attention, "--device-memory", config.plan.device_memory, *training,
                "--json"]
        env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode:
            raise RuntimeError(f"plan of stage {index} failed: {done.stderr.strip().splitlines()[-1:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        report.update(stage=index, side=side, batch=batch, num_layers=layers, fits=report["total"] <= budget)
        report["total_gib"] = round(report["total"] / 2**30, 2)
        reports.append(report)
    if not reports:
        raise ValueError(f"no stage selected among {len(config.data.sides)}")
    return reports
