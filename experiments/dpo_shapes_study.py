"""DPO on the demo, measured: issue 12's toy-scale study of the report's stabilized Flow-DPO.

    python -m ernie_jax.main --config experiments/tiny_shapes.py --workdir runs/tiny_shapes
    python -m experiments.dpo_shapes_study --base runs/tiny_shapes/pipeline --out runs/dpo_study --seeds 0 1 2

One set of preference pairs from the trained demo model (experiments/tiny_shapes_dpo.py's pairs stage:
8 samples of each of 512 training captions, best against worst by the shapes reward), then one DPO run per
(variant, seed) through the runner (`python -m ernie_jax.main`), the seed changing the DPO run's draws (noise,
sigmas, pair order) only. Every `--eval-every` updates the run's weights sample the first `--prompts`
held-out prompts with the base model's seeds, and the study records:
- the shapes detector's scores (`shapes_detector.score_images`) and the mean reward (`rewards.shapes_reward`);
- the win rate against the base on the same prompt and seed (a tie counts half), and the base's own win rate
  and energy distance with other seeds (the noise floor);
- the collapse signals: the held-out flow-matching loss of the policy (`eval/loss`), the velocity-norm ratio
  policy / reference on the training pairs (metrics.jsonl), and the energy distance of the generated latents
  to the base's (0 for the base itself).
With `--pairs offline online` every variant also runs on online pairs (`VARIANT_online`): each run makes its
own rounds of pairs with its live policy every `--refresh-every` updates, for `--round-prompts` fresh training
prompts with the same sampling and reward (by default as many samples in all as the offline pair set).
The table (mean and spread over seeds) goes to `--report` (docs/dpo_shapes.md by default), with the base
measured in the same run. `--small` runs the whole study at test size (tiny random components, a
brightness reward) in about a minute.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = "experiments/tiny_shapes_dpo.py"
# name -> objective overrides. beta is in per-element-mean units (training/objectives/dpo.py); flow_dpo and
# diffusion_dpo carry the 0.5 of their official code, so beta 400 there is ernie's 200.
VARIANTS = {
    "ernie": {"variant": "ernie", "beta": 200.0, "lambda_win": 0.35, "lambda_lose": 0.15},
    "ernie_no_anchors": {"variant": "ernie", "beta": 200.0, "lambda_win": 0.0, "lambda_lose": 0.0},
    "flow_dpo": {"variant": "flow_dpo", "beta": 400.0, "lambda_win": 0.0, "lambda_lose": 0.0},
    "diffusion_dpo": {"variant": "diffusion_dpo", "beta": 400.0, "lambda_win": 0.0, "lambda_lose": 0.0},
    "article": {"variant": "article", "beta": 200.0, "lambda_win": 0.35, "lambda_lose": 0.15},
    "ernie_beta20": {"variant": "ernie", "beta": 20.0, "lambda_win": 0.35, "lambda_lose": 0.15},
    "ernie_beta2000": {"variant": "ernie", "beta": 2000.0, "lambda_win": 0.35, "lambda_lose": 0.15},
}
SMALL_REWARD = "tests.test_post_training:mean_brightness"


def runner(workdir: Path, config: str, overrides: list[str]) -> None:
    command = [sys.executable, "-m", "ernie_jax.main", "--config", config, "--workdir", str(workdir), *overrides]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def make_pairs(pairs_run: Path, config: str, overrides: list[str], base: Path | None) -> tuple[Path, str]:
    """(base pipeline folder, pairs folder): the config's pairs stage, once, in `pairs_run`, sampling `base`
    (which `overrides` name as the components) or, `base` None (test size), random components the same run
    makes first, which are then the base."""
    runner(pairs_run, config, [*overrides, f"--config.stages={('pairs',) if base else ('components', 'pairs')}"])
    return base or pairs_run / "components", str(next((pairs_run / "pairs").iterdir()))


def online_pairs(refresh_every: int, prompts_per_round: int) -> list[str]:
    """The runner overrides of online pairs: every `refresh_every` updates the live policy makes the next
    round's pairs for `prompts_per_round` fresh training prompts (the pairs stage's sampling and reward)."""
    return [f"--config.pairs.refresh_every={refresh_every}", f"--config.pairs.prompts_per_round={prompts_per_round}"]


def train_dpo(run: Path, config: str, overrides: list[str], pairs: str | list[str], base: Path, seed: int,
              steps: int, eval_every: int, objective: dict) -> list[int]:
    """One DPO run of `steps` updates from `base` (also the frozen reference) through the runner (resuming in
    `run`) on `pairs`: a pairs folder, or the runner overrides of online pairs (`online_pairs`); with
    `overrides`, then the `objective` ones (a `VARIANTS` entry), and `seed` changing its draws only; returns
    the updates at which it keeps a checkpoint (every `eval_every`)."""
    checkpoints = list(range(eval_every, steps + 1, eval_every))
    data = pairs if isinstance(pairs, list) else [f"--config.data.preferences=('{pairs}',)"]
    runner(run, config, [*overrides, "--config.stages=('train',)", *data,
                         f"--config.components.path={base.resolve()}", "--config.components.kind=pretrained",
                         f"--config.seed={seed}", f"--config.data.stage_steps=({steps},)",
                         f"--config.train.optimizer.decay_steps={steps}",
                         f"--config.train.checkpoint_every={eval_every}",
                         f"--config.train.max_to_keep={len(checkpoints)}",
                         f"--config.evals.eval.every={eval_every}",
                         *(f"--config.objective.{key}={value}" for key, value in objective.items())])
    return checkpoints


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """E|X - Y| - (E|X - X'| + E|Y - Y'|) / 2 between two sets of flattened samples `[N, D]`."""
    def mean_distance(a, b):
        return float(np.mean(np.sqrt(np.maximum(
            (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2 * a @ b.T, 0.0))))

    x, y = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
    return mean_distance(x, y) - 0.5 * (mean_distance(x, x) + mean_distance(y, y))


# The base's second sample set (other seeds) measures how far two sample sets of one model lie apart.
FLOOR_SEEDS = 100_000


def noise_floor(got: dict, reference: dict) -> dict:
    """Win rate (ties half) and latent energy distance of one evaluation against the base's."""
    wins = np.mean((got["rewards"] > reference["rewards"]) + 0.5 * (got["rewards"] == reference["rewards"]))
    return {"win_rate": float(wins), "latent_energy_distance": energy_distance(got["latents"], reference["latents"])}


