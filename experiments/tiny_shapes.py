"""The demo: a small ERNIE-Image DiT trained from scratch on the bundled synthetic shapes dataset, on a CPU.

    python -m ernie_jax.main --config experiments/tiny_shapes.py --workdir runs/tiny_shapes
    python -m ernie_jax.main --config experiments/tiny_shapes.py:tiny --workdir /tmp/smoke   # 2 steps

Stages: `components` trains a small FLUX.2-architecture VAE on the shapes images (x4 down, 16 latent
channels) and writes it with a word-level tokenizer and a tiny random frozen text encoder as a pipeline
folder (`ernie_jax.training.components`); `precompute` encodes the 8000 training records once with the
frozen VAE and text encoder (the layout of `python -m ernie_jax.data.precompute`); `train` trains the DiT
with flow matching on those latents and features; `export` writes the EMA transformer into a complete
pipeline folder; `evaluate` samples the held-out prompts (colour-shape-cell compositions no training caption
has) and scores them with the shapes detector.

Sizes: 64x64 images -> 16x16x16 latents -> 8x8x64 packed latents -> 8x8 DiT tokens (patch 1): one token
covers 8x8 pixels, so a shape (13-17 px) spans about 2x2 tokens. The released model's 16 px tokens (x8 VAE,
or this VAE with patch 2) would put a whole shape inside one token, and the DiT then learns colour and
position but draws blobs (shape at chance). Chosen from a sweep of the train step on one H100
(2026-11-27; the runner's modules, uniform record sampling, shift 2, 128 held-out prompts, 25 steps, cfg 3;
shape / colour / position / count, shape chance 0.37-0.53):
- 16 px tokens (patch 2, 256 wide, 4 layers), 1100 x 32: 0.41 / 0.79 / 0.88 / 0.43 (the previous demo);
  4x the updates: 0.60 / 0.93 / 0.98 / 0.83; 96x96 images, 384 wide x 6 layers, 8 layers, bigger shapes,
  an 8-channel VAE or lr 1e-3 at 1100 x 32: shape 0.43-0.52.
- 8 px tokens (patch 1), 256 wide, 1100 x 32: 0.58 / 0.90 / 0.90 / 0.65; 4400 x 32: 0.94 / 1.00 / 1.00 /
  0.97 (0.88 / 0.98 / 1.00 / 0.94 after 2200 of them). Shapes need 8 px tokens and training.
- patch 1, 192 wide (3 heads, ffn 576), the cost that fits 15 minutes here: 1100 x 32: 0.50; 2200 x 16:
  0.71 / 0.85 / 0.81 / 0.53; lr 4e-3: 0.56; 8000 instead of 20000 records: 0.66. 128 wide, 2200 x 32: 0.61;
  4400 x 16: 0.62. Smaller batches with more updates learn more per image.
On this machine's CPU the 192-wide 2200 x 16 run scored shape 0.59 (chance 0.41), colour 0.87, position
0.82, count 0.62, object 0.33, but took 15 min 21 s in all; the committed 2000 x 16 scores below.

Budget (2026-11-27, 2 idle cores, the committed config): 13 min 44 s wall for the whole run (1091 s user and
291 s system CPU, peak RSS 1.8 GB): VAE 400 steps (~2.9 min with its statistics and writing), precompute of
8000 records (41 s), DiT 2000 updates at ~3.4 updates/s (batch 16), sample grids, export, evaluation of 128
held-out prompts (25 steps, cfg 3): colour 0.88 (chance 0.31), shape 0.58 (0.36), position 0.81 (0.19), count
0.65 (0.36), whole objects 0.32 (0.02), words 0.09 (0.0).
"""

from __future__ import annotations

import ml_collections

