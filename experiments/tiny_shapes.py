"""The demo: a small ERNIE-Image DiT trained from scratch on the bundled synthetic shapes dataset, on a CPU.

    python -m ernie_jax.main --config experiments/tiny_shapes.py --workdir runs/tiny_shapes
    python -m ernie_jax.main --config experiments/tiny_shapes.py:tiny --workdir /tmp/smoke   # 2 steps

Stages: `components` trains a small FLUX.2-architecture VAE on the shapes images (x4 down, 16 latent
channels) and writes it with a word-level tokenizer and a tiny random frozen text encoder as a pipeline
folder (`ernie_jax.training.components`); `precompute` encodes the training records once with the frozen
VAE and text encoder; `train` trains the DiT with flow matching on them; `export` writes the EMA
transformer into a complete pipeline folder; `evaluate` samples the held-out prompts (colour-shape-cell
compositions no training caption has) and scores them with the shapes detector.

Sizes: 64x64 images -> 16x16x16 latents -> 8x8x64 packed latents -> 4x4 DiT tokens (patch 2), so one token
covers 16x16 pixels as in the released model (x8 VAE, patch 1). Measured alternatives, each 1000-1100 DiT
updates at lr 2e-3, scores on 64 held-out prompts unless said:
- the released geometry at this size (x8 VAE with 32 latent channels, patch 1): the VAE reaches in its
  400 steps only colour 0.66 / shape 0.55 on its own reconstructions, and the DiT's colour stays at 0.41;
- the x4 VAE with 32 channels and patch 1 (8x8 tokens of 128): 2.3x the compute per image, loss still
  falling at the budget (colour 0.49, position 0.42); with patch 2 (4x4 tokens of 512 outputs from a
  256-wide model) the output projection cannot carry the noise: loss 0.6 and speckled images.
- batch 16 x 1800 updates instead of 32 x 1100: the same colour and position, lower count;
- shift 1 instead of 2 (training sigmas and sampling), on 256 held-out prompts: colour 0.74 vs 0.81,
  position 0.68 vs 0.83, count 0.36 vs 0.44, words 0.0 vs 0.38 (shape 0.50 vs 0.48, chance 0.5).

Budget (2026-11-27, 2 idle cores): 13 min 01 s wall for the whole run, 128 evaluation prompts included:
VAE 400 steps (~3 min with its statistics and writing), DiT 1100 updates at ~2.1 updates/s (batch 32),
sample grids, export, evaluation.
"""

from __future__ import annotations

import ml_collections

