"""Our aesthetic scorer from scratch on a CPU: a small CLIP-architecture ViT (random init, trained whole) and a
linear head, on the annotated synthetic set whose true quality is known (`ernie_jax.data.synthetic_aesthetics`:
shapes scenes scored by symmetry, colour harmony, clutter and edge roughness, labelled by simulated annotators
through a Swiss tournament and through Likert ratings at an equal budget), evaluated against the held-out
images' true quality.

    python -m ernie_jax.main --config experiments/aes_tiny_vit.py:pairwise --workdir runs/aes_pw
    python -m ernie_jax.main --config experiments/aes_tiny_vit.py:tiny_pairwise --workdir /tmp/s

Variants: the loss and labels, `pairwise` (Bradley-Terry on the Swiss judgments, pairs.csv; the default),
`ordinal` (CORAL on levels 1-10 from the Swiss ranking), `regression` (MSE on the Likert scores: the Likert
baseline), `ordinal_likert` (CORAL on levels from the Likert scores), `regression_swiss` (MSE on the Swiss
Bradley-Terry scores), `regression_clean` (MSE on the true quality: the ceiling); `tiny_` before it is the
test's size; `-biased` after it makes every annotator perceive collages CATEGORY_BIAS (in units of the quality's
spread) better than they are: a bias only the training labels carry (reference section 9, experiment F).
Writes DIR/synthetic/ (the data), checkpoints/, metrics.jsonl, logs/ and eval.json (SRCC, PLCC, Kendall tau-b
and the per-category bias on the 256 held-out images, against their clean quality).
"""

from __future__ import annotations

import ml_collections

from ernie_jax.parallel import TRAINING_RULES

# variant -> (objective, training manifest of the synthetic set: Swiss judgments and their levels and scores,
# Likert scores and their levels, or the clean truth).
LOSSES = {
    "pairwise": ({"name": "aesthetic_pairwise"}, "synthetic:pairs.csv"),
    "ordinal": ({"name": "aesthetic_ordinal", "num_levels": 10}, "synthetic:levels.csv"),
    "regression": ({"name": "aesthetic_regression", "target": "ratings"}, "synthetic:ratings.csv"),
    "ordinal_likert": ({"name": "aesthetic_ordinal", "num_levels": 10}, "synthetic:likert_levels.csv"),
    "regression_swiss": ({"name": "aesthetic_regression", "target": "ratings"}, "synthetic:swiss_scores.csv"),
    "regression_clean": ({"name": "aesthetic_regression", "target": "ratings"}, "synthetic:clean.csv"),
}
CATEGORY_BIAS = 0.5


def get_config(variant: str = "pairwise") -> ml_collections.ConfigDict:
    tiny = variant.startswith("tiny_")
    loss, _, bias = variant[len("tiny_") if tiny else 0:].partition("-")
    if loss not in LOSSES or bias not in ("", "biased"):
        raise ValueError(f"aes_tiny_vit: unknown variant {variant!r}; use one of {sorted(LOSSES)}, each also "
                         f"tiny_ and -biased")
    objective, manifest = LOSSES[loss]
    config = ml_collections.ConfigDict()
    config.name = "aes_tiny_vit"
    config.seed = 0
    config.runner = "ernie_jax.aesthetics.train_scorer"  # not the DiT runner's stages
    # A CLIP-family ViT on 64x64 images in 8x8 patches (64 tokens + class token); random init, trained whole.
    config.tower = ml_collections.ConfigDict({
        "kind": "random", "path": "", "tuning": "full",
        "family": "clip", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 64, "patch_size": 8, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "projection_dim": None,
        "preprocessor": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 64},
                         "crop_size": {"height": 64, "width": 64}},
        "dtype": "float32", "frozen_dtype": "float32", "attention_impl": "xla", "remat": "none",
    })
    config.lora = ml_collections.ConfigDict({"rank": 4, "target_modules": r"layers\.(self_attn|mlp)\..*"})
    config.head = ml_collections.ConfigDict({"features": "pooled", "normalize": False, "hidden": ()})
    config.objective = ml_collections.ConfigDict(objective)
    config.data = ml_collections.ConfigDict({
        "train": manifest, "eval": "synthetic:heldout.csv", "images_root": "",
        # synthetic_aesthetics.SyntheticAestheticsConfig: 3 annotators, 8 Swiss rounds = 4 Likert ratings per image.
        "synthetic": {"num_train": 1024, "num_heldout": 256, "size": 64, "num_annotators": 3, "rounds": 8,
                      "category_bias": CATEGORY_BIAS if bias else 0.0, "biased_category": "collage", "noise": {},
                      "seed": 0},
        "batch_size": 32, "num_steps": 800,
    })
    config.train = ml_collections.ConfigDict({
        "microbatches": 1, "ema_decay": 0.9, "checkpoint_every": 200, "max_to_keep": 2, "async_checkpoints": True,
        "optimizer": {"learning_rate": 2e-3, "warmup_steps": 20, "decay_steps": 800, "final_lr_fraction": 0.1,
                      "b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.01, "clip_norm": 1.0},
    })
    config.mesh = ml_collections.ConfigDict({"ici": {"data": 1, "fsdp": -1, "context": 1, "tensor": 1}})
    config.sharding = ml_collections.ConfigDict({"rules": TRAINING_RULES})
    config.logging = ml_collections.ConfigDict({"log_every": 10})
    if tiny:
        config.data.synthetic.update(num_train=256, num_heldout=64)
        config.data.update(batch_size=16, num_steps=200)
        config.train.update(checkpoint_every=100)
        config.train.optimizer.update(warmup_steps=10, decay_steps=200)
    return config