from ernie_jax.parallel import TRAINING_RULES

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
        # Folders of `python -m ernie_jax.data.precompute` (one per stage side, or a list of a side's host
        # shards) to train from instead: needs "precompute" dropped from config.stages (it writes its own).
        "precomputed": (),
        # Preference folders (data.preferences: a manifest's or generated pairs) that DPO trains on instead.
        "preferences": (),
        "shapes": {"height": 64, "width": 64, "max_objects": 2, "num_records": 8000, "num_eval_records": 64},
        # The curriculum: stage k trains stage_steps[k] updates of batch_sizes[k] images at about sides[k]^2
        # pixels (the released aspect buckets when aspect_buckets, else square only).
        "stage_steps": (2000,),
        "batch_sizes": (16,),
        "sides": (64,),
        "aspect_buckets": False,
        "max_crop_fraction": 0.25,
        "max_text_len": 20,          # text features are cut/padded to this many tokens (one compile per bucket)
        "sampling": {"category_formula": "count", "tau": 0.5, "within_category": "uniform"},
        # SFT's prompt-style mix (data.prompt_styles.StyleMix fields): a record keeps its dense caption with
        # probability keep_dense (1: the captions as they are), else becomes a prompt of a style drawn from
        # the weights, built from its scene ("shapes" rewriter). --config.data.caption_styles.keep_dense=0.25
        # trains on the mix.
        "caption_styles": {"weights": {"keywords": 1.0, "request": 1.0, "instruction": 1.0, "composition": 1.0},
                           "keep_dense": 1.0, "seed": 0, "rewriter": "shapes", "rewrites": ""},
    })

    # The DiT. in_channels/out_channels and text_in_dim come from the VAE and text encoder.
    config.model = ml_collections.ConfigDict({
        "hidden_size": 192, "num_attention_heads": 3, "num_layers": 4, "ffn_hidden_size": 576, "patch_size": 1,
        "rope_theta": 256.0, "rope_axes_dim": (16, 24, 24), "eps": 1e-6, "qk_layernorm": True,
        "dtype": "float32",          # compute dtype; the trainer keeps float32 master weights
        "remat": "none", "attention_impl": "xla",
    })

    # The objective: ernie_jax/training/objectives/NAME.py, with its Config's fields.
    sigmas = {"sigma_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "shift": 2.0,
              "weighting": "none"}
    config.objective = ml_collections.ConfigDict({"name": "flow_matching", **sigmas, "text_dropout": 0.1})
    # Where the transformer starts (a pipeline or transformer folder; "" = random weights), and the frozen
    # models an objective reads (NAME: {"path", "dtype"}; flow matching reads none).
    config.init = ml_collections.ConfigDict({"path": "", "dtype": "float32"})
    config.frozen = ml_collections.ConfigDict({})

    config.train = ml_collections.ConfigDict({
        "microbatches": 1, "ema_decay": 0.99, "checkpoint_every": 250, "max_to_keep": 2,
        "async_checkpoints": True,
        "encoder_dtype": "float32",
        "optimizer": {"learning_rate": 2e-3, "warmup_steps": 40, "decay_steps": 2000,
                      "final_lr_fraction": 0.1, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.01,
                      "clip_norm": 1.0},
    })

    # Mesh axis sizes (one may be -1: the rest of the devices); dcn: across slices/hosts.
    config.mesh = ml_collections.ConfigDict({
        "ici": {"data": 1, "fsdp": -1, "context": 1, "tensor": 1},
        "dcn": {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}})

    # The rule table placing weights, optimizer state and activations on the mesh (parallel.TRAINING_RULES).
    config.sharding = ml_collections.ConfigDict({"rules": TRAINING_RULES})

    config.logging = ml_collections.ConfigDict({
        "log_every": 10,             # TensorBoard scalars (loss, lr, grad norm, data statistics)
    })
    # Evaluators during training (ernie_jax/runner/evaluators/TYPE.py), each every N updates and after the last.
    config.evals = ml_collections.ConfigDict({
        # Sample grid of fixed prompts and seeds from the EMA weights: samples/step_NNNNNN.png.
        "samples": {"type": "sample_grid", "every": 500, "prompts": SAMPLE_PROMPTS, "seed": 0, "steps": 20,
                    "guidance": 3.0},
        # Flow-matching loss of the EMA weights on the held-out split: eval/loss.
        "eval": {"type": "eval_loss", "every": 500, "source": "shapes", "batch_size": 32, "objective": sigmas},
    })

    # The evaluate stage: the shapes detector on `num_prompts` held-out prompts (or, on other data, a grid of
    # `prompts`).
    config.evaluation = ml_collections.ConfigDict({
        "num_prompts": 128, "prompts": SAMPLE_PROMPTS, "num_inference_steps": 25, "guidance_scale": 3.0,
        "batch_size": 16, "seed": 0,
        # Held-out scenes also as prompts of these styles (data.prompt_styles), e.g. ("keywords", "request").
        "styles": ()})

    config.export = ml_collections.ConfigDict({"dtype": "float32", "use_ema": True})

    if variant == "tiny":
        config.components.update(vae_steps=2, vae_batch_size=4, stats_images=8)
        config.data.shapes.update(num_records=64, num_eval_records=8)
        config.data.update(stage_steps=(2,), batch_sizes=(4,))
        config.model.update(hidden_size=64, num_attention_heads=1, num_layers=1, ffn_hidden_size=128)
        config.train.update(checkpoint_every=1)
        config.train.optimizer.update(warmup_steps=1, decay_steps=2)
        config.logging.update(log_every=1)
        config.evals.samples.update(every=2, steps=2)
        config.evals.eval.update(every=2, batch_size=4)
        config.evaluation.update(num_prompts=4, num_inference_steps=2, batch_size=4)
    return config