# One prompt per category and a held-out-style composition, for the periodic sample grids.
SAMPLE_PROMPTS = (
    "a red circle at the top left",
    "a blue square at the center and a yellow triangle at the bottom right",
    "two green triangles at the top and the bottom",
    'the word "SUN" at the top and a red square at the bottom left',
)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The demo's config; `variant` "tiny" is the same run at test size (2 updates, 1-layer DiT)."""
    if variant not in ("", "tiny"):
        raise ValueError(f"tiny_shapes: unknown variant {variant!r}; use '' or 'tiny'")
    config = ml_collections.ConfigDict()
    config.name = "tiny_shapes"
    config.seed = 0
    config.stages = ("components", "precompute", "train", "export", "evaluate")

    # The frozen VAE, tokenizer and text encoder (made by the first stage).
    config.components = ml_collections.ConfigDict({
        "kind": "shapes",            # shapes: trained here (components.build_components) | random | pretrained
        "path": "",                  # pretrained: the pipeline folder whose VAE, text encoder and tokenizer are used
        # Measured (training.components): 400 x 8 images at lr 2e-3 give 30 dB PSNR and detector scores on
        # reconstructions equal to the originals' (>= 0.995) in ~270 CPU-s.
        "vae_steps": 400,
        "vae_batch_size": 8,
        "vae_learning_rate": 2e-3,
        "vae_kl_weight": 1e-6,
        "vae_block_out_channels": (16, 32, 64),
        "vae_latent_channels": 16,
        "stats_images": 512,
        "scheduler_shift": 2.0,      # the exported pipeline's sampling shift, as in training (objective.shift)
    })

    config.data = ml_collections.ConfigDict({
        "source": "shapes",          # shapes | a tfds dataset folder | an image folder
        "eval_source": "shapes",     # held-out data for the eval loss ("" disables it); shapes = the heldout split
        # Folders of `python -m ernie_jax.data.precompute` (one per stage side, or a list of a side's host
        # shards): when set, training reads their latents and text features instead of running the encoders.
        "precomputed": (),
        "shapes": {"height": 64, "width": 64, "max_objects": 2, "num_records": 20000, "num_eval_records": 64},
        # The curriculum: stage k trains stage_steps[k] updates of batch_sizes[k] images at about sides[k]^2
        # pixels (the released aspect buckets when aspect_buckets, else square only).
        "stage_steps": (1100,),
        "batch_sizes": (32,),
        "sides": (64,),
        "aspect_buckets": False,
        "max_crop_fraction": 0.25,
        "max_text_len": 20,          # text features are cut/padded to this many tokens (one compile per bucket)
        "sampling": {"category_formula": "count", "tau": 0.5, "within_category": "uniform"},
    })

    # The DiT. in_channels/out_channels and text_in_dim come from the VAE and text encoder.
    config.model = ml_collections.ConfigDict({
        "hidden_size": 256, "num_attention_heads": 4, "num_layers": 4, "ffn_hidden_size": 768, "patch_size": 2,
        "rope_theta": 256.0, "rope_axes_dim": (16, 24, 24), "eps": 1e-6, "qk_layernorm": True,
        "dtype": "float32",          # compute dtype; the trainer keeps float32 master weights
        "remat": "none", "attention_impl": "xla",
    })

    config.train = ml_collections.ConfigDict({
        "microbatches": 1, "ema_decay": 0.99, "checkpoint_every": 100, "max_to_keep": 2,
        "async_checkpoints": True,
        "encoder_dtype": "float32",
        "objective": {"sigma_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
                      "shift": 2.0, "weighting": "none", "text_dropout": 0.1},
        "optimizer": {"learning_rate": 2e-3, "warmup_steps": 40, "decay_steps": 1100,
                      "final_lr_fraction": 0.1, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.01,
                      "clip_norm": 1.0},
    })

    # Mesh axis sizes (one may be -1: the rest of the devices); dcn: across slices/hosts.
    config.mesh = ml_collections.ConfigDict({
        "ici": {"data": 1, "fsdp": -1, "context": 1, "tensor": 1},
        "dcn": {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}})

    config.logging = ml_collections.ConfigDict({
        "log_every": 10,             # TensorBoard scalars (loss, lr, grad norm, data statistics)
        "sample_every": 275,         # sample grid of the fixed prompts and seeds (and at the last update)
        "eval_every": 275,           # eval loss on held-out data (and at the last update)
        "sample_prompts": SAMPLE_PROMPTS, "sample_seed": 0, "sample_steps": 20, "sample_guidance": 3.0,
        "eval_batch_size": 32,
    })

    config.evaluation = ml_collections.ConfigDict({
        "num_prompts": 128, "num_inference_steps": 25, "guidance_scale": 3.0, "batch_size": 16, "seed": 0})

    config.export = ml_collections.ConfigDict({"dtype": "float32", "use_ema": True})

    if variant == "tiny":
        config.components.update(vae_steps=2, vae_batch_size=4, stats_images=8)
        config.data.shapes.update(num_records=64, num_eval_records=8)
        config.data.update(stage_steps=(2,), batch_sizes=(4,))
        config.model.update(hidden_size=64, num_attention_heads=1, num_layers=1, ffn_hidden_size=128)
        config.train.update(checkpoint_every=1)
        config.train.optimizer.update(warmup_steps=1, decay_steps=2)
        config.logging.update(log_every=1, sample_every=2, eval_every=2, sample_steps=2, eval_batch_size=4)
        config.evaluation.update(num_prompts=4, num_inference_steps=2, batch_size=4)
    return config
