"""Aesthetic judgments as training data for the scorer: manifests of pairs or of per-image labels, read and
checked before any compute, and a grain pipeline that loads, preprocesses and batches their images.

Manifests (CSV with a header; paths relative to `images_root`, default the manifest's folder, or absolute):
- pairs: columns `image_a`, `image_b`, `outcome` (`left`: image_a is better, `right`: image_b, `tie`);
- labels: an image column `image` (or `item`, the annotation service's export) and `level` (an integer, 1 =
  worst) and/or `rating` (a number), optional `category`. The annotation service's `export --out FILE.json`
  (`{"items": [{"item", "level", ...}], ...}`) is read as a labels manifest too.
Any other layout, a missing column or value, a bad outcome or level, or a missing image is one ValueError naming
the file, line and problem.

Batches (`build_scorer_pipeline`): pairs give `images_a`, `images_b` float32 `[B, 3, H, W]` (the preprocessor's
pixel values) and `outcome [B]` float32 (1, 0 or 1/2: P(image_a is better)); labels give `images`, and
`levels [B]` int32 and/or `ratings [B]` float32 (whichever the manifest has) and `category [B]` int32 (ids into
`ScorerData.category_names`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import grain
import numpy as np
from PIL import Image

PAIR_OUTCOMES = {"left": 1.0, "right": 0.0, "tie": 0.5}
PAIR_COLUMNS = ("image_a", "image_b", "outcome")
IMAGE_COLUMNS = ("image", "item")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A read manifest: `kind` "pairs" or "labels"; `columns` {batch key: array over rows}: pairs have
    `image_a`, `image_b` (absolute paths) and `outcome` float32; labels have `image`, and `levels` int32 and/or
    `ratings` float32, and `category` int32 ids into `category_names`."""

    path: Path
    kind: str
    columns: dict[str, np.ndarray]
    category_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


def _rows(path: Path) -> list[dict]:
    """The manifest's rows as dicts with their line numbers under "__line__"."""
    if not path.is_file():
        raise ValueError(f"manifest {path} does not exist")
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text())["items"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"manifest {path}: not an annotation export ({{\"items\": [...]}}): {error}") from None
        return [{**item, "__line__": f"item {index}"} for index, item in enumerate(items)]
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return [{**row, "__line__": f"line {index + 2}"} for index, row in enumerate(reader)]


def _value(row: dict, column: str, where: str, convert: Callable):
    value = row.get(column)
    if value is None or value == "":
        raise ValueError(f"{where}: no {column}")
    try:
        return convert(value)
    except ValueError:
        raise ValueError(f"{where}: {column} {value!r} is not a {convert.__name__}") from None


def _integer(value) -> int:
    number = float(value)
    if number != int(number):
        raise ValueError
    return int(number)


def read_manifest(path: str | os.PathLike, images_root: str | os.PathLike | None = None) -> Manifest:
    """Reads and checks a pairs or labels manifest (module docstring); the kind follows from its columns."""
    path = Path(path)
    root = Path(images_root) if images_root else path.parent
    rows = _rows(path)
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    header = set(rows[0]) - {"__line__"}

    def image(row, column, where) -> str:
        file = root / _value(row, column, where, str)
        if not file.is_file():
            raise ValueError(f"{where}: image {file} does not exist")
        return str(file)

    if set(PAIR_COLUMNS) <= header:
        columns = {"image_a": [], "image_b": [], "outcome": []}
        for row in rows:
            where = f"manifest {path}, {row['__line__']}"
            outcome = _value(row, "outcome", where, str).strip().lower()
            if outcome not in PAIR_OUTCOMES:
                raise ValueError(f"{where}: outcome {outcome!r} is not one of {sorted(PAIR_OUTCOMES)}")
            columns["image_a"].append(image(row, "image_a", where))
            columns["image_b"].append(image(row, "image_b", where))
            columns["outcome"].append(PAIR_OUTCOMES[outcome])
        return Manifest(path, "pairs", {"image_a": np.asarray(columns["image_a"]),
                                        "image_b": np.asarray(columns["image_b"]),
                                        "outcome": np.asarray(columns["outcome"], np.float32)})
    image_column = next((c for c in IMAGE_COLUMNS if c in header), None)
    labels = [c for c in ("level", "rating") if c in header]
    if image_column is None or not labels:
        raise ValueError(f"manifest {path}: columns {sorted(header)} are neither a pairs manifest "
                         f"({', '.join(PAIR_COLUMNS)}) nor a labels manifest (image or item, with level and/or "
                         f"rating)")
    images, levels, ratings, categories = [], [], [], []
    for row in rows:
        where = f"manifest {path}, {row['__line__']}"
        images.append(image(row, image_column, where))
        if "level" in labels:
            levels.append(_value(row, "level", where, _integer))
            if levels[-1] < 1:
                raise ValueError(f"{where}: level {levels[-1]} is below 1 (levels count from 1)")
        if "rating" in labels:
            ratings.append(_value(row, "rating", where, float))
        categories.append(str(row.get("category") or ""))
    names = tuple(sorted(set(categories)))
    columns = {"image": np.asarray(images),
               "category": np.asarray([names.index(c) for c in categories], np.int32)}
    if levels:
        columns["levels"] = np.asarray(levels, np.int32)
    if ratings:
        columns["ratings"] = np.asarray(ratings, np.float32)
    return Manifest(path, "labels", columns, names)


class LoadBatch(grain.transforms.Map):
    """Row indices `[B]` -> the batch: each image column's files decoded and preprocessed to
    `images*` float32 `[B, 3, H, W]`, the other columns gathered."""

    def __init__(self, manifest: Manifest, preprocess: Callable):
        self.manifest = manifest
        self.preprocess = preprocess

    def _pixels(self, paths) -> np.ndarray:
        def load(path):
            with Image.open(path) as image:
                image.load()
                return self.preprocess(image)

        return np.stack([load(path) for path in paths])

    def map(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        batch = {}
        for name, column in self.manifest.columns.items():
            if name == "image":
                batch["images"] = self._pixels(column[rows])
            elif name.startswith("image_"):
                batch["images_" + name[len("image_"):]] = self._pixels(column[rows])
            else:
                batch[name] = column[rows]
        return batch


@dataclasses.dataclass(frozen=True)
class ScorerData:
    """A built pipeline: `iterator()` yields this process's batches, endlessly (reshuffled every epoch)."""

    dataset: grain.MapDataset
    manifest: Manifest

    @property
    def category_names(self) -> tuple[str, ...]:
        return self.manifest.category_names

    def iterator(self) -> grain.DatasetIterator:
        """A checkpointable iterator; batches are made in the calling thread."""
        return iter(self.dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def build_scorer_pipeline(manifest: Manifest, preprocess: Callable, *, batch_size: int, seed: int,
                          shard_index: int = 0, shard_count: int = 1) -> ScorerData:
    """Batches of `batch_size` rows of this process's shard of the manifest (rows shard_index, shard_index +
    shard_count, ...), shuffled with `seed` afresh each epoch; `preprocess` maps one PIL image to `[3, H, W]`
    (an `image_preprocess.ImagePreprocessor`'s `one`)."""
    rows = grain.MapDataset.range(len(manifest))[shard_index::shard_count]
    if len(rows) < batch_size:
        raise ValueError(f"manifest {manifest.path}: {len(rows)} rows for this process, fewer than its batch size "
                         f"{batch_size}")
    dataset = rows.shuffle(seed).repeat().batch(batch_size, drop_remainder=True, batch_fn=np.asarray)
    return ScorerData(dataset.map(LoadBatch(manifest, preprocess)), manifest)
