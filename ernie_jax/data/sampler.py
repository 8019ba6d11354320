"""Deterministic bucket-by-bucket sampling: step -> (bucket, record rows), as a grain MapDataset.

Per curriculum stage every catalog row gets its closest bucket; rows whose center crop would remove
more than `max_crop_fraction` of the image are left out of that stage. Records are drawn with
replacement from the category-weighted mixture p (categories.py), two-stage so that a batch holds
one bucket:

1. the step's bucket b is drawn with probability P(b) = sum of p over the bucket's records,
   from a generator seeded by (seed, step) alone, so every host picks the same bucket;
2. the host's records are drawn from p restricted to its shard's records of bucket b, from a
   generator seeded by (seed, step, shard).

Then P(record i) = P(b(i)) * p_i / P(b(i)) = p_i: grouping by bucket does not bias the mixture, no
bucket runs dry and none is left over (the role of NovelAI's catch-all bucket and its draw by
remaining size, for sampling without replacement). Everything is a pure function of the step, so
a grain iterator's state is just its position and a restored run sees the same data.
"""

from __future__ import annotations

import dataclasses
import sys

import grain
import numpy as np

from ernie_jax.data.buckets import Bucket, assign_buckets, crop_fraction
from ernie_jax.data.catalog import Catalog
from ernie_jax.data.categories import SamplingConfig, record_probabilities
from ernie_jax.data.curriculum import Curriculum, Stage

_BUCKET_STREAM, _RECORD_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class StageTable:
    """One stage's sampling tables on this host.

    record_buckets: int32 [N] bucket index of each catalog row, -1 where the crop bound drops it.
    probs: float64 [N] the mixture p over catalog rows. category_probs: float64 [K] its category
    marginals. bucket_probs: float64 [M] P(bucket), the same on every host. members[b]: int64
    catalog rows of bucket b; cdfs[b]: float64 cumulative p over them (unnormalised).
    """

    buckets: tuple[Bucket, ...]
    record_buckets: np.ndarray
    probs: np.ndarray
    category_probs: np.ndarray
    bucket_probs: np.ndarray
    members: tuple[np.ndarray, ...]
    cdfs: tuple[np.ndarray, ...]

    @property
    def num_dropped(self) -> int:
        """Records the crop bound leaves out of this stage."""
        return int(np.sum(self.record_buckets < 0))


def build_stage_table(catalog: Catalog, stage: Stage, sampling: SamplingConfig, max_crop_fraction: float,
                      host_mean) -> StageTable:
    """Bucket assignment and sampling tables for `stage`; `host_mean` averages a vector over hosts."""
    buckets = stage.buckets
    record_buckets = assign_buckets(catalog.heights, catalog.widths, buckets)
    crop = crop_fraction(catalog.heights, catalog.widths, [buckets[b].height for b in record_buckets],
                         [buckets[b].width for b in record_buckets])
    record_buckets = np.where(crop <= max_crop_fraction, record_buckets, -1).astype(np.int32)
    eligible = record_buckets >= 0
    if not eligible.any():
        raise ValueError(f"stage {stage.name or stage.start_step}: every image's crop to the buckets "
                         f"{[(b.height, b.width) for b in buckets]} exceeds max_crop_fraction {max_crop_fraction}")
    probs, category_probs = record_probabilities(catalog.categories, catalog.aesthetics, catalog.category_names,
                                                 sampling, eligible)
    local_mass = np.bincount(record_buckets[eligible], weights=probs[eligible], minlength=len(buckets))
    bucket_probs = np.asarray(host_mean(local_mass), np.float64)
    bucket_probs = bucket_probs / bucket_probs.sum()
    members, cdfs = [], []
    for bucket_index, bucket in enumerate(buckets):
        rows = np.flatnonzero((record_buckets == bucket_index) & (probs > 0))
        if bucket_probs[bucket_index] > 0 and rows.size == 0:
            raise ValueError(f"bucket {bucket.height}x{bucket.width} is drawn by other hosts but this host's "
                             f"shard has no record for it; use fewer hosts or a larger dataset")
        members.append(rows)
        cdfs.append(np.cumsum(probs[rows]))
    return StageTable(buckets, record_buckets, probs, category_probs, bucket_probs, tuple(members), tuple(cdfs))


class BucketSampler:
    """step -> bucket and record draws for one host, as described in the module docstring."""

    def __init__(self, curriculum: Curriculum, tables: tuple[StageTable, ...], seed: int, shard_index: int,
                 shard_count: int):
        for stage in curriculum.stages:
            if stage.batch_size % shard_count:
                raise ValueError(f"stage {stage.name or stage.start_step}: batch_size {stage.batch_size} is not "
                                 f"divisible by the {shard_count} hosts")
        self.curriculum = curriculum
        self.tables = tables
        self.seed = seed
        self.shard_index = shard_index
        self.shard_count = shard_count

    def host_batch_size(self, stage_index: int) -> int:
        return self.curriculum.stages[stage_index].batch_size // self.shard_count

    def bucket_at(self, step: int) -> tuple[int, int]:
        """(stage index, bucket index) of `step`; identical on every host."""
        stage_index = self.curriculum.stage_index(step)
        cdf = np.cumsum(self.tables[stage_index].bucket_probs)
        uniform = np.random.default_rng([self.seed, step, _BUCKET_STREAM]).random()
        return stage_index, min(int(np.searchsorted(cdf, uniform * cdf[-1], side="right")), len(cdf) - 1)

    def draw(self, step: int, stage_index: int, bucket_index: int, count: int, round_index: int = 0) -> np.ndarray:
        """`count` catalog rows of this host for `step` (whose `bucket_at` is given). int64 [count].

        Round 0 is the batch itself; later rounds replace records that failed to load.
        """
        table = self.tables[stage_index]
        members, cdf = table.members[bucket_index], table.cdfs[bucket_index]
        rng = np.random.default_rng([self.seed, step, _RECORD_STREAM, self.shard_index, round_index])
        positions = np.searchsorted(cdf, rng.random(count) * cdf[-1], side="right")
        return members[np.minimum(positions, len(members) - 1)]


class BatchPlans(grain.MapDataset):
    """MapDataset: step -> {"step", "stage", "bucket_index", "bucket": Bucket, "rows": int64 [host batch]}."""

    def __init__(self, sampler: BucketSampler):
        super().__init__()
        self.sampler = sampler

    def __len__(self) -> int:
        total = self.sampler.curriculum.total_steps
        return sys.maxsize if total is None else total

    def __getitem__(self, step):
        if isinstance(step, slice):
            return self.slice(step)
        stage_index, bucket_index = self.sampler.bucket_at(step)
        rows = self.sampler.draw(step, stage_index, bucket_index, self.sampler.host_batch_size(stage_index))
        return {"step": step, "stage": stage_index, "bucket_index": bucket_index,
                "bucket": self.sampler.tables[stage_index].buckets[bucket_index], "rows": rows}

    def __str__(self) -> str:
        return f"BatchPlans(stages={len(self.sampler.tables)}, shard={self.sampler.shard_index}/{self.sampler.shard_count})"
