"""Issue 15's toy proof, experiments F and E (reference/training_algorithms.md section 9) on images: scorers
trained from Swiss-tournament and from Likert labels of the same simulated annotators at an equal budget, judged
against the clean truth, and the category weighting of pre-training data with the learned scores.

    python -m experiments.aes_shapes_study --out runs/aes_study --seeds 0 1 2

Per seed S: `synthetic_aesthetics.write_synthetic_aesthetics` (OUT/seedS/data: aesthetic-shapes scenes, seed S,
annotated by 3 simulated annotators with offsets, drift and lapses; every annotator perceives collages
`aes_tiny_vit.CATEGORY_BIAS` better than they are, a bias only the training labels carry), then one scorer per
variant of `experiments/aes_tiny_vit.py` (OUT/seedS/VARIANT, trained by `train_scorer.run` with seed S, which
resumes), each scored on the held-out images:
- F: SRCC, PLCC (raw and after the 4-parameter logistic fit) and Kendall tau-b against the true quality, SRCC
  against the clean levels 1..10 (ties, as a benchmark of levels has), and the per-category mean residual of the
  logistic-mapped scores on the 1..10 quality scale (positive: rated too high); the labels themselves (Swiss
  Bradley-Terry and Likert scores of the training images) with the same metrics against the training images'
  truth, so a scorer's rows read against its labels' rows.
- E: a pool of `--pool` scenes in fine categories (scene type x the shape and colour of its first object: 36),
  whose sizes follow Zipf(1.1) over a seeded random order, scored by the Swiss pairwise scorer calibrated onto
  the 1..10 scale by its logistic fit on the held-out set (a team's benchmark), and by the true quality (the
  oracle); for each category formula of `ernie_jax.data.categories` (records drawn by a softmax of their score
  inside a category, temperature 1): the share of the draws in the largest 10% of categories, the categories
  covered in 100 draws (expected), the normalised entropy of the category distribution and the mean true quality
  drawn (all exact, from the probabilities).
Tables (mean +- std over seeds, ddof 0) go to `--report`. `--small` runs the tiny variants (a test's size).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ernie_jax.aesthetics import metrics
from ernie_jax.data import aesthetic_shapes, categories
from ernie_jax.data.synthetic_aesthetics import SyntheticAestheticsConfig, write_synthetic_aesthetics
from experiments import aes_tiny_vit

VARIANTS = ("pairwise", "ordinal", "regression", "ordinal_likert", "regression_clean")
# Which labels each variant learns from (for the table).
LABELS = {"pairwise": "Swiss pairs (BT)", "ordinal": "Swiss levels (CORAL)", "regression": "Likert scores (MSE)",
          "ordinal_likert": "Likert levels (CORAL)", "regression_swiss": "Swiss BT scores (MSE)",
          "regression_clean": "true quality (MSE, ceiling)"}
FORMULAS = {
    "count (proportional)": categories.SamplingConfig(category_formula="count"),
    "count x mean (article)": categories.SamplingConfig(category_formula="count_x_aesthetic"),
    "tempered (N a)^0.5": categories.SamplingConfig(category_formula="tempered", tau=0.5),
    "N^0.5 exp(a)": categories.SamplingConfig(category_formula="count_power_exp_aesthetic", tau=0.5),
    "uniform": categories.SamplingConfig(category_formula="uniform"),
}
E_SCORER = "pairwise"
COVERAGE_DRAWS = 100
TOP_FRACTION = 0.1


def _config(variant: str, seed: int, data: Path, small: bool, steps: int | None = None):
    config = aes_tiny_vit.get_config(("tiny_" if small else "") + variant + "-biased")
    config.seed = seed
    if steps is not None:
        config.data.num_steps = config.train.optimizer.decay_steps = config.train.checkpoint_every = steps
        config.train.optimizer.warmup_steps = min(config.train.optimizer.warmup_steps, steps // 2)
    config.data.train = str(data / aes_tiny_vit.LOSSES[variant][1].removeprefix("synthetic:"))
    config.data.eval = str(data / "heldout.csv")
    return config


def data_config(seed: int, small: bool) -> SyntheticAestheticsConfig:
    synthetic = _config("pairwise", seed, Path("."), small).data.synthetic.to_dict()
    return SyntheticAestheticsConfig(**{**synthetic, "seed": seed})


def f_metrics(scores: np.ndarray, quality: np.ndarray, category_names: np.ndarray) -> dict:
    """`metrics.agreement_summary` against the true quality, and the SRCC against the clean levels 1..10."""
    levels = np.clip(np.round(quality), 1, 10)
    return {**metrics.agreement_summary(scores, quality, category_names), "srcc_levels": metrics.srcc(scores, levels)}


def _read_labels(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return ([row["image"] for row in rows], np.array([float(row["rating"]) for row in rows]),
            np.array([row["category"] for row in rows]))


def _load_images(data: Path, names) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(data / name).convert("RGB")) for name in names]


def fine_pool(size: int, seed: int, image_side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(images uint8 [P, S, S, 3], true quality [P], fine category ids [P], the 36 names): scenes drawn by
    scene type uniformly and kept while their fine category (type/first shape/first colour) is below its Zipf(1.1)
    share of `size`."""
    names = [f"{kind}/{shape}/{colour}" for kind in aesthetic_shapes.CATEGORIES for shape in aesthetic_shapes.SHAPES
             for colour in aesthetic_shapes.PALETTE]
    rng = np.random.default_rng([seed, 11])
    ranks = rng.permutation(len(names)) + 1
    shares = ranks ** -1.1 / np.sum(ranks ** -1.1)
    wanted = np.maximum(1, np.round(shares * size)).astype(int)
    scenes, ids, have = [], [], np.zeros(len(names), int)
    while len(scenes) < wanted.sum():
        scene = aesthetic_shapes.sample_scene(rng, aesthetic_shapes.CATEGORIES[int(rng.integers(3))])
        first = scene.objects[0]
        index = names.index(f"{scene.category}/{first.shape}/{first.colour}")
        if have[index] < wanted[index]:
            scenes.append(scene)
            ids.append(index)
            have[index] += 1
    images = np.stack([aesthetic_shapes.render(scene, image_side, image_side) for scene in scenes])
    return images, np.array([aesthetic_shapes.quality(scene) for scene in scenes]), np.array(ids), names


