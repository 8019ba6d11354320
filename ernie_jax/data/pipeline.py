"""The training input pipeline: source -> catalog -> bucketed category-weighted draws -> decoded batches.

    data = build_pipeline(source, PipelineConfig(curriculum), shard_index=jax.process_index(),
                          shard_count=jax.process_count())
    iterator = data.iterator()              # grain DatasetIterator; element k is the batch of step k
    batch = next(iterator)                  # see `LoadBatch` for the fields
    state = iterator.get_state()            # save with the checkpoint; iterator.set_state(state) resumes

Each host reads only its shard of the source (`catalog.shard_indices`) and yields its part of the
global batch (`stage.batch_size / shard_count` images), all hosts in the same bucket at every step.
Records that fail to load are replaced by further draws from the same bucket and counted: in the
batch (`num_skipped`, exact across restarts) and in `TrainingData.stats` (running totals by
exception type, for logging). With `PipelineConfig.caption_styles`, each record's caption is rewritten
into the prompt style its index draws (`prompt_styles.StyledSource`); the batch says which
(`caption_style`) and the stats count the styles delivered.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import grain
import numpy as np

from ernie_jax.data.buckets import resize_and_crop
from ernie_jax.data.catalog import Catalog, scan_catalog, shard_indices
from ernie_jax.data.categories import SamplingConfig
from ernie_jax.data.curriculum import Curriculum
from ernie_jax.data.prompt_styles import STYLES, StyleMix, styled
from ernie_jax.data.sampler import (
    BatchPlans,
    BucketSampler,
    StageTable,
    build_stage_table,
)
from ernie_jax.data.sources import decode_image, record_caption


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides which data a run sees.

    max_crop_fraction: images whose center crop to their closest bucket would remove more than
      this fraction of their area are left out of that stage. Inside the tables' aspect range
      the crop removes at most 13.6% (1 MP table; 14.2% for the 256/512 tables), so 0.25 only
      drops images beyond about 2.4:1.
    max_skips_per_batch: a batch needing more replacements than this raises, naming the last
      error, so a systematic failure (wrong field names, a broken decoder) is not mistaken for
      corrupt data.
    caption_styles: the prompt-style mix of SFT caption diversification (`prompt_styles.StyleMix`);
      None keeps every caption as it is.
    """

    curriculum: Curriculum
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    max_crop_fraction: float = 0.25
    seed: int = 0
    max_skips_per_batch: int = 256
    caption_styles: StyleMix | None = None

    def __post_init__(self):
        if not 0.0 <= self.max_crop_fraction < 1.0:
            raise ValueError(f"max_crop_fraction {self.max_crop_fraction} must be in [0, 1)")
        if self.seed < 0:
            raise ValueError(f"seed {self.seed} must be non-negative")


class DataStats:
    """Running counts since this pipeline object was built (thread-safe), for metric logs.

    scan_skipped: records the catalog scan could not read, by exception type. load_skipped: records
    that failed while loading batches, by exception type. dropped_for_crop: per stage, records the
    crop bound leaves out. category_counts: int64 [K] records delivered per category. style_counts:
    int64 [len(STYLES)] records delivered per prompt style (all "dense" without a style mix).
    Only batches made in this process are counted (not those of grain worker processes, nor those
    before a restore); the batch fields `num_skipped`, `category` and `caption_style` are exact in every case.
    """

    def __init__(self, catalog: Catalog, tables: tuple[StageTable, ...]):
        self._lock = threading.Lock()
        self.category_names = catalog.category_names
        self.scan_skipped = dict(catalog.unreadable)
        self.dropped_for_crop = tuple(table.num_dropped for table in tables)
        self.load_skipped = collections.Counter()
        self.category_counts = np.zeros(len(catalog.category_names), np.int64)
        self.style_counts = np.zeros(len(STYLES), np.int64)
        self.batches = 0

    def record_skip(self, error: BaseException) -> None:
        with self._lock:
            self.load_skipped[type(error).__name__] += 1

    def record_batch(self, categories: np.ndarray, styles: np.ndarray) -> None:
        with self._lock:
            self.batches += 1
            np.add.at(self.category_counts, categories, 1)
            np.add.at(self.style_counts, styles, 1)

    def category_summary(self) -> dict[str, int]:
        """Records delivered so far per category name (categories never drawn left out)."""
        with self._lock:
            return {name: int(count) for name, count in zip(self.category_names, self.category_counts) if count}

    def summary(self) -> dict[str, float]:
        """Flat scalars for a metrics writer."""
        with self._lock:
            metrics = {"data/batches": float(self.batches),
                       "data/skipped_at_scan": float(sum(self.scan_skipped.values())),
                       "data/skipped_at_load": float(sum(self.load_skipped.values()))}
            metrics.update({f"data/skipped_at_load/{name}": float(count) for name, count in self.load_skipped.items()})
            metrics.update({f"data/dropped_for_crop/stage{index}": float(count)
                            for index, count in enumerate(self.dropped_for_crop)})
            metrics.update({f"data/caption_style/{name}": float(count)
                            for name, count in zip(STYLES, self.style_counts) if count})
            return metrics


