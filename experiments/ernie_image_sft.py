"""ERNIE-Image SFT: flow matching on a trained ERNIE-Image pipeline's DiT (the released one, a converted
checkpoint or your own pre-training run's export), the whole DiT or LoRA adapters, at 1024^2 multi-aspect.

    python -m ernie_jax.main --config experiments/ernie_image_sft.py:8xh100-lora --workdir /mnt/runs/sft \\
        --config.components.path=/data/ERNIE-Image --config.data.source=/data/my_sft_records

Variants: a mesh preset of the pre-training config (`8xh100`, `v5p-64`, `v6e-256`: same meshes, attention
kernels and device memory, the 1024^2 stage's global batch) or `tiny` (test size on a CPU: tiny random
components, whose random transformer stands in for the trained one), each optionally with `-lora`
(rank 64 adapters on the attention and MLP projections, base frozen in bf16, adapters in fp32).

The transformer starts from the components' pipeline (`init.path` "components"); `export` writes the
trained pipeline (LoRA: the base with the adapters merged, and the adapters as a diffusers/PEFT LoRA file in
pipeline/lora/). The report does not give SFT's steps, learning rate or batch (training_algorithms.md
section 7): the values here are config values to tune.
"""

from __future__ import annotations

import ml_collections

from conversions.lora import BLOCK_LINEARS
from experiments.ernie_image_pretrain import MESH_PRESETS
from experiments.ernie_image_pretrain import get_config as pretrain_config

MESHES = (*MESH_PRESETS, "tiny")
VARIANTS = tuple(f"{mesh}{suffix}" for mesh in MESHES for suffix in ("", "-lora"))


def post_training_config(name: str, variant: str) -> tuple[ml_collections.ConfigDict, str, bool]:
    """(config, mesh, lora) of a post-training `variant` (one of VARIANTS): the pre-training config of its mesh
    starting from the components' transformer, with rank-64 LoRA on a bf16 base for `-lora`."""
    if variant not in VARIANTS:
        raise ValueError(f"{name}: unknown variant {variant!r}; choose one of {VARIANTS}")
    mesh, lora = variant.removesuffix("-lora"), variant.endswith("-lora")
    config = pretrain_config(mesh)
    config.name = f"{name}_{variant}"
    config.variant = variant
    config.init.update(path="components", dtype="bfloat16")
    config.lora = ml_collections.ConfigDict({
        "rank": 64 if lora else 0,   # 0: the whole DiT trains
        "alpha": 64.0, "use_rslora": False, "dropout": 0.0, "target_modules": BLOCK_LINEARS,
        "base_dtype": "bfloat16",    # the frozen base's storage (and a DPO reference's); adapters are float32
    })
    return config, mesh, lora


def get_config(variant: str = "8xh100") -> ml_collections.ConfigDict:
    """The SFT config for `variant` (one of VARIANTS)."""
    config, mesh, lora = post_training_config("ernie_image_sft", variant)
    final_batch = config.data.batch_sizes[-1]
    config.data.update(stage_steps=(10_000,), batch_sizes=(final_batch,), sides=(1024,))
    # The report's caption diversification (training_algorithms.md section 7): a quarter of the records keep
    # their dense caption, the rest are rewritten into one of four user styles. "rules" works offline;
    # "llm" reads `python -m ernie_jax.data.rewrite_captions` output (set "rewrites" to its folder).
    config.data.caption_styles = {"weights": {"keywords": 1.0, "request": 1.0, "instruction": 1.0,
                                              "composition": 1.0},
                                  "keep_dense": 0.25, "seed": 0, "rewriter": "rules", "rewrites": ""}
    config.train.ema_decay = 0.999
    config.train.checkpoint_every = 1000
    config.train.optimizer.update(learning_rate=1e-4 if lora else 1e-5, warmup_steps=200, decay_steps=10_000,
                                  weight_decay=0.0 if lora else 0.01)
    config.evals.samples.every = 1000
    if mesh == "tiny":
        config.init.dtype = "float32"
        config.lora.update(rank=4 if lora else 0, alpha=4.0, base_dtype="float32")
        config.data.update(stage_steps=(2,), batch_sizes=(2,), sides=(64,))
        config.data.caption_styles.rewriter = "shapes"
        config.data.shapes.update(height=64, width=64)
        config.train.optimizer.update(warmup_steps=1, decay_steps=2)
        config.evals.samples.every = 2
    return config