def e_metrics(category_ids: np.ndarray, scores: np.ndarray, quality: np.ndarray, names: list[str]) -> dict:
    counts = np.bincount(category_ids, minlength=len(names))
    top = np.argsort(-counts)[:max(1, round(TOP_FRACTION * len(names)))]
    results = {}
    for label, config in FORMULAS.items():
        record_probs, category_probs = categories.record_probabilities(category_ids, scores, names, config)
        present = category_probs[category_probs > 0]
        results[label] = {
            "top_share": float(category_probs[top].sum()),
            "covered": float(np.sum(1 - (1 - category_probs) ** COVERAGE_DRAWS)),
            "entropy": float(-np.sum(present * np.log(present)) / np.log(len(names))),
            "mean_quality": float(record_probs @ quality)}
    return results


def run_seed(out: Path, seed: int, variants, pool: int, small: bool, steps: int | None = None, log=print) -> dict:
    from ernie_jax.aesthetics import train_scorer

    data = out / f"seed{seed}" / "data"
    if not data.is_dir():
        write_synthetic_aesthetics(data, data_config(seed, small))
    heldout_names, heldout_quality, heldout_categories = _read_labels(data / "heldout.csv")
    heldout_images = _load_images(data, heldout_names)
    # labels: the "swiss" and "likert" scores of the training images against their truth.
    results = {"labels": json.loads((data / "annotation.json").read_text())["labels"], "scorers": {}}
    scorers, heldout_scores = {}, {}
    for variant in variants:
        workdir = out / f"seed{seed}" / variant
        train_scorer.run(_config(variant, seed, data, small, steps), workdir)
        scorers[variant] = train_scorer.load_trained_scorer(workdir)
        heldout_scores[variant] = scorers[variant](heldout_images)
        results["scorers"][variant] = f_metrics(heldout_scores[variant], heldout_quality, heldout_categories)
        log(f"seed {seed} {variant}: {json.dumps(results['scorers'][variant])}")
    if E_SCORER in scorers:
        images, quality, ids, names = fine_pool(pool, seed, data_config(seed, small).size)
        calibration = metrics.fit_logistic4(heldout_scores[E_SCORER], heldout_quality)
        learned = metrics.logistic4(scorers[E_SCORER](list(images)), calibration)
        results["e"] = {"learned": e_metrics(ids, learned, quality, names),
                        "true": e_metrics(ids, quality, quality, names),
                        "pool": {"size": len(quality), "mean_quality": float(quality.mean()),
                                 "srcc_learned": metrics.srcc(learned, quality)}}
    return results