class LoadBatch(grain.transforms.Map):
    """Batch plan -> training batch of this host.

    The batch: `images` uint8 [B, h, w, 3] (one bucket), `captions` object [B] of str, `caption_style`
    int32 [B] (ids into `prompt_styles.STYLES`), `category` int32 [B] (ids into
    `TrainingData.category_names`), `aesthetic` float32 [B], `bucket` (h, w), `step`, `stage`,
    `num_skipped` (records replaced in this batch).

    Subclasses load other per-record data by overriding `_load` and `_collate` (precomputed.py).
    """

    def __init__(self, source, catalog: Catalog, sampler: BucketSampler, stats: DataStats, max_skips: int):
        self.source = source
        self.catalog = catalog
        self.sampler = sampler
        self.stats = stats
        self.max_skips = max_skips

    def _load(self, row: int, plan: dict) -> tuple[np.ndarray, dict]:
        """(the record's data for `_collate`, the record); raises if the record cannot be loaded."""
        record = self.source[int(self.catalog.indices[row])]
        return resize_and_crop(decode_image(record["image"]), plan["bucket"]), record

    def _collate(self, loaded: list) -> dict:
        """The batch arrays of the records' `_load` data."""
        return {"images": np.stack(loaded)}

    def map(self, plan: dict) -> dict:
        bucket, wanted = plan["bucket"], len(plan["rows"])
        loaded, captions, styles, rows = [], [], [], []
        candidates, round_index, skipped = plan["rows"], 0, 0
        while True:
            for row in candidates:
                try:
                    data, record = self._load(row, plan)
                    caption, style = record_caption(record), STYLES.index(record.get("caption_style", "dense"))
                except Exception as error:  # corrupt records are skipped, counted and replaced
                    skipped += 1
                    self.stats.record_skip(error)
                    if skipped > self.max_skips:
                        raise RuntimeError(f"step {plan['step']}: more than {self.max_skips} records failed to "
                                           f"load; last: source index {self.catalog.indices[row]}: {error!r}") from error
                    continue
                loaded.append(data)
                captions.append(caption)
                styles.append(style)
                rows.append(row)
            if len(loaded) == wanted:
                break
            round_index += 1
            candidates = self.sampler.draw(plan["step"], plan["stage"], plan["bucket_index"], wanted - len(loaded),
                                           round_index)
        rows = np.asarray(rows, np.int64)
        categories = self.catalog.categories[rows].astype(np.int32)
        styles = np.asarray(styles, np.int32)
        self.stats.record_batch(categories, styles)
        caption_array = np.empty(len(captions), object)
        caption_array[:] = captions
        return {**self._collate(loaded), "captions": caption_array, "caption_style": styles,
                "category": categories,
                "aesthetic": self.catalog.aesthetics[rows].astype(np.float32),
                "bucket": (bucket.height, bucket.width), "step": int(plan["step"]), "stage": plan["stage"],
                "num_skipped": skipped}


def mean_over_processes(values: np.ndarray) -> np.ndarray:
    """The mean of `values` over JAX processes (identity with one process); every process must call it."""
    import jax

    if jax.process_count() == 1:
        return np.asarray(values)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.float32))).mean(axis=0)


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """A built pipeline. `dataset[step]` is the batch of `step`; `iterator()` walks it from step 0."""

    dataset: grain.MapDataset
    catalog: Catalog
    tables: tuple[StageTable, ...]
    stats: DataStats

    @property
    def category_names(self) -> tuple[str, ...]:
        return self.catalog.category_names

    def iterator(self, read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
        """A checkpointable iterator; by default batches are made in the calling thread."""
        options = read_options or grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        return iter(self.dataset.to_iter_dataset(options))


def build_pipeline(source, config: PipelineConfig, *, shard_index: int | None = None, shard_count: int | None = None,
                   catalog: Catalog | None = None, category_names=None, host_mean=mean_over_processes) -> TrainingData:
    """Assemble the pipeline of one host.

    Args:
      source: random-access records (sources.py); with `config.caption_styles` it is read through a
        `prompt_styles.StyledSource`.
      config: the curriculum, sampling weights, crop bound, seed and caption styles.
      shard_index, shard_count: this host's shard; default `jax.process_index()`/`process_count()`.
      catalog: this shard's metadata from an earlier scan (`Catalog.save`/`load`), to skip the scan.
      category_names: fixed category ids (same list on every host); default: sorted names found.
      host_mean: averages a vector over hosts, so all hosts agree on the bucket probabilities.
    """
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    source = styled(source, config.caption_styles)
    if catalog is None:
        catalog = scan_catalog(source, shard_indices(len(source), shard_index, shard_count), category_names)
    else:
        catalog.check_shard(len(source), shard_index, shard_count)
    return assemble_pipeline(catalog, config, shard_index, shard_count, host_mean,
                             lambda sampler, stats: LoadBatch(source, catalog, sampler, stats,
                                                              config.max_skips_per_batch))


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """(shard_index, shard_count), both given or both None (then this JAX process's)."""
    if (shard_index is None) != (shard_count is None):
        raise ValueError(f"give both shard_index and shard_count or neither, got {shard_index}, {shard_count}")
    if shard_index is None:
        import jax

        return jax.process_index(), jax.process_count()
    return shard_index, shard_count


def assemble_pipeline(catalog: Catalog, config: PipelineConfig, shard_index: int, shard_count: int, host_mean,
                      make_loader) -> TrainingData:
    """The stage tables and sampler of `catalog`, and batch plans mapped by `make_loader(sampler, stats)`."""
    tables = tuple(build_stage_table(catalog, stage, config.sampling, config.max_crop_fraction, host_mean)
                   for stage in config.curriculum.stages)
    sampler = BucketSampler(config.curriculum, tables, config.seed, shard_index, shard_count)
    stats = DataStats(catalog, tables)
    dataset = BatchPlans(sampler).map(make_loader(sampler, stats))
    return TrainingData(dataset, catalog, tables, stats)
