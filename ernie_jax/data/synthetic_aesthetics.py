"""A synthetic aesthetic dataset whose true ranking is known, for training and testing the scorer on a CPU.

Every image has a quality q ~ U(0, 1): the contrast of a striped pattern (random orientation and phase) laid
over a random uniform brightness (a nuisance an untrained tower's features mostly see), plus pixel noise:

    pixel = (brightness + (0.04 + 0.26 q) * stripes) * tint + noise,   brightness ~ U(0.3, 0.7), stripes in {-1, 1}

with `tint` the image's category's colour: grey (1, 1, 1) for "photo", orange (1, 0.75, 0.5) for
"illustration".

    python -m ernie_jax.data.synthetic_aesthetics --out DIR [--train 256] [--heldout 128] [--size 32]

writes DIR/images/*.png and the manifests `ernie_jax.data.aesthetic_manifest` reads:
- pairs.csv: `pairs_per_image` x train random pairs of training images (no image against itself), judged as a
  noisy annotator would: a tie when |q_a - q_b| < tie_band, else image_a wins with probability
  sigmoid(sharpness (q_a - q_b));
- levels.csv: the training images with `level` 1..10 (deciles of q plus annotator noise) and a `category`;
- ratings.csv: the training images with a Likert-like `rating` = round(1 + 9 q + noise), clipped to 1..10;
- heldout.csv: other images with their exact quality as `rating` (the truth to rank against), `level` and
  `category`.
Every image has a category, "photo" or "illustration" (its tint). `category_bias` b is added
to the quality the *training* labels see for illustrations (all three files; an annotator who likes them, as
LAION's raters over-score anime): the held-out truth stays clean, so a scorer's per-category residual on it
shows how much of the bias it learnt (reference section 9, experiment F).
The folder appears only once complete (written beside it, then renamed).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ("photo", "illustration")
TINTS = ((1.0, 1.0, 1.0), (1.0, 0.75, 0.5))
NUM_LEVELS = 10


@dataclasses.dataclass(frozen=True)
class SyntheticAestheticsConfig:
    num_train: int = 256
    num_heldout: int = 128
    size: int = 32
    pairs_per_image: int = 4
    sharpness: float = 12.0
    tie_band: float = 0.03
    label_noise: float = 0.05
    category_bias: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if min(self.num_train, self.num_heldout) < 2 or self.size < 4 or self.pairs_per_image < 1:
            raise ValueError(f"need num_train, num_heldout >= 2, size >= 4, pairs_per_image >= 1; got {self}")


def render(quality: float, brightness: float, angle: float, phase: float, noise: np.ndarray,
           tint: tuple[float, float, float] = TINTS[0]) -> np.ndarray:
    """One image `[S, S, 3]` uint8 (S = noise's side): stripes of contrast set by `quality` over `brightness`,
    coloured by `tint`."""
    size = noise.shape[0]
    y, x = np.mgrid[0:size, 0:size] / size
    stripes = np.sign(np.sin(2 * np.pi * 4 * (x * np.cos(angle) + y * np.sin(angle)) + phase))
    values = (brightness + (0.04 + 0.26 * quality) * stripes[..., None]) * np.asarray(tint) + noise
    return (np.clip(values, 0, 1) * 255).round().astype(np.uint8)


def _levels(values: np.ndarray) -> np.ndarray:
    """1..NUM_LEVELS by equal-count bins of `values`."""
    ranks = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    return 1 + ranks * NUM_LEVELS // len(values)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_synthetic_aesthetics(out: str | os.PathLike, config: SyntheticAestheticsConfig = SyntheticAestheticsConfig()
                               ) -> Path:
    """Writes the dataset (module docstring) to `out`, which must not exist; returns its path."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists")
    rng = np.random.default_rng(config.seed)
    count = config.num_train + config.num_heldout
    quality = rng.uniform(0, 1, count)
    categories = rng.integers(0, len(CATEGORIES), count)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    try:
        names = []
        for index in range(count):
            image = render(quality[index], rng.uniform(0.3, 0.7), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi),
                           rng.normal(0, 0.03, (config.size, config.size, 3)), TINTS[categories[index]])
            names.append(f"images/{index:05d}.png")
            Image.fromarray(image).save(staging / names[-1])
        train = np.arange(config.num_train)
        heldout = np.arange(config.num_train, count)
        judged = quality + config.category_bias * (categories == CATEGORIES.index("illustration"))
        noisy = judged + rng.normal(0, config.label_noise, count)
        pairs = []
        for _ in range(config.pairs_per_image * config.num_train):
            a, b = rng.choice(train, 2, replace=False)
            difference = judged[a] - judged[b]
            if abs(difference) < config.tie_band:
                outcome = "tie"
            else:
                outcome = "left" if rng.uniform() < 1 / (1 + np.exp(-config.sharpness * difference)) else "right"
            pairs.append({"image_a": names[a], "image_b": names[b], "outcome": outcome})
        _write_csv(staging / "pairs.csv", pairs)
        train_levels = _levels(noisy[train])
        _write_csv(staging / "levels.csv", [
            {"image": names[i], "level": int(level), "category": CATEGORIES[categories[i]]}
            for i, level in zip(train, train_levels, strict=True)])
        ratings = np.clip(np.round(1 + 9 * noisy + rng.normal(0, 0.5, count)), 1, NUM_LEVELS)
        _write_csv(staging / "ratings.csv", [{"image": names[i], "rating": float(ratings[i])} for i in train])
        _write_csv(staging / "heldout.csv", [
            {"image": names[i], "rating": float(quality[i]), "level": int(level), "category": CATEGORIES[categories[i]]}
            for i, level in zip(heldout, _levels(quality[heldout]), strict=True)])
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    defaults = SyntheticAestheticsConfig()
    for field in dataclasses.fields(SyntheticAestheticsConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    try:
        write_synthetic_aesthetics(out, SyntheticAestheticsConfig(**args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
