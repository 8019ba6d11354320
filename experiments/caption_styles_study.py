"""Experiment G at toy scale: does SFT on a prompt-style mix help short prompts, and what does it cost dense
ones? (training_algorithms.md sections 7 and 9-G; issue 12 item 3.)

    python -m ernie_jax.main --config experiments/tiny_shapes.py --workdir runs/tiny_shapes
    python -m experiments.caption_styles_study --base runs/tiny_shapes/pipeline --out runs/styles_study

From the trained demo model (dense captions only), two arms of the same compute per seed: `--steps` more
flow-matching updates on the dense captions (the baseline) or on the style mix (each record keeps its dense
caption with probability 0.25, else becomes a keywords / request / instruction / composition prompt built
from its scene, `rewriter="shapes"`). Both are scored by the shapes detector on the same held-out scenes as
prompts of each style, each prompt scored on the attributes it names (`evaluate` stage, `evaluation.styles`).
The seed changes the training records and the held-out scenes, so the arms compare within a seed; the table
(mean and spread over seeds, the arm's difference to the dense arm per seed) goes to `--report`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.dpo_shapes_study import REPO, spread, runner

STYLES = ("keywords", "request", "instruction", "composition")
METRICS = ("all", "object", "colour", "shape", "position")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.caption_styles_study",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the trained demo pipeline folder")
    parser.add_argument("--out", required=True, help="work folder (runs resume in it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--config", default="experiments/tiny_shapes.py", help="experiments/tiny_shapes.py[:tiny]")
    parser.add_argument("--report", default=str(REPO / "docs" / "caption_styles.md"))
    args = parser.parse_args(argv)
    base, out = Path(args.base).resolve(), Path(args.out)
    results = {}
    # keep_dense 1: every record keeps its dense caption; 0.25: the demo config's style mix.
    for arm, keep_dense in (("dense", 1.0), ("style_mix", 0.25)):
        for seed in args.seeds:
            run = out / f"{arm}-seed{seed}"
            runner(run, args.config, [
                "--config.stages=('precompute','train','export','evaluate')", "--config.components.kind=pretrained",
                f"--config.components.path={base}", "--config.init.path=components", f"--config.seed={seed}",
                f"--config.data.caption_styles.keep_dense={keep_dense}", f"--config.data.stage_steps=({args.steps},)",
                f"--config.train.optimizer.decay_steps={args.steps}", "--config.train.optimizer.learning_rate=2e-4",
                "--config.train.optimizer.warmup_steps=10", "--config.train.optimizer.final_lr_fraction=1.0",
                f"--config.train.checkpoint_every={args.steps}", f"--config.evals.samples.every={args.steps}",
                f"--config.evals.eval.every={args.steps}", f"--config.evaluation.num_prompts={args.prompts}",
                f"--config.evaluation.styles={STYLES}"])
            report = json.loads((run / "eval" / "scores.json").read_text())
            results.setdefault(arm, {})[seed] = {"dense": report["scores"],
                                                 **{s: v["scores"] for s, v in report["styles"].items()}}
            (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    Path(args.report).write_text(table(results, args))
    print(f"wrote {args.report}")


def table(results: dict, args) -> str:
    lines = ["# Experiment G on the shapes demo: SFT on a prompt-style mix against dense captions only", "",
             f"From the trained demo model, {args.steps} more updates per arm, seeds {args.seeds}, "
             f"{args.prompts} held-out scenes per style, each prompt scored on the attributes it names. Mean "
             "± standard deviation over seeds; the last column is the style mix minus the dense arm, per seed.",
             "", "| prompt style | metric | dense captions | style mix | difference |", "|---|---|---|---|---|"]
    for style in ("dense", *STYLES):
        for metric in METRICS:
            dense = [results["dense"][seed][style][metric] for seed in results["dense"]]
            mixed = [results["style_mix"][seed][style][metric] for seed in results["style_mix"]]
            difference = [m - d for m, d in zip(mixed, dense)]
            if all(np.isnan(v) for v in dense):
                continue
            lines.append(f"| {style} | {metric} | {spread(dense)} | {spread(mixed)} | {spread(difference)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
