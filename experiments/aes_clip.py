"""Our aesthetic scorer on a real backbone: a transformers CLIP (e.g. openai/clip-vit-large-patch14, the LAION
predictor's) or SigLIP folder as the tower, a small MLP head on its L2-normalised image embedding, trained on
the annotation service's export or any manifest (`ernie_jax.data.aesthetic_manifest`).

    python -m ernie_jax.main --config experiments/aes_clip.py:ordinal-lora --workdir runs/aes \\
        --config.tower.path=/models/clip-vit-large-patch14 --config.data.train=study1.csv \\
        --config.data.eval=heldout.csv [--config.data.images_root=/data/images]

Variants LOSS-TUNING: LOSS `pairwise` (Bradley-Terry on a pairs manifest: image_a, image_b, outcome), `ordinal`
(CORAL on levels 1-10: the export's `item`, `level`) or `regression` (MSE on a `rating` column, the Likert
baseline); TUNING `frozen` (the head only), `lora` (rank-16 adapters on every attention and MLP linear of the
tower, and the head) or `full` (everything). Default `ordinal-frozen`. `tiny-LOSS-TUNING` is the same run at
test size (4 updates of 4 images; the test gives it a tiny random CLIP folder). The learning rate suits the
tuning (1e-3 for a head alone, 1e-4 with LoRA, 1e-5 for the whole tower: one optimizer serves tower and head).
"""

from __future__ import annotations

import ml_collections

from ernie_jax.parallel import TRAINING_RULES

OBJECTIVES = {
    "pairwise": {"name": "aesthetic_pairwise"},
    "ordinal": {"name": "aesthetic_ordinal", "num_levels": 10},
    "regression": {"name": "aesthetic_regression", "target": "ratings"},
}
LEARNING_RATES = {"frozen": 1e-3, "lora": 1e-4, "full": 1e-5}


def get_config(variant: str = "ordinal-frozen") -> ml_collections.ConfigDict:
    tiny = variant.startswith("tiny-")
    loss, _, tuning = variant[len("tiny-") if tiny else 0:].partition("-")
    if loss not in OBJECTIVES or tuning not in LEARNING_RATES:
        raise ValueError(f"aes_clip: unknown variant {variant!r}; use LOSS-TUNING with LOSS one of "
                         f"{sorted(OBJECTIVES)} and TUNING one of {sorted(LEARNING_RATES)}, or tiny-LOSS-TUNING")
    config = ml_collections.ConfigDict()
    config.name = "aes_clip"
    config.seed = 0
    config.runner = "ernie_jax.aesthetics.train_scorer"  # not the DiT runner's stages
    config.tower = ml_collections.ConfigDict({
        "kind": "pretrained",
        "path": "",                  # a transformers CLIP / SigLIP folder (config.json, weights, preprocessor_config.json)
        "tuning": tuning,
        "dtype": "bfloat16",         # compute dtype
        "frozen_dtype": "bfloat16",  # the tower's weights when they do not train (frozen, or LoRA's base)
        "attention_impl": "xla", "remat": "none",
    })
    config.lora = ml_collections.ConfigDict({"rank": 16, "alpha": 16.0, "dropout": 0.0,
                                             "target_modules": r"layers\.(self_attn|mlp)\..*"})
    # LAION's convention: the L2-normalised projected embedding.
    config.head = ml_collections.ConfigDict({"features": "embeds", "normalize": True, "hidden": (256,)})
    config.objective = ml_collections.ConfigDict(OBJECTIVES[loss])
    config.data = ml_collections.ConfigDict({
        "train": "",                 # a pairs or labels manifest (CSV, or the annotation export's JSON)
        "eval": "",                  # a labels manifest scored after training (eval.json); "" for none
        "images_root": "",           # where the manifests' relative paths start ("": each manifest's folder)
        "synthetic": {},
        "batch_size": 64, "num_steps": 3000,
    })
    config.train = ml_collections.ConfigDict({
        "microbatches": 1, "ema_decay": 0.999, "checkpoint_every": 500, "max_to_keep": 2, "async_checkpoints": True,
        "optimizer": {"learning_rate": LEARNING_RATES[tuning], "warmup_steps": 100, "decay_steps": 3000,
                      "final_lr_fraction": 0.1, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01,
                      "clip_norm": 1.0},
    })
    config.mesh = ml_collections.ConfigDict({"ici": {"data": 1, "fsdp": -1, "context": 1, "tensor": 1}})
    config.sharding = ml_collections.ConfigDict({"rules": TRAINING_RULES})
    config.logging = ml_collections.ConfigDict({"log_every": 10})
    if tiny:
        config.tower.update(dtype="float32", frozen_dtype="float32")
        config.lora.update(rank=2, alpha=2.0)
        config.head.update(hidden=(8,))
        config.data.update(batch_size=4, num_steps=4)
        config.train.update(checkpoint_every=2, async_checkpoints=False, ema_decay=0.5)
        config.train.optimizer.update(learning_rate=1e-2, warmup_steps=1, decay_steps=4)
        config.logging.update(log_every=1)
    return config
