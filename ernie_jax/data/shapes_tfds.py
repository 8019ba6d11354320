"""The synthetic shapes dataset as a tfds builder: generated locally (nothing is downloaded), written as
ArrayRecord without TensorFlow, read back with `tfds.data_source`.

    builder = ShapesDataset(config="64x64", data_dir=DIR)   # or config=ShapesDatasetConfig(...)
    builder.download_and_prepare()
    train = tfds.data_source("shapes_dataset/64x64", data_dir=DIR, split="train")
    train[i]  # {"image": uint8 [64, 64, 3], "caption": bytes, "category": bytes, "aesthetic": float32,
              #  "spec": bytes}

Record i of a split is `shapes.make_example(config, split, i)` (text fields come back as UTF-8 bytes).
Shuffling at write time is disabled so that records stay in index order; the dataset is random
already and the input pipeline shuffles.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from ernie_jax.data.shapes import SPLITS, ShapesConfig, make_example


@dataclasses.dataclass(eq=False)
class ShapesDatasetConfig(tfds.core.BuilderConfig):
    """A size and sampling of the dataset: `shapes` is its ShapesConfig, num_train / num_heldout the split
    sizes."""

    shapes: ShapesConfig = dataclasses.field(default_factory=ShapesConfig)
    num_train: int = 20_000
    num_heldout: int = 256

    def __post_init__(self):
        if self.num_train < 1 or self.num_heldout < 1:
            raise ValueError(f"ShapesDatasetConfig {self.name!r}: split sizes must be >= 1, "
                             f"got num_train={self.num_train}, num_heldout={self.num_heldout}")


def _size_config(height: int, width: int) -> ShapesDatasetConfig:
    return ShapesDatasetConfig(name=f"{height}x{width}", description=f"{height}x{width} images",
                               shapes=ShapesConfig(height=height, width=width))


class ShapesDataset(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes at grid positions with captions, some with a rendered word (see `shapes`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    BUILDER_CONFIGS: ClassVar[list[ShapesDatasetConfig]] = [_size_config(32, 32), _size_config(64, 64), _size_config(128, 128), _size_config(64, 96)]
    DEFAULT_CONFIG_NAME = "64x64"

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        # ArrayRecord by default: random access for grain, and writing it needs no TensorFlow.
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        shapes = self.builder_config.shapes
        features = tfds.features.FeaturesDict({
            # Stored as a zlib-compressed tensor: tfds.features.Image needs TensorFlow to encode PNG.
            "image": tfds.features.Tensor(shape=(shapes.height, shapes.width, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.ZLIB),
            "caption": tfds.features.Text(),
            "category": tfds.features.Text(),
            "aesthetic": tfds.features.Scalar(dtype=np.float32),
            "spec": tfds.features.Text(),
        })
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features,
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # generated locally
        sizes = {"train": self.builder_config.num_train, "heldout": self.builder_config.num_heldout}
        return {split: self._generate_examples(split, sizes[split]) for split in SPLITS}

    def _generate_examples(self, split: str, num: int):
        for index in range(num):
            yield index, make_example(self.builder_config.shapes, split, index)
