"""Per-host record metadata (image size, category, aesthetic), the input of sampling and bucketing.

Sampling weights need every record's category and score, and bucketing its image size, before any
batch is drawn, so each host scans its own shard once when the pipeline is built. The scan reads
image headers only; records that cannot be read are counted by exception type and left out.
Corruption that only full decoding reveals (a truncated PNG body) is caught later, when batches
are loaded.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import numpy as np

from ernie_jax.data.sources import image_size, record_aesthetic, record_category

# Score given to records without one when no record has a score (then category weights reduce to
# their counts); otherwise they get the mean of the known scores, which leaves the weights of
# their category roughly where its scored records put them.
NEUTRAL_AESTHETIC = 1.0


def shard_indices(num_records: int, shard_index: int, shard_count: int) -> np.ndarray:
    """Source indices of one host: every `shard_count`-th record from `shard_index`. int64 [n]."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard_index} of {shard_count} is not a valid shard")
    return np.arange(shard_index, num_records, shard_count, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Metadata of the readable records of one host, one row per record, in source-index order.

    indices: int64 [N] source indices. heights, widths: int32 [N] image sizes. categories: int32 [N]
    ids into `category_names`. aesthetics: float32 [N] scores, missing ones filled. unreadable: how
    many records the scan skipped, by exception type.
    """

    indices: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    categories: np.ndarray
    aesthetics: np.ndarray
    category_names: tuple[str, ...]
    unreadable: dict[str, int]

    def __len__(self) -> int:
        return len(self.indices)

    def save(self, path: str | os.PathLike) -> None:
        """Write to `path` (.npz), so that a restarted run can skip the scan."""
        unreadable = json.dumps(self.unreadable)
        with open(path, "wb") as file:
            np.savez(file, indices=self.indices, heights=self.heights, widths=self.widths, categories=self.categories,
                     aesthetics=self.aesthetics, category_names=np.array(self.category_names, dtype=str),
                     unreadable=np.array(unreadable))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Catalog:
        with np.load(path) as arrays:
            return cls(indices=arrays["indices"], heights=arrays["heights"], widths=arrays["widths"],
                       categories=arrays["categories"], aesthetics=arrays["aesthetics"],
                       category_names=tuple(str(name) for name in arrays["category_names"]),
                       unreadable=json.loads(str(arrays["unreadable"])))

    def check_shard(self, num_records: int, shard_index: int, shard_count: int) -> None:
        """Raise unless every row is a record of this shard of a source of `num_records` records."""
        if len(self) and (self.indices.max() >= num_records or np.any(self.indices % shard_count != shard_index)):
            raise ValueError(f"the catalog's records are not all in shard {shard_index} of {shard_count} of a "
                             f"{num_records}-record source: it was scanned from another source or shard")


def scan_catalog(source, indices, category_names=None) -> Catalog:
    """Read the metadata of `source[i]` for each i in `indices`.

    `category_names` fixes the category ids (needed for ids that agree across hosts); by default
    they are the sorted names found in this scan. A category outside a given list is an error.
    """
    rows = []
    unreadable = collections.Counter()
    for index in np.asarray(indices, np.int64):
        try:
            record = source[int(index)]
            height, width = image_size(record["image"])
            rows.append((int(index), height, width, record_category(record), record_aesthetic(record)))
        except Exception as error:  # noqa: BLE001 - any unreadable record is skipped and counted
            unreadable[type(error).__name__] += 1
    if not rows:
        raise ValueError(f"no readable record among {len(indices)} of {source!r} (failures: {dict(unreadable)})")
    indices, heights, widths, categories, aesthetics = zip(*rows)
    return catalog_from_rows(indices, heights, widths, categories, aesthetics, dict(unreadable), category_names,
                             description=repr(source))


def catalog_from_rows(indices, heights, widths, categories, aesthetics, unreadable: dict[str, int],
                      category_names=None, *, description: str = "the source") -> Catalog:
    """A Catalog from per-record metadata in source-index order: category names (str) and raw aesthetic
    scores (NaN where missing); `category_names` and the filling of missing scores as in `scan_catalog`."""
    found = sorted(set(categories))
    names = tuple(found if category_names is None else category_names)
    ids = {name: position for position, name in enumerate(names)}
    unknown = [name for name in found if name not in ids]
    if unknown:
        raise ValueError(f"categories {unknown[:5]} of {description} are not in the given category_names")
    aesthetics = np.asarray(aesthetics, np.float64)
    known = ~np.isnan(aesthetics)
    fill = aesthetics[known].mean() if known.any() else NEUTRAL_AESTHETIC
    aesthetics = np.where(known, aesthetics, fill)
    return Catalog(
        indices=np.asarray(indices, np.int64),
        heights=np.asarray(heights, np.int32),
        widths=np.asarray(widths, np.int32),
        categories=np.array([ids[name] for name in categories], np.int32),
        aesthetics=aesthetics.astype(np.float32),
        category_names=names,
        unreadable=dict(unreadable),
    )