def _cell(values) -> str:
    values = np.asarray(values, np.float64)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def tables(per_seed: dict[int, dict]) -> str:
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    names = sorted(next(iter(first["scorers"].values()))["category_bias"])
    columns = ["srcc", "plcc", "plcc_logistic4", "kendall_tau_b", "srcc_levels"]
    lines = [f"Seeds {seeds}; mean ± std (ddof 0). Bias: mean residual of the logistic-mapped scores on the 1..10 "
             f"quality scale, per category (positive: rated too high).", "",
             "| rows | " + " | ".join(columns + [f"bias, {name}" for name in names]) + " |",
             "|---" * (1 + len(columns) + len(names)) + "|"]

    def row(label, values_by_seed):
        cells = [_cell([values[column] for values in values_by_seed]) if column in values_by_seed[0] else "-"
                 for column in columns]
        cells += [_cell([values["category_bias"][name] for values in values_by_seed]) for name in names]
        return f"| {label} | " + " | ".join(cells) + " |"

    for name in first["labels"]:
        lines.append(row(f"labels: {name} (training images)", [per_seed[s]["labels"][name] for s in seeds]))
    for variant in first["scorers"]:
        lines.append(row(f"scorer: {LABELS[variant]}", [per_seed[s]["scorers"][variant] for s in seeds]))
    if "e" in first:
        lines += ["", f"Experiment E: a pool of {first['e']['pool']['size']} scenes in 36 fine categories (Zipf 1.1), "
                  f"mean true quality {_cell([per_seed[s]['e']['pool']['mean_quality'] for s in seeds])}; the "
                  f"{E_SCORER} scorer's calibrated scores rank it at SRCC "
                  f"{_cell([per_seed[s]['e']['pool']['srcc_learned'] for s in seeds])}. Top share: draws in the "
                  f"largest {TOP_FRACTION:.0%} of categories; covered: categories hit in {COVERAGE_DRAWS} draws "
                  f"(expected); entropy of the category distribution / log 36.", "",
                  "| formula | scores | top share | covered | entropy | mean true quality drawn |",
                  "|---|---|---|---|---|---|"]
        for formula in FORMULAS:
            for scores in ("learned", "true"):
                values = [per_seed[s]["e"][scores][formula] for s in seeds]
                lines.append(f"| {formula} | {scores} | " + " | ".join(
                    _cell([v[key] for v in values]) for key in ("top_share", "covered", "entropy", "mean_quality"))
                    + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.aes_shapes_study",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="work folder (runs resume in it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(LABELS))
    parser.add_argument("--pool", type=int, default=4000, help="experiment E's pool size")
    parser.add_argument("--small", action="store_true", help="the tiny variants (test size)")
    parser.add_argument("--report", help="write the tables to this file (else print them)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = run_seed(out, seed, args.variants, args.pool, args.small)
        (out / f"seed{seed}" / "results.json").write_text(json.dumps(per_seed[seed], indent=2) + "\n")
    text = tables(per_seed)
    if args.report:
        Path(args.report).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
