"""Aesthetic scorers on a benchmark: SRCC, PLCC, logistic PLCC, Kendall tau-b, bootstrap intervals, bias by category.

Each metric comes with its bootstrap interval, overall and per category; `bias` is the mean residual.

    python -m ernie_jax.aesthetics.evaluate --benchmark eria.csv \\
        --scorer laion=laion:clip-vit-large-patch14/,sac+logos+ava1-l14-linearMSE.pth \\
        --scorer ernie_aes=predictions.csv --out table.csv

Benchmark manifest: a CSV file with a header and the columns
- `image`: the image's path, relative to the manifest's folder (or absolute);
- `category`: its category (any text, e.g. photography, illustration);
- `score` (or `level`): the human label, a number (a mean rating or a tier);
- `annotator` (optional): who gave the label; then an image may have one row per annotator, and its label is the
  mean over them (its category must be the same on each row). Without it every image appears once.

Scorers (`--scorer [NAME=]SPEC`, repeatable; NAME defaults to the file's stem or "laion"):
- `laion:CLIP_FOLDER,HEAD_FILE`: the LAION aesthetic predictor (`ernie_jax.aesthetics.laion`), run on the images;
- `PATH.csv`: precomputed predictions, columns `image,score` with the manifest's image names (any scorer's).

The table (one row per scorer and category, "all" first) is printed and, with `--out`, written as CSV. Metrics
are `ernie_jax.aesthetics.metrics`'; intervals are percentile bootstraps over images; `bias` is the category's
mean residual (prediction - label) after the logistic fit over all images, so scorers of any scale compare.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from ernie_jax.aesthetics import metrics

ALL = "all"
# (column, metric) in table order.
METRICS = (
    ("srcc", metrics.srcc),
    ("plcc", metrics.plcc),
    ("plcc_logistic", functools.partial(metrics.plcc, fit="logistic4")),
    ("kendall_tau_b", metrics.kendall_tau_b),
)
COLUMNS = ("scorer", "category", "images") + tuple(
    f"{name}{suffix}" for name, _ in METRICS for suffix in ("", "_low", "_high")) + ("bias",)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One entry per image: `images` as the manifest names them, `paths` resolved, `categories` and `labels`
    (the mean over annotators) `[N]`."""

    images: tuple[str, ...]
    paths: tuple[Path, ...]
    categories: np.ndarray
    labels: np.ndarray


