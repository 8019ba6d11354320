"""Random-access record sources and image decoding.

A source is anything with `len()` and `source[i] -> record` (grain's RandomAccessDataSource
protocol; a list of dicts works). A record is a dict with:

- `image`: encoded image bytes (PNG, JPEG, anything PIL reads) or uint8 [H, W, 3];
- `caption`: str (bytes are decoded as UTF-8);
- `category`: str or int, optional; ints are used by their decimal string, missing ->
  `DEFAULT_CATEGORY`;
- `aesthetic`: float, optional; missing -> NaN, which the catalog replaces by the mean of the
  known scores (see `catalog.py`).

Reading or decoding a record can fail (missing file, truncated or garbage bytes, bad metadata);
callers catch the exception, count it and skip the record.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_CATEGORY = "uncategorized"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # the EXIF orientations that swap height and width


def record_category(record) -> str:
    """The record's category as a string; `DEFAULT_CATEGORY` when it has none."""
    category = record.get("category")
    if category is None:
        return DEFAULT_CATEGORY
    if isinstance(category, (bytes, np.bytes_)):
        category = category.decode("utf-8")
    if isinstance(category, (np.ndarray, np.generic)):
        category = category.item()
    if isinstance(category, (bool, float)):
        raise TypeError(f"category {category!r} must be a str or an int")
    return str(category)


def record_aesthetic(record) -> float:
    """The record's aesthetic score; NaN when it has none."""
    aesthetic = record.get("aesthetic")
    if aesthetic is None:
        return math.nan
    aesthetic = float(aesthetic)
    if math.isinf(aesthetic):
        raise ValueError(f"aesthetic score {aesthetic} is not finite")
    return aesthetic


def record_caption(record) -> str:
    caption = record["caption"]
    if isinstance(caption, (bytes, np.bytes_)):
        return caption.decode("utf-8")
    if isinstance(caption, np.ndarray):
        caption = caption.item()
        return caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    if not isinstance(caption, str):
        raise TypeError(f"caption must be str or bytes, got {type(caption).__name__}")
    return caption


def _encoded_bytes(image) -> bytes | None:
    if isinstance(image, (bytes, np.bytes_)):
        return bytes(image)
    if isinstance(image, np.ndarray) and image.dtype == object and image.ndim == 0:
        return bytes(image.item())
    return None


def _check_array(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image array must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    return image


def _header_orientation(opened: Image.Image) -> int | None:
    """EXIF orientation from the metadata read at open. `getexif()` would decode a whole PNG first."""
    exif_bytes = opened.info.get("exif")
    if not exif_bytes:
        return None
    exif = Image.Exif()
    exif.load(exif_bytes)
    return exif.get(EXIF_ORIENTATION)


def image_size(image) -> tuple[int, int]:
    """(height, width) of a record's image as `decode_image` returns it, reading only the header."""
    encoded = _encoded_bytes(image)
    if encoded is None:
        return _check_array(np.asarray(image)).shape[:2]
    with Image.open(io.BytesIO(encoded)) as opened:
        width, height = opened.size
        if _header_orientation(opened) in TRANSPOSING_ORIENTATIONS:
            return width, height
    return height, width


def decode_image(image) -> np.ndarray:
    """A record's image -> uint8 [H, W, 3], upright by its EXIF orientation; grey, palette and alpha
    images are converted to RGB."""
    encoded = _encoded_bytes(image)
    if encoded is None:
        return _check_array(np.asarray(image))
    with Image.open(io.BytesIO(encoded)) as opened:
        return np.asarray(ImageOps.exif_transpose(opened).convert("RGB"), np.uint8)


class FolderSource:
    """Images under a folder, each with a caption file and optional metadata beside it.

    For `a/b/img.png` the caption is `a/b/img.txt` (required; surrounding whitespace stripped) and
    `a/b/img.json`, if present, may hold `category` and `aesthetic`. Images are every file with
    an extension in `IMAGE_EXTENSIONS` (any case) found recursively, in sorted path order.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a folder")
        self.paths = sorted(path for path in self.root.rglob("*")
                            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        record = {"image": path.read_bytes(), "caption": path.with_suffix(".txt").read_text("utf-8").strip()}
        metadata_path = path.with_suffix(".json")
        if metadata_path.exists():
            metadata = json.loads(metadata_path.read_text("utf-8"))
            if not isinstance(metadata, dict):
                raise ValueError(f"{metadata_path}: expected a JSON object, got {type(metadata).__name__}")
            record.update({key: metadata[key] for key in ("category", "aesthetic") if key in metadata})
        return record

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r}, {len(self)} images)"


class TfdsSource:
    """A split of a tfds dataset stored as ArrayRecord, read without TensorFlow.

    `dataset` is either a dataset folder (the one holding `dataset_info.json`, as written by
    `tfds_io.write_tfds_dataset`) or a registered tfds name looked up in `data_dir`. `fields` maps
    record keys (`image`, `caption`, `category`, `aesthetic`) to the dataset's feature names where
    they differ.
    """

    def __init__(self, dataset: str | os.PathLike, *, split: str = "train", data_dir: str | None = None,
                 fields: dict[str, str] | None = None):
        import tensorflow_datasets as tfds

        folder = Path(dataset)
        if (folder / "dataset_info.json").exists():
            self.data_source = tfds.builder_from_directory(str(folder)).as_data_source(split=split)
        else:
            self.data_source = tfds.data_source(str(dataset), split=split, data_dir=data_dir)
        self.fields = {key: key for key in ("image", "caption", "category", "aesthetic")}
        self.fields.update(fields or {})
        self.description = f"{dataset}[{split}]"

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict:
        example = self.data_source[index]
        return {key: example[name] for key, name in self.fields.items() if name in example}

    def __repr__(self) -> str:
        return f"TfdsSource({self.description!r}, {len(self)} records)"
