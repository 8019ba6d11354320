"""ERNIE-Image DPO: the report's stabilized DPO on a trained ERNIE-Image pipeline's DiT (the released one, a
converted checkpoint or your own SFT run's export), the whole DiT or LoRA adapters, on preference pairs at
1024^2 multi-aspect.

    python -m ernie_jax.data.preferences --model /data/ERNIE-Image --manifest /data/pairs.jsonl \\
        --out /data/pairs_1024 --stage-side 1024
    python -m ernie_jax.main --config experiments/ernie_image_dpo.py:8xh100-lora --workdir /mnt/runs/dpo \\
        --config.components.path=/data/ERNIE-Image --config.data.preferences="('/data/pairs_1024',)"

Variants: a mesh preset of the pre-training config (`8xh100`, `v5p-64`, `v6e-256`: same meshes, attention
kernels and device memory) or `tiny` (test size on a CPU: tiny random components, whose random transformer
stands in for the trained one, and the `pairs` stage making the pairs from its own samples), each
optionally with `-lora` (rank 64 adapters on the attention and MLP projections, base frozen in bf16,
adapters in fp32, as experiments/ernie_image_sft.py).

The policy starts from the components' pipeline (`init.path` "components") and the frozen reference is
that same transformer in bf16 (`frozen.reference.path` "init"; with LoRA, the base with the adapters off:
the same arrays, no second copy). Pairs come from preference folders (`data.preferences`, written by
`python -m ernie_jax.data.preferences`); the global batch counts pairs, half the pre-training 1024^2
stage's images, so the policy sees as many images per update (and the reference runs forward on them).
The report gives DPO's loss and its beta / lambda values but not its steps, learning rate, batch or sigma
draw (training_algorithms.md section 1.3): those here are config values to tune; the report notes that
few DPO steps suffice. `memory_plans(config)` checks with `ernie_jax.plan` that the DPO step fits.
"""

from __future__ import annotations

import ml_collections

from experiments.ernie_image_pretrain import memory_plans  # noqa: F401 (memory_plans: this config's)
from experiments.ernie_image_sft import VARIANTS, post_training_config  # noqa: F401 (VARIANTS: this config's)

SIDE = 1024
# The report's stabilized DPO (Eqs. 1-2): beta 0.05, lambda_win 0.35, lambda_lose 0.15, read with summed
# errors (the reading under which the anchors and the DPO term have comparable weight, training_algorithms.md
# section 8.4): reduction "sum", and beta in dpo.py's per-element-mean units is the report's beta times the
# D latent elements of a sample: at 1024^2 the packed latents are 128 channels x 64 x 64, so
# D = 128 * 64 * 64 = 524,288 and beta = 0.05 * 524,288 = 26,214.4.
LATENT_ELEMENTS = 128 * (SIDE // 16) ** 2
BETA = 0.05 * LATENT_ELEMENTS


def get_config(variant: str = "8xh100") -> ml_collections.ConfigDict:
    """The DPO config for `variant` (one of VARIANTS)."""
    config, mesh, lora = post_training_config("ernie_image_dpo", variant)
    config.frozen = ml_collections.ConfigDict({"reference": {"path": "init", "dtype": "bfloat16"}})
    sigmas = {key: config.objective[key] for key in ("sigma_scheme", "logit_mean", "logit_std", "mode_scale", "shift")}
    config.objective = ml_collections.ConfigDict({
        "name": "dpo", "variant": "ernie", "beta": BETA, "lambda_win": 0.35, "lambda_lose": 0.15,
        "reduction": "sum", "weighted_pairs": True, "sigmas": sigmas})
    pairs = config.data.batch_sizes[-1] // 2
    config.data.update(source="", preferences=(), stage_steps=(2_000,), batch_sizes=(pairs,), sides=(SIDE,))
    config.train.ema_decay = 0.0  # a few thousand updates: the policy itself, not an average
    config.train.checkpoint_every = 500
    # Summed errors make the anchors' gradients D times those of the per-element-mean loss pre-training clips
    # at 1.0, so the same threshold in those units is 1.0 x D (at 1.0 it clipped every update: the whole tiny
    # DiT's gradient norm is about 900).
    config.train.optimizer.update(learning_rate=1e-5 if lora else 1e-6, warmup_steps=100, decay_steps=2_000,
                                  final_lr_fraction=1.0, weight_decay=0.0, clip_norm=1.0 * LATENT_ELEMENTS)
    config.evals.samples.every = 500
    if mesh == "tiny":
        config.stages = ("components", "pairs", "train", "export", "evaluate")
        config.init.dtype = "float32"
        config.frozen.reference.dtype = "float32"
        config.lora.update(rank=4 if lora else 0, alpha=4.0, base_dtype="float32")
        config.pairs = ml_collections.ConfigDict({
            "prompts": "shapes:2", "samples_per_prompt": 2, "reward": "shapes", "selection": "best-worst",
            "margin": 0.0, "num_inference_steps": 2, "guidance_scale": 3.0})
        tiny_latent_elements = 128 * (64 // 16) ** 2  # the same readings at the tiny 64^2 side
        config.objective.beta = 0.05 * tiny_latent_elements
        config.train.optimizer.clip_norm = 1.0 * tiny_latent_elements
        config.data.update(stage_steps=(2,), batch_sizes=(2,), sides=(64,))
        config.data.shapes.update(height=64, width=64)
        config.train.optimizer.update(warmup_steps=1, decay_steps=2)
        config.evals.samples.every = 2
    return config