def _read_csv(path: Path, required: tuple[str, ...], one_of: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a CSV file with a header holding `required` and exactly one of `one_of` (if given)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read the CSV ({e})") from e
    missing = [c for c in required if c not in header]
    if missing or (one_of and sum(c in header for c in one_of) != 1):
        wanted = list(required) + ([" or ".join(one_of)] if one_of else [])
        raise ValueError(f"{path}: the header must have the columns {', '.join(wanted)}; got {header}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _number(value: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise ValueError(f"{where}: {value!r} is not a finite number")
    return number


def read_manifest(path) -> Benchmark:
    """The benchmark of a manifest (format in the module docstring)."""
    path = Path(path)
    rows = _read_csv(path, ("image", "category"), one_of=("score", "level"))
    label_column = "score" if "score" in rows[0] else "level"
    with_annotators = "annotator" in rows[0]
    labels: dict[str, list[float]] = {}
    categories: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    for line, row in enumerate(rows, start=2):
        image, category = row["image"], row["category"]
        where = f"{path}:{line}"
        if not image or not category:
            raise ValueError(f"{where}: empty image or category")
        key = (image, row["annotator"] if with_annotators else "")
        if key in seen:
            raise ValueError(f"{where}: {image} appears twice" + (f" for annotator {key[1]}" if with_annotators else ""))
        seen.add(key)
        if categories.setdefault(image, category) != category:
            raise ValueError(f"{where}: {image} has categories {categories[image]!r} and {category!r}")
        labels.setdefault(image, []).append(_number(row[label_column], f"{where} {label_column}"))
    images = tuple(labels)
    return Benchmark(images=images, paths=tuple(path.parent / image for image in images),
                     categories=np.array([categories[image] for image in images]),
                     labels=np.array([np.mean(labels[image]) for image in images]))


def read_predictions(path, benchmark: Benchmark) -> np.ndarray:
    """Precomputed scores `[N]` in the benchmark's image order from a CSV `image,score`."""
    path = Path(path)
    scores = {}
    for line, row in enumerate(_read_csv(path, ("image", "score")), start=2):
        scores[row["image"]] = _number(row["score"], f"{path}:{line} score")
    missing = [image for image in benchmark.images if image not in scores]
    if missing:
        raise ValueError(f"{path}: no score for {len(missing)} benchmark images (first {missing[0]})")
    return np.array([scores[image] for image in benchmark.images])


def laion_predictions(clip_folder, head_file, benchmark: Benchmark, batch_size: int = 16) -> np.ndarray:
    """The LAION aesthetic predictor's scores `[N]` of the benchmark's images."""
    from PIL import Image

    from ernie_jax.aesthetics.laion import LaionAestheticScorer

    scorer = LaionAestheticScorer.from_pretrained(clip_folder, head_file, batch_size=batch_size)
    scores = []
    for start in range(0, len(benchmark.paths), batch_size):
        images = []
        for image_path in benchmark.paths[start:start + batch_size]:
            try:
                with Image.open(image_path) as image:
                    images.append(image.copy())  # the pixels, read now; the file is closed
            except OSError as e:
                raise ValueError(f"{image_path}: cannot read the image ({e})") from e
        scores.append(scorer(images))
    return np.concatenate(scores)


def evaluate(name: str, predictions: np.ndarray, benchmark: Benchmark, *, num_resamples: int = 1000,
             confidence: float = 0.95, seed: int = 0) -> list[dict]:
    """Table rows (dicts keyed by `COLUMNS`) of one scorer: all images, then each category (sorted). A metric
    undefined on a category (too few images, one label) is nan."""
    bias = metrics.category_bias(predictions, benchmark.labels, benchmark.categories, fit="logistic4")
    mapped = metrics.logistic4(predictions, metrics.fit_logistic4(predictions, benchmark.labels))
    rows = []
    for category in (ALL, *sorted(bias)):
        chosen = np.ones(len(predictions), bool) if category == ALL else benchmark.categories == category
        row = {"scorer": name, "category": category, "images": int(chosen.sum()),
               "bias": float(np.mean(mapped - benchmark.labels)) if category == ALL else bias[category]}
        for column, metric in METRICS:
            try:
                value, low, high = metrics.bootstrap_ci(metric, predictions[chosen], benchmark.labels[chosen],
                                                        num_resamples=num_resamples, confidence=confidence, seed=seed)
            except ValueError:  # fewer than two images, or undefined on every resample
                value = low = high = float("nan")
            row.update({column: value, f"{column}_low": low, f"{column}_high": high})
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table: each metric as `value [low, high]`."""
    header = ["scorer", "category", "images"] + [name for name, _ in METRICS] + ["bias"]
    lines = [header]
    for row in rows:
        cells = [row["scorer"], row["category"], str(row["images"])]
        cells += [f"{row[n]:.4f} [{row[n + '_low']:.3f}, {row[n + '_high']:.3f}]" for n, _ in METRICS]
        lines.append(cells + [f"{row['bias']:+.3f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def write_table(path, rows: list[dict]) -> None:
    """The rows as CSV at `path`, written to a temporary file first and renamed (nothing half-written)."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", newline="") as f:
            f.write(buffer.getvalue())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def parse_scorer(spec: str) -> tuple[str, str]:
    """`[NAME=]SPEC` -> (name, SPEC); the default name is the CSV's stem, or "laion"."""
    name, _, rest = spec.partition("=")
    if not rest:
        name, rest = "", spec
    if not rest.startswith("laion:") and not rest.endswith(".csv"):
        raise ValueError(f"scorer {spec!r}: expected laion:CLIP_FOLDER,HEAD_FILE or a .csv of predictions")
    return name or ("laion" if rest.startswith("laion:") else Path(rest).stem), rest


def predictions_for(spec: str, benchmark: Benchmark, batch_size: int) -> np.ndarray:
    if spec.startswith("laion:"):
        clip_folder, _, head_file = spec[len("laion:"):].partition(",")
        if not clip_folder or not head_file:
            raise ValueError(f"scorer {spec!r}: expected laion:CLIP_FOLDER,HEAD_FILE")
        return laion_predictions(clip_folder, head_file, benchmark, batch_size)
    return read_predictions(spec, benchmark)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ernie_jax.aesthetics.evaluate", description=__doc__.split("\n")[0],
                                     epilog="The manifest and scorer formats are in the module docstring.")
    parser.add_argument("--benchmark", required=True, type=Path, help="the benchmark manifest (CSV)")
    parser.add_argument("--scorer", required=True, action="append",
                        help="[NAME=]laion:CLIP_FOLDER,HEAD_FILE or [NAME=]PREDICTIONS.csv (repeatable)")
    parser.add_argument("--out", type=Path, help="write the table here as CSV")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per scorer batch (default 16)")
    args = parser.parse_args(argv)
    scorers = [parse_scorer(spec) for spec in args.scorer]  # every spec checked before any work
    if args.out is not None and args.out.exists():
        raise ValueError(f"{args.out}: already exists (refusing to overwrite)")
    benchmark = read_manifest(args.benchmark)
    rows = []
    for name, spec in scorers:
        rows += evaluate(name, predictions_for(spec, benchmark, args.batch_size), benchmark,
                         num_resamples=args.bootstrap, confidence=args.confidence, seed=args.seed)
    print(format_table(rows))
    if args.out is not None:
        write_table(args.out, rows)


if __name__ == "__main__":
    from conversions.common import run_command

    raise SystemExit(run_command(main))