class Evaluator:
    """Samples held-out prompts with a given transformer and the base's other components and seeds: the first
    `num_prompts` held-out prompts, or the (prompt, scene) pairs `heldout`."""

    def __init__(self, base: Path, num_prompts: int, steps: int, guidance: float, reward: str, side: int,
                 batch_size: int = 16, heldout=None):
        from ernie_jax.data.shapes import ShapesConfig, heldout_prompts
        from ernie_jax.evaluation.rewards import load_reward
        from ernie_jax.pipeline import ErnieImagePipeline
        from ernie_jax.runner.stages import scheduler_shift

        self.base = ErnieImagePipeline.from_pretrained(base, dtype="float32")
        self.shift = scheduler_shift(base)
        heldout = heldout or heldout_prompts(ShapesConfig(height=side, width=side), num_prompts)
        self.prompts, self.scenes = map(list, zip(*heldout, strict=True))
        self.reward, self.steps, self.guidance, self.side = load_reward(reward), steps, guidance, side
        self.batch_size = batch_size

    def pipeline(self, transformer):
        """The base pipeline with `transformer` in place of its own."""
        from ernie_jax.pipeline import ErnieImagePipeline

        b = self.base
        return ErnieImagePipeline(transformer, b.vae, b.text_encoder, b.tokenizer, shift=self.shift)

    def sample(self, pipe, prompts: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(latents, uint8 images `[B, side, side, 3]`) of one batch of `prompts`."""
        out = pipe(prompt=prompts, negative_prompt="", height=self.side, width=self.side,
                   num_inference_steps=self.steps, guidance_scale=self.guidance, seed=seed, output_type="latent",
                   use_pe=False).images
        return np.asarray(out), np.rint(np.clip(pipe.decode_latents(out), 0, 1) * 255).astype(np.uint8)

    def __call__(self, transformer, seed_offset: int = 0) -> dict:
        from ernie_jax.evaluation import shapes_detector

        pipe = self.pipeline(transformer)
        latents, images = zip(*(self.sample(pipe, self.prompts[first:first + self.batch_size], seed_offset + first)
                                for first in range(0, len(self.prompts), self.batch_size)), strict=True)
        latents, images = np.concatenate(latents), np.concatenate(images)
        return {"scores": shapes_detector.score_images(self.scenes, images),
                "rewards": np.asarray(self.reward(images, self.prompts), np.float64), "latents": latents,
                "images": images}


def restore(run: Path, step: int):
    """The run's trained transformer at `step`, from its checkpoint (the export stage's restore)."""
    from ml_collections import ConfigDict

    from ernie_jax.runner.config import resolve
    from ernie_jax.runner.stages.export import trained_transformer

    experiment = resolve(ConfigDict(json.loads((run / "config.json").read_text())), run)
    return trained_transformer(experiment, ema=False, step=step)


def run_metrics(run: Path, step: int) -> dict:
    """The logged collapse signals at `step`: the training metrics of its update and the eval loss."""
    from ernie_jax.training.metrics import read_scalars

    rows = {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    row = rows[step - 1]
    evals = dict(read_scalars(run / "logs").get("eval/loss", []))
    return {key: row[key] for key in ("velocity_norm_ratio", "implicit_accuracy", "reward_margin",
                                      "policy_chosen_error", "policy_rejected_error", "reference_chosen_error",
                                      "reference_rejected_error")} | {"eval_loss": evals.get(step)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.dpo_shapes_study", description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="the trained demo pipeline folder (not needed with --small)")
    parser.add_argument("--out", required=True, help="work folder (runs resume in it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=200, help="DPO updates per run")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=128, help="held-out prompts per evaluation")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--report", default=str(REPO / "docs" / "dpo_shapes.md"))
    parser.add_argument("--small", action="store_true", help="test size: tiny random components")
    parser.add_argument("--pairs", nargs="+", default=["offline"], choices=["offline", "online"],
                        help="offline: every run trains on one pair set the base made first; online: each run "
                             "makes its own rounds of pairs with its live policy (runs named VARIANT_online)")
    parser.add_argument("--refresh-every", type=int, default=25, help="online: updates per round of pairs")
    parser.add_argument("--round-prompts", type=int, default=128,
                        help="online: prompts per round (the default with --steps 100 and --refresh-every 25 "
                             "samples as many images as the offline pairs' 512 prompts)")
    parser.add_argument("--pair-prompts", type=int, help="the training prompts pairs are made for (offline all "
                        "at once, online a round's share at a time; default: the config's)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    config = f"{CONFIG}:tiny" if args.small else CONFIG
    common = [] if args.small else [f"--config.components.path={Path(args.base).resolve()}"]
    if args.small:
        common.append(f"--config.pairs.reward={SMALL_REWARD}")
    if args.pair_prompts:
        common.append(f"--config.pairs.prompts=shapes:{args.pair_prompts}")
    modes = {}
    if "offline" in args.pairs:
        base, modes[""] = make_pairs(out / "pairs", config, common, None if args.small else Path(args.base))
    elif args.small:  # the random components the pairs stage would have made first
        runner(out / "pairs", config, [*common, "--config.stages=('components',)"])
        base = out / "pairs" / "components"
    else:
        base = Path(args.base)
    if "online" in args.pairs:
        modes["_online"] = online_pairs(args.refresh_every, args.round_prompts)
    side = 64
    evaluate = Evaluator(base, args.prompts, args.sample_steps, 3.0, SMALL_REWARD if args.small else "shapes", side)
    from conversions.transformer import load_transformer

    base_transformer = load_transformer(base / "transformer", "float32")
    reference = evaluate(base_transformer)
    results = {"base": {"scores": reference["scores"], "reward": float(reference["rewards"].mean()),
                        "floor": noise_floor(evaluate(base_transformer, seed_offset=FLOOR_SEEDS), reference)},
               "runs": {}}
    for name, (suffix, pairs) in ((n, mode) for n in args.variants for mode in modes.items()):
        for seed in args.seeds:
            run = out / f"{name}{suffix}-seed{seed}"
            for step in train_dpo(run, config, common, pairs, base, seed, args.steps, args.eval_every,
                                  VARIANTS[name]):
                got = evaluate(restore(run, step))
                results["runs"].setdefault(name + suffix, {}).setdefault(str(step), []).append({
                    "seed": seed, "scores": got["scores"], "reward": float(got["rewards"].mean()),
                    **noise_floor(got, reference), **run_metrics(run, step)})
            (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    Path(args.report).write_text(report(results, args))
    print(f"wrote {args.report} and {out / 'results.json'}")


def spread(values) -> str:
    values = np.asarray([v for v in values if v is not None], np.float64)
    if not len(values):
        return "-"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def report(results: dict, args) -> str:
    base = results["base"]
    lines = [f"# DPO on the shapes demo ({'small test size' if args.small else 'trained demo model'})", "",
             f"Seeds {args.seeds}; {args.steps} DPO updates per run; {args.prompts} held-out prompts, "
             f"{args.sample_steps} sampling steps, CFG 3. Mean ± standard deviation over seeds.", "",
             f"Base (measured in the same run): reward {base['reward']:.3f}, all-correct "
             f"{base['scores']['all']:.3f}, shape {base['scores']['shape']:.3f}, colour "
             f"{base['scores']['colour']:.3f}, position {base['scores']['position']:.3f}. The base against itself "
             f"with other seeds (the noise floor of the two paired columns): win rate "
             f"{base['floor']['win_rate']:.3f}, latent energy distance {base['floor']['latent_energy_distance']:.3f}.",
             "",
             "| variant | step | reward | win rate vs base | all-correct | shape | held-out FM loss | "
             "velocity-norm ratio | latent energy distance to base |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, steps in results["runs"].items():
        for step, rows in steps.items():
            lines.append(f"| {name} | {step} | {spread(r['reward'] for r in rows)} | "
                         f"{spread(r['win_rate'] for r in rows)} | {spread(r['scores']['all'] for r in rows)} | "
                         f"{spread(r['scores']['shape'] for r in rows)} | {spread(r['eval_loss'] for r in rows)} | "
                         f"{spread(r['velocity_norm_ratio'] for r in rows)} | "
                         f"{spread(r['latent_energy_distance'] for r in rows)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
