"""Write image-text records as a tfds ArrayRecord dataset (no TensorFlow needed).

Features are plain tensors: the image is stored as encoded bytes (arrays are PNG-encoded, which is
lossless) because `tfds.features.Image` needs TensorFlow to encode; caption and category are
UTF-8 strings; a missing aesthetic score is stored as NaN (read back as missing). The written
folder is read with `sources.TfdsSource(folder)`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ernie_jax.data.sources import record_aesthetic, record_caption, record_category


def _encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def serialise_record(record: Mapping) -> dict:
    """A record (see `sources.py`) -> the stored example: image bytes, caption, category, aesthetic."""
    image = record["image"]
    if not isinstance(image, (bytes, np.bytes_)):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        image = _encode_png(image)
    return {"image": bytes(image), "caption": record_caption(record), "category": record_category(record),
            "aesthetic": np.float32(record_aesthetic(record))}


class ImageTextRecords(tfds.core.GeneratorBasedBuilder):
    """Image-text records with a category and an aesthetic score, in the order given."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, splits: Mapping[str, Iterable[Mapping]] | None = None, **kwargs):
        self._splits = splits
        super().__init__(**kwargs)

    def _info(self):
        text = tfds.features.Tensor(shape=(), dtype=np.object_)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "caption": text,
                "category": text,
                "aesthetic": tfds.features.Tensor(shape=(), dtype=np.float32),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        if self._splits is None:
            raise ValueError("ImageTextRecords builds only from records: use write_tfds_dataset")
        return {name: self._generate_examples(records) for name, records in self._splits.items()}

    def _generate_examples(self, records):
        for index, record in enumerate(records):
            yield index, serialise_record(record)


def write_tfds_dataset(data_dir: str | os.PathLike, splits: Mapping[str, Iterable[Mapping]]) -> Path:
    """Write `splits` (split name -> records) as ArrayRecord; returns the dataset folder.

    The folder is `data_dir/image_text_records/1.0.0`; tfds writes into a temporary folder and
    renames it when done, so a failed write leaves no dataset behind.
    """
    if not splits:
        raise ValueError("write_tfds_dataset needs at least one split")
    builder = ImageTextRecords(splits=splits, data_dir=os.fspath(data_dir), file_format="array_record")
    if builder.is_prepared():
        raise ValueError(f"a dataset already exists at {builder.data_dir}")
    builder.download_and_prepare()
    return Path(builder.data_dir)

