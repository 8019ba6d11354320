"""An annotated synthetic aesthetic dataset whose true quality is known, for training and testing the scorer on a
CPU (issue 15's toy proof; training_algorithms.md section 9, experiments D and F on images).

Images: `aesthetic_shapes.render_scenes(num_train + num_heldout, seed, size, size)` (shapes scenes whose quality
1..10 follows from symmetry, colour harmony, clutter and edge roughness; categories emblem, pattern, collage),
the first `num_train` for training, the rest held out.

Labels: the training images are annotated by `num_annotators` simulated annotators
(`ernie_jax.aesthetics.simulated_annotators`, the noise model `noise`: offsets, Likert scales, drift over the
session, lapses, position bias) who perceive the true quality z-scored over the training images, plus
`category_bias` (in those units) for the images of `biased_category`: a taste every annotator shares (as
LAION's raters over-score AI images), present only in the training labels. Two protocols at an equal budget of
`rounds * num_train / 2` judgments per annotator:
- Swiss: each annotator judges their own `swiss.Tournament` of `rounds` rounds; the judgments are combined by
  `ranking.aggregate_annotators` (each annotator's Bradley-Terry fit, standardised, averaged);
- Likert: each annotator rates every image `rounds / 2` times over their session; an image's score is the mean
  of the annotators' standardised mean ratings.

    python -m ernie_jax.data.synthetic_aesthetics --out DIR [--num-train 512] [--category-bias 0.5] ...

writes DIR (atomically) with DIR/images/NNNNN.png and the manifests `ernie_jax.data.aesthetic_manifest` reads:
- pairs.csv: every Swiss judgment of every annotator (image_a shown left, image_b right, outcome left/right);
- levels.csv: the training images with `level` 1..10 (deciles of the Swiss Bradley-Terry scores), `category`;
- swiss_scores.csv: the same images with the Swiss Bradley-Terry score as `rating`;
- ratings.csv: the Likert score (standardised mean rating) as `rating`;
- likert_levels.csv: `level` 1..10, deciles of the Likert score;
- clean.csv: the true quality z-scored over the training images as `rating` (the ceiling no annotation
  reaches, on the scale of the other scores);
- heldout.csv: the held-out images with their true quality as `rating`, the clean level round(quality) as
  `level`, and `category` (what a scorer is judged against);
- annotation.json: the budget and, for each label set (Swiss and Likert scores), its SRCC, PLCC (raw and
  after the 4-parameter logistic fit) and Kendall tau-b against the training images' true quality, and its
  per-category mean residual on the quality scale after the logistic fit (the bias the labels carry).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ernie_jax.aesthetics import metrics, ranking
from ernie_jax.aesthetics.simulated_annotators import (Annotator, NoiseModel, likert_ratings, standardised_mean,
                                                      swiss_tournaments)
from ernie_jax.data import aesthetic_shapes

NUM_LEVELS = 10


@dataclasses.dataclass(frozen=True)
class SyntheticAestheticsConfig:
    num_train: int = 512
    num_heldout: int = 128
    size: int = 64
    num_annotators: int = 3
    rounds: int = 8
    category_bias: float = 0.0
    biased_category: str = "collage"
    noise: dict = dataclasses.field(default_factory=dict)  # NoiseModel fields to change
    seed: int = 0

    def __post_init__(self):
        if (min(self.num_train, self.num_heldout) < 2 or self.size < 8 or self.num_annotators < 1
                or self.rounds < 2 or self.rounds % 2):
            raise ValueError(f"need num_train, num_heldout >= 2, size >= 8, num_annotators >= 1 and an even "
                             f"rounds >= 2 (Likert rates each image rounds / 2 times); got {self}")
        if self.biased_category not in aesthetic_shapes.CATEGORIES:
            raise ValueError(f"biased_category {self.biased_category!r} is not one of {aesthetic_shapes.CATEGORIES}")
        try:
            NoiseModel(**dict(self.noise))
        except TypeError as error:
            raise ValueError(f"noise: {error}") from None


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_synthetic_aesthetics(out: str | os.PathLike, config: SyntheticAestheticsConfig = SyntheticAestheticsConfig()
                               ) -> Path:
    """Writes the dataset (module docstring) to `out`, which must not exist; returns its path."""
    from conversions.common import atomic_directory

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists")
    scenes = aesthetic_shapes.render_scenes(config.num_train + config.num_heldout, config.seed, config.size,
                                            config.size)
    train = np.arange(config.num_train)
    heldout = np.arange(config.num_train, config.num_train + config.num_heldout)
    names = [f"images/{index:05d}.png" for index in range(len(scenes.quality))]
    quality, categories = scenes.quality, scenes.categories
    train_quality = quality[train]
    standardised = (train_quality - train_quality.mean()) / train_quality.std()
    perceived = (standardised + config.category_bias * (categories[train] == config.biased_category))

    noise = NoiseModel(**dict(config.noise))
    budget = config.rounds * config.num_train // 2
    world = np.random.default_rng([config.seed, 7])
    annotator_seeds = world.integers(0, 2**31, config.num_annotators)

    def annotators(session_length):
        # The same annotators (offset, scale, drift path over their session) for both protocols.
        return [Annotator(np.random.default_rng(seed), noise, session_length) for seed in annotator_seeds]

    judgments, _ = swiss_tournaments(annotators(budget), perceived, config.rounds, config.seed)
    swiss_scores = ranking.aggregate_annotators(config.num_train, judgments).scores
    ratings_per_item = config.rounds // 2
    likert_scores = standardised_mean(likert_ratings(annotators(ratings_per_item * config.num_train), perceived,
                                                     ratings_per_item, np.random.default_rng([config.seed, 8])))

    def labels(column: str, values, index=train) -> list[dict]:
        return [{"image": names[i], column: value, "category": categories[i]}
                for i, value in zip(index, np.asarray(values).tolist(), strict=True)]

    with atomic_directory(out) as staging:
        (staging / "images").mkdir()
        for name, image in zip(names, scenes.images, strict=True):
            Image.fromarray(image).save(staging / name)
        _write_csv(staging / "pairs.csv", [{"image_a": names[left], "image_b": names[right], "outcome": outcome}
                                           for annotator in judgments for left, right, outcome in annotator])
        _write_csv(staging / "levels.csv", labels("level", ranking.levels_from_scores(swiss_scores, NUM_LEVELS)))
        _write_csv(staging / "swiss_scores.csv", labels("rating", swiss_scores))
        _write_csv(staging / "ratings.csv", labels("rating", likert_scores))
        _write_csv(staging / "likert_levels.csv", labels("level", ranking.levels_from_scores(likert_scores, NUM_LEVELS)))
        _write_csv(staging / "clean.csv", labels("rating", standardised))
        _write_csv(staging / "heldout.csv", [
            {"image": names[i], "rating": float(quality[i]), "level": int(np.clip(np.round(quality[i]), 1, NUM_LEVELS)),
             "category": categories[i]} for i in heldout])
        summary = {"config": dataclasses.asdict(config), "judgments_per_annotator": budget,
                   "labels": {"swiss": metrics.agreement_summary(swiss_scores, train_quality, categories[train]),
                              "likert": metrics.agreement_summary(likert_scores, train_quality, categories[train])}}
        (staging / "annotation.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    from conversions.common import run_command

    def command(argv):
        parser = argparse.ArgumentParser(prog="python -m ernie_jax.data.synthetic_aesthetics",
                                         description=__doc__.splitlines()[0])
        parser.add_argument("--out", required=True)
        defaults = SyntheticAestheticsConfig()
        for field in dataclasses.fields(SyntheticAestheticsConfig):
            if field.name != "noise":
                parser.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                                    default=getattr(defaults, field.name))
        args = vars(parser.parse_args(argv))
        out = args.pop("out")
        write_synthetic_aesthetics(out, SyntheticAestheticsConfig(**args))
        print(f"wrote {out}")

    return run_command(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
