"""DPO on the demo: the bundled shapes model (experiments/tiny_shapes.py's exported pipeline) makes its own
preference pairs, scored by the shapes detector, and is trained on them with the report's stabilized
Flow-DPO; the evaluate stage scores the held-out prompts as the demo's does.

    python -m ernie_jax.main --config experiments/tiny_shapes.py --workdir runs/tiny_shapes
    python -m ernie_jax.main --config experiments/tiny_shapes_dpo.py --workdir runs/tiny_shapes_dpo \\
        --config.components.path=runs/tiny_shapes/pipeline [--config.objective.variant=flow_dpo ...]

Stages: `pairs` (8 samples of each of 512 training captions, 25 steps, CFG 3, best against worst by the
shapes reward: `evaluation.rewards.shapes_reward`), `train` (DPO against the frozen starting model, which
is also where the policy starts), `export`, `evaluate`. With `--config.pairs.refresh_every=N` the pairs are
online: every N updates the policy makes the next round's pairs for `pairs.prompts_per_round` fresh prompts
(`ernie_jax/runner/online_pairs.py`), and the pairs stage does nothing.

`objective`: beta in per-element-mean units (`training/objectives/dpo.py`); the report's 0.05 / 0.35 /
0.15 with a summed error is beta_mean = 0.05 * D (D = 8 * 8 * 64 = 4096 here, ~200), which the default
below takes; the variants and beta are what the experiment sweeps. Variant `tiny` runs the same stages at
test size from tiny random components.
"""

from __future__ import annotations

import ml_collections

from experiments.ernie_image_pretrain import _model_fields
from experiments.tiny_shapes import get_config as demo_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The DPO config; `variant` "tiny" is the same run at test size."""
    if variant not in ("", "tiny"):
        raise ValueError(f"tiny_shapes_dpo: unknown variant {variant!r}; use '' or 'tiny'")
    config = demo_config(variant)
    config.name = "tiny_shapes_dpo"
    config.stages = ("pairs", "train", "export", "evaluate")
    # The trained demo pipeline: its frozen encoders, and its transformer as the start and the reference.
    config.components.update(kind="pretrained", path="")
    config.init.update(path="components", dtype="float32")
    config.frozen = ml_collections.ConfigDict({"reference": {"path": "init", "dtype": "float32"}})
    config.pairs = ml_collections.ConfigDict({
        "prompts": "shapes:512", "samples_per_prompt": 8, "reward": "shapes", "selection": "best-worst",
        "margin": 0.0, "num_inference_steps": 25, "guidance_scale": 3.0,
        # Online pairs (runner/online_pairs.py): refresh_every N > 0 makes prompts_per_round prompts' pairs from
        # the `policy` ("live" or "ema") weights every N updates; 0 makes them once, in the pairs stage.
        "refresh_every": 0, "prompts_per_round": 128, "policy": "live"})
    sigmas = {key: config.objective[key] for key in ("sigma_scheme", "logit_mean", "logit_std", "mode_scale", "shift")}
    config.objective = ml_collections.ConfigDict({
        "name": "dpo", "variant": "ernie", "beta": 200.0, "lambda_win": 0.35, "lambda_lose": 0.15,
        "reduction": "mean", "weighted_pairs": False, "sigmas": sigmas})
    config.data.update(stage_steps=(200,), batch_sizes=(16,))
    config.train.update(ema_decay=0.0, checkpoint_every=100)  # no EMA: a few hundred small steps
    config.train.optimizer.update(learning_rate=1e-4, warmup_steps=10, decay_steps=200, final_lr_fraction=1.0,
                                  weight_decay=0.0)
    config.evals.samples.every = 100
    config.evals.eval.every = 50  # the policy's flow-matching loss on held-out data: the collapse signal
    if variant == "tiny":
        config.stages = ("components", *config.stages)
        config.components.update(kind="random")
        config.model.update(**{k: v for k, v in _model_fields("tiny").items()})
        config.pairs.update(prompts="shapes:2", samples_per_prompt=2, num_inference_steps=2, prompts_per_round=2)
        config.data.update(stage_steps=(2,), batch_sizes=(2,))
        config.train.optimizer.update(warmup_steps=1, decay_steps=2)
        config.evals.samples.every = 2
        config.evals.eval.every = 2
    return config
