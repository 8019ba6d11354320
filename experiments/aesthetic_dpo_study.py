"""The aesthetic loop closed (issue 15): our trained aesthetic scorer as the DPO reward on the shapes demo, and
whether that raises the true aesthetic quality of its images without lowering its prompt following.

    python -m ernie_jax.main --config experiments/tiny_shapes.py --workdir runs/tiny_shapes
    python -m experiments.aesthetic_dpo_study --base runs/tiny_shapes/pipeline \\
        --scorer runs/aes_study/seed0/pairwise --out runs/aesthetic_dpo --seeds 0 1 2

Preference pairs from the demo base (experiments/tiny_shapes_dpo.py's pairs stage, `--samples` samples of each
of the first `--pair-prompts` training captions, best against worst) whose reward is the scorer
(`aesthetic:trained:DIR`, `aesthetics.scorers`), then stabilized DPO (the `ernie` variant with
experiments/dpo_shapes_study.py's settings) per seed through the runner. Every `--eval-every` updates the
run's weights sample the first `--prompts` held-out prompts with the base's seeds, and the study records:
- the measured true quality (`evaluation.aesthetic_measure`: the aesthetic domain's four factors read from
  pixels and its quality formula), mean and factors, and its win rate against the base on the same prompt and
  seed (a tie counts half);
- the scorer's own mean score;
- the prompt following: the shapes detector's scores (`shapes_detector.score_images`) and the mean shapes
  reward (`rewards.shapes_reward`).
The base is measured in the same run, and again with other seeds (its seed-to-seed noise floor). Before the
DPO runs the study checks that there is something to learn: the spread of the measured quality among the base's
`--samples` samples of each of `SPREAD_PROMPTS` held-out prompts, and how the scorer ranks those samples
against the measured quality (Spearman within each prompt, averaged). The table (mean ± standard deviation over
seeds) goes to `--report` (docs/aesthetic_loop.md by default). `--small` runs it all at test size (tiny random
components, 2 sampling steps) in about a minute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

from ernie_jax.generate import write_atomically
from experiments.dpo_shapes_study import (
    CONFIG,
    FLOOR_SEEDS,
    REPO,
    VARIANTS,
    Evaluator,
    make_pairs,
    noise_floor,
    restore,
    spread,
    train_dpo,
)

VARIANT = "ernie"
SPREAD_PROMPTS = 8
MEASURES = ("quality", "symmetry", "harmony", "clutter", "roughness")
DETECTOR_METRICS = ("colour", "shape", "position", "count", "all")


def summary(got: dict, scorer) -> dict:
    """One evaluation (`Evaluator`'s output) summarised: the measured quality and factors (means), the scorer's
    mean score, the shapes reward's mean and the detector's scores, and the per-image measured quality and
    scores under "per_image"."""
    from ernie_jax.evaluation.aesthetic_measure import measure_images

    measured = measure_images(got["images"])
    scores = np.asarray(scorer(list(got["images"])), np.float64)
    return {**{name: float(measured[name].mean()) for name in MEASURES}, "scorer": float(scores.mean()),
            "shapes_reward": float(got["rewards"].mean()), "detector": got["scores"],
            "per_image": {"quality": measured["quality"], "scorer": scores}}


def against_base(row: dict, got: dict, base_row: dict, base_got: dict) -> dict:
    """`row` (the summary of `got`) with its measured quality's win rate against the base's on the same prompts
    and seeds (a tie counts half) and the energy distance of its latents to the base's."""
    paired = noise_floor({"rewards": row["per_image"]["quality"], "latents": got["latents"]},
                         {"rewards": base_row["per_image"]["quality"], "latents": base_got["latents"]})
    return {**row, "quality_win_rate": paired["win_rate"], "latent_energy_distance": paired["latent_energy_distance"]}


def sample_spread(evaluate: Evaluator, transformer, scorer, samples: int) -> dict:
    """Whether the base's samples of one prompt differ in measured quality: for each of the first
    `SPREAD_PROMPTS` held-out prompts, `samples` samples (seeds differ per sample); returns the mean over
    prompts of the within-prompt standard deviation of the measured quality, the fraction of prompts whose
    samples all measure the same, and the mean within-prompt Spearman of the scorer's score with the measured
    quality (over the prompts where both vary)."""
    from ernie_jax.evaluation.aesthetic_measure import measure_images

    pipe = evaluate.pipeline(transformer)
    deviations, rank_agreement = [], []
    for index, prompt in enumerate(evaluate.prompts[:SPREAD_PROMPTS]):
        _, images = evaluate.sample(pipe, [prompt] * samples, 2 * FLOOR_SEEDS + index * samples)
        quality = measure_images(images)["quality"]
        scores = np.asarray(scorer(list(images)), np.float64)
        deviations.append(float(quality.std()))
        if quality.std() > 0 and scores.std() > 0:
            rank_agreement.append(float(stats.spearmanr(scores, quality)[0]))
    return {"prompts": len(deviations), "samples": samples, "quality_std_within_prompt": float(np.mean(deviations)),
            "all_equal_fraction": float(np.mean([d == 0 for d in deviations])),
            "scorer_spearman_within_prompt": float(np.mean(rank_agreement)) if rank_agreement else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.aesthetic_dpo_study",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="the trained demo pipeline folder (not needed with --small)")
    parser.add_argument("--scorer", required=True, help="the scorer's training run folder (the reward)")
    parser.add_argument("--out", required=True, help="work folder (runs resume in it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="DPO updates per run")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=128, help="held-out prompts per evaluation")
    parser.add_argument("--pair-prompts", type=int, default=512, help="training captions the pairs are made of")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt for the pairs")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--report", default=str(REPO / "docs" / "aesthetic_loop.md"))
    parser.add_argument("--small", action="store_true", help="test size: tiny random components")
    args = parser.parse_args(argv)
    from ernie_jax.aesthetics.scorers import load_scorer

    scorer_spec = f"trained:{Path(args.scorer).resolve()}"
    scorer = load_scorer(scorer_spec)  # refuses a folder that is not a scorer run before anything runs
    out = Path(args.out)
    config = f"{CONFIG}:tiny" if args.small else CONFIG
    common = [f"--config.pairs.reward=aesthetic:{scorer_spec}", f"--config.pairs.prompts=shapes:{args.pair_prompts}",
              f"--config.pairs.samples_per_prompt={args.samples}",
              f"--config.pairs.num_inference_steps={args.sample_steps}"]
    if not args.small:
        common.append(f"--config.components.path={Path(args.base).resolve()}")
    base, pairs = make_pairs(out / "pairs", config, common, None if args.small else Path(args.base))
    evaluate = Evaluator(base, args.prompts, args.sample_steps, 3.0, "shapes", 64)
    from conversions.transformer import load_transformer
    from ernie_jax.data.preferences import PreferenceSource

    base_transformer = load_transformer(base / "transformer", "float32")
    results = {"settings": {key: value for key, value in vars(args).items() if key != "report"},
               "pairs": len(PreferenceSource(pairs)),
               "spread": sample_spread(evaluate, base_transformer, scorer, args.samples)}
    base_got = evaluate(base_transformer)
    base_row = summary(base_got, scorer)
    other_seeds = evaluate(base_transformer, seed_offset=FLOOR_SEEDS)
    results["base"] = {
        "same_seeds": base_row, "other_seeds": against_base(summary(other_seeds, scorer), other_seeds, base_row, base_got),
        "scorer_spearman": float(stats.spearmanr(base_row["per_image"]["scorer"], base_row["per_image"]["quality"])[0])}
    results["runs"] = {}
    for seed in args.seeds:
        run = out / f"{VARIANT}-seed{seed}"
        for step in train_dpo(run, config, common, pairs, base, seed, args.steps, args.eval_every, VARIANTS[VARIANT]):
            got = evaluate(restore(run, step))
            results["runs"].setdefault(str(step), []).append(
                {"seed": seed, **against_base(summary(got, scorer), got, base_row, base_got)})
        _write_text(out / "results.json", json.dumps(results, indent=1, default=_jsonable) + "\n")
    _write_text(Path(args.report), report(results, args))
    print(f"wrote {args.report} and {out / 'results.json'}")


def _write_text(path: Path, text: str) -> None:
    write_atomically(str(path), lambda staging: Path(staging).write_text(text))


def _jsonable(value):
    return value.tolist() if isinstance(value, np.ndarray) else float(value)


def _row(model: str, step: str, rows: list[dict]) -> str:
    """A table row: each column's mean ± standard deviation over `rows` (one per seed)."""
    cells = [*(spread(r[name] for r in rows) for name in MEASURES), spread(r.get("quality_win_rate") for r in rows),
             spread(r.get("latent_energy_distance") for r in rows), spread(r["scorer"] for r in rows),
             spread(r["shapes_reward"] for r in rows), *(spread(r["detector"][m] for r in rows) for m in DETECTOR_METRICS)]
    return "| " + " | ".join([model, step, *cells]) + " |"


def report(results: dict, args) -> str:
    settings, base, check = results["settings"], results["base"], results["spread"]
    rank = check["scorer_spearman_within_prompt"]
    lines = [f"# The aesthetic loop on the shapes demo ({'small test size' if args.small else 'trained demo model'})",
             "",
             f"Scorer `{settings['scorer']}`; pairs from {settings['pair_prompts']} training captions x "
             f"{settings['samples']} samples, best against worst by the scorer: {results['pairs']} pairs. DPO "
             f"`{VARIANT}` ({', '.join(f'{k} {v}' for k, v in VARIANTS[VARIANT].items() if k != 'variant')}), "
             f"seeds {settings['seeds']}, {settings['steps']} updates; {settings['prompts']} held-out prompts, "
             f"{settings['sample_steps']} sampling steps, CFG 3. Mean ± standard deviation over seeds.", "",
             f"Something to learn? The base's {check['samples']} samples of each of {check['prompts']} held-out "
             f"prompts: within-prompt standard deviation of the measured quality {check['quality_std_within_prompt']:.3f} "
             f"(mean over prompts), {check['all_equal_fraction']:.0%} of the prompts with all samples equal; the "
             f"scorer's Spearman with the measured quality within a prompt "
             f"{'-' if rank is None else f'{rank:.3f}'}, over the base's {settings['prompts']} evaluation images "
             f"{base['scorer_spearman']:.3f}.", "",
             "| model | step | measured quality | symmetry | harmony | clutter | roughness | quality win rate vs base "
             "| latent energy distance to base | scorer | shapes reward | colour | shape | position | count | "
             "all-correct |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             _row("base", "0", [base["same_seeds"]]), _row("base, other seeds (noise floor)", "0", [base["other_seeds"]])]
    lines += [_row(VARIANT, step, rows) for step, rows in results["runs"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
