"""Precomputed training records (VAE latents and text-encoder features, written by `precompute.py`) and
the pipeline that batches them with the image pipeline's sampling.

A precomputed folder holds one stage side's records of one shard of a source:

- `records-NNNNN.array_record`: the records (`encode_record`), in the order they were encoded;
- `index.npz`: one row per record in the same order: `source_index` int64, `image_height`,
  `image_width` (the original image), `bucket_height`, `bucket_width`, `text_length` int32,
  `aesthetic` float32 (NaN where missing), `category` str;
- `metadata.json`: how the records were made (model fingerprint, buckets, crop bound, dtype, text
  truncation, the caption style mix `caption_styles` or null), the counts and skipped records, the
  files, and the empty prompt's text features (`empty_prompt.features` [T_e, D], for text dropout).

The catalog of precomputed records holds their original image sizes, so bucket assignment, the crop
bound and the draws are those of the image pipeline for the same records and seed
(`build_precomputed_pipeline`). Two kinds of records of the image catalog are not in it: images whose body
fails to decode (the image pipeline draws and replaces them), and images beyond the crop bound at
every precomputed stage (never drawn; they only enter the mean score that records without a score
get, which is therefore taken over the precomputed records here).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import grain
import ml_dtypes
import numpy as np

from ernie_jax.data.buckets import as_buckets
from ernie_jax.data.catalog import Catalog, catalog_from_rows
from ernie_jax.data.pipeline import (
    LoadBatch,
    PipelineConfig,
    TrainingData,
    assemble_pipeline,
    mean_over_processes,
    resolve_shard,
)

FORMAT = "ernie_jax.precomputed"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
INDEX_FILE = "index.npz"
STORAGE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
INDEX_DTYPES = {"source_index": np.int64, "image_height": np.int32, "image_width": np.int32,
                "bucket_height": np.int32, "bucket_width": np.int32, "text_length": np.int32,
                "aesthetic": np.float32, "category": str}
INDEX_FIELDS = tuple(INDEX_DTYPES)
# Metadata every folder of one PrecomputedSource must share.
SHARED_METADATA = ("format_version", "model_fingerprint", "stage_side", "buckets", "max_crop_fraction", "dtype",
                   "latent_channels", "text_dim", "max_text_len", "source_records", "shard_count", "empty_prompt",
                   "caption_styles")
_HEADER_LENGTH = struct.Struct("<I")


class MissingRecordError(LookupError):
    """A source index has no record in a precomputed source (its image failed to decode there)."""


def encode_record(header: dict, latents: np.ndarray, text: np.ndarray) -> bytes:
    """One stored record: a little-endian uint32 header length, the header (UTF-8 JSON: `header`'s fields,
    the arrays' dtype and shapes), then the bytes of `latents` ([C, h, w]; [2, C, h, w] for a preference
    pair, preferences.py) and `text` [T, D] (same dtype)."""
    if latents.dtype != text.dtype or latents.dtype.name not in STORAGE_DTYPES:
        raise ValueError(f"latents ({latents.dtype}) and text ({text.dtype}) must share one of {list(STORAGE_DTYPES)}")
    header = {**header, "dtype": latents.dtype.name, "latents_shape": list(latents.shape),
              "text_shape": list(text.shape)}
    encoded = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return b"".join((_HEADER_LENGTH.pack(len(encoded)), encoded, np.ascontiguousarray(latents).tobytes(),
                     np.ascontiguousarray(text).tobytes()))


def decode_record(data: bytes) -> dict:
    """`encode_record`'s bytes -> the header's fields plus `latents` [C, h, w] and `text` [T, D] (stored dtype).

    Fields: `source_index`, `caption`, `category` (str), `aesthetic` (float or None), `image_size` and
    `bucket` ([height, width]), `caption_style` (the `prompt_styles.STYLES` name of `caption`; absent
    from records written before style mixes)."""
    (length,) = _HEADER_LENGTH.unpack_from(data)
    offset = _HEADER_LENGTH.size + length
    header = json.loads(data[_HEADER_LENGTH.size:offset].decode("utf-8"))
    dtype = STORAGE_DTYPES[header.pop("dtype")]
    arrays = {}
    for name in ("latents", "text"):
        shape = header.pop(f"{name}_shape")
        arrays[name] = np.frombuffer(data, dtype, math.prod(shape), offset).reshape(shape)
        offset += arrays[name].nbytes
    if offset != len(data):
        raise ValueError(f"record of source index {header.get('source_index')}: {len(data) - offset} bytes past "
                         f"its arrays")
    return {**header, **arrays}


def read_metadata(folder: str | os.PathLike, format_name: str = FORMAT, format_version: int = FORMAT_VERSION) -> dict:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise ValueError(f"{folder}: no {METADATA_FILE} (not a precomputed folder)")
    metadata = json.loads(path.read_text("utf-8"))
    if metadata.get("format") != format_name or metadata.get("format_version") != format_version:
        raise ValueError(f"{folder}: format {metadata.get('format')!r} version {metadata.get('format_version')}, "
                         f"expected {format_name!r} version {format_version}")
    return metadata


class PrecomputedSource:
    """One stage side's precomputed records: the folder `precompute` wrote, or the folders of all its
    shards (one per host), read as one random-access source: `source[position]` -> `decode_record` dict,
    positions in folder order then write order. `index` holds the `index_fields` arrays by position.

    Subclasses read other record formats of the same layout by setting the class attributes (preferences.py).
    """

    format_name = FORMAT
    format_version = FORMAT_VERSION
    index_fields = INDEX_FIELDS
    shared_metadata = SHARED_METADATA

    def __init__(self, folders):
        folders = [Path(folders)] if isinstance(folders, (str, os.PathLike)) else [Path(f) for f in folders]
        if not folders:
            raise ValueError("PrecomputedSource needs at least one folder")
        parts = [read_metadata(folder, self.format_name, self.format_version) for folder in folders]
        for folder, metadata in zip(folders[1:], parts[1:], strict=True):
            for key in self.shared_metadata:
                if metadata.get(key) != parts[0].get(key):
                    raise ValueError(f"{folder}: {key} differs from that of {folders[0]}; the folders are not "
                                     f"shards of one precomputation")
        shards = sorted(metadata["shard_index"] for metadata in parts)
        if shards != list(range(parts[0]["shard_count"])):
            raise ValueError(f"the folders hold shards {shards} of {parts[0]['shard_count']}; each shard is needed "
                             f"exactly once")
        self.folders = tuple(folders)
        # Folders without caption_styles (written before style mixes; preference folders, whose captions are
        # the ones their images were judged against) read as None: no mix.
        self.metadata = {key: parts[0].get(key) for key in self.shared_metadata}
        self.buckets = as_buckets(self.metadata["buckets"])
        indexes = []
        for folder in folders:
            with np.load(folder / INDEX_FILE) as index:
                indexes.append({name: index[name] for name in self.index_fields})
        self.index = {name: np.concatenate([index[name] for index in indexes]) for name in self.index_fields}
        files = [str(folder / file["name"]) for folder, metadata in zip(folders, parts, strict=True)
                 for file in metadata["files"]]
        if not files:
            raise ValueError(f"{', '.join(map(str, folders))}: no precomputed records")
        self.records = grain.sources.ArrayRecordDataSource(files)
        if len(self.records) != len(self.index["source_index"]):
            raise ValueError(f"{', '.join(map(str, folders))}: {len(self.records)} records but "
                             f"{len(self.index['source_index'])} index rows")
        # Sorted source indices and their positions: 16 bytes a record where a dict would take ~100.
        self._positions = np.argsort(self.index["source_index"], kind="stable")
        self._sorted_indices = self.index["source_index"][self._positions]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict:
        return decode_record(self.records[position])

    def record_of(self, source_index: int) -> dict:
        """The record made from `source_index` of the original source."""
        slot = int(np.searchsorted(self._sorted_indices, source_index))
        if slot == len(self._sorted_indices) or self._sorted_indices[slot] != source_index:
            raise MissingRecordError(f"source index {source_index} has no record in {self!r}")
        return self[int(self._positions[slot])]

    def batch_loader(self) -> type[LoadPrecomputedBatch]:
        """The `LoadPrecomputedBatch` class that `build_precomputed_pipeline` batches this source's records with
        by default (a subclass for another record format, e.g. ode_pairs.py's)."""
        return LoadPrecomputedBatch

    @property
    def empty_prompt(self) -> np.ndarray:
        """The text encoder's features of the empty prompt, float32 [T_e, D] (the training step's
        `EmptyPrompt(features, len(features))`)."""
        return np.asarray(self.metadata["empty_prompt"]["features"], np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({[str(folder) for folder in self.folders]!r}, {len(self)} records)"


def precomputed_catalog(sources, shard_index: int, shard_count: int, category_names=None) -> Catalog:
    """The catalog of shard `shard_index` (source indices as `catalog.shard_indices`) over the records of
    `sources` (stage sides of one source): every source index present in any of them, with its original
    image size, category and score."""
    sources = tuple(sources)
    totals = {source.metadata["source_records"] for source in sources}
    if len(totals) != 1:
        raise ValueError(f"the precomputed sources were made from sources of different sizes {sorted(totals)}")
    fields = {name: np.concatenate([source.index[name] for source in sources])
              for name in ("source_index", "image_height", "image_width", "category", "aesthetic")}
    mine = np.flatnonzero(fields["source_index"] % shard_count == shard_index)
    indices, first = np.unique(fields["source_index"][mine], return_index=True)
    if not indices.size:
        raise ValueError(f"no precomputed record in shard {shard_index} of {shard_count} of {sources!r}")
    rows = mine[first]
    return catalog_from_rows(indices, fields["image_height"][rows], fields["image_width"][rows],
                             [str(name) for name in fields["category"][rows]], fields["aesthetic"][rows], {},
                             category_names, description=repr(sources))


def batch_text_features(features, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Text features `[T_i, D]` (each T_i <= length) -> float32 `[B, length, D]` zero-padded, and the
    lengths int32 `[B]`: the training step's `text` and `text_lens`."""
    lengths = np.array([f.shape[0] for f in features], np.int32)
    text = np.zeros((len(features), length, features[0].shape[-1]), np.float32)
    for padded, f in zip(text, features, strict=True):
        padded[: f.shape[0]] = f
    return text, lengths


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class LoadPrecomputedBatch(LoadBatch):
    """Batch plan -> training batch of precomputed records.

    The batch: `latents` float32 [B, C, h/16, w/16] (normalised packed latents), `text` float32 [B, T, D]
    zero-padded to T = the longest text rounded up to `text_multiple` (bounding the shapes the training
    step compiles for), `text_lens` int32 [B], and `LoadBatch`'s `captions`, `caption_style`, `category`,
    `aesthetic`, `bucket`, `step`, `stage`, `num_skipped`.
    """

    def __init__(self, stage_sources: tuple[PrecomputedSource, ...], catalog: Catalog, sampler, stats,
                 max_skips: int, text_multiple: int):
        super().__init__(None, catalog, sampler, stats, max_skips)
        self.stage_sources = stage_sources
        self.text_multiple = text_multiple

    def _load(self, row: int, plan: dict) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
        record = self.stage_sources[plan["stage"]].record_of(int(self.catalog.indices[row]))
        return (record["latents"], record["text"]), record

    def _collate(self, loaded: list) -> dict:
        features = [text for _, text in loaded]
        longest = max(f.shape[0] for f in features)
        text, lengths = batch_text_features(features, _round_up(longest, self.text_multiple))
        return {"latents": np.stack([latents for latents, _ in loaded]).astype(np.float32), "text": text,
                "text_lens": lengths}


def build_precomputed_pipeline(sources, config: PipelineConfig, *, shard_index: int | None = None,
                               shard_count: int | None = None, category_names=None,
                               host_mean=mean_over_processes, text_multiple: int = 64,
                               load_batch=None) -> TrainingData:
    """`pipeline.build_pipeline` over precomputed records (batches as `load_batch`, a `LoadPrecomputedBatch`
    class; None: the sources' `batch_loader()`, which must agree).

    `sources`: a PrecomputedSource or several (stage sides of one source); each curriculum stage reads
    the one whose bucket set is the stage's. Records are drawn exactly as the image pipeline draws the
    source's images with the same config; a record missing from a stage's source (its image failed to
    decode) is skipped and replaced as a corrupt image is. The sources' caption style mix must be
    `config.caption_styles` (the stored text features are of the captions it chose).
    """
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    if text_multiple < 1:
        raise ValueError(f"text_multiple {text_multiple} must be positive")
    sources = (sources,) if isinstance(sources, PrecomputedSource) else tuple(sources)
    stage_sources = []
    for number, stage in enumerate(config.curriculum.stages):
        matching = [source for source in sources if set(source.buckets) == set(stage.buckets)]
        if not matching:
            raise ValueError(f"stage {stage.name or number}: no precomputed source has its buckets "
                             f"{[(b.height, b.width) for b in stage.buckets]}")
        # A bound of None: the records were not cropped (generated pairs), so every bound keeps them all.
        bound = matching[0].metadata["max_crop_fraction"]
        if bound is not None and config.max_crop_fraction > bound:
            raise ValueError(f"max_crop_fraction {config.max_crop_fraction} exceeds the bound "
                             f"{matching[0].metadata['max_crop_fraction']} of {matching[0]!r}: records it keeps "
                             f"were not precomputed")
        stage_sources.append(matching[0])
    used = tuple(dict.fromkeys(stage_sources))
    if load_batch is None:
        loaders = {source.batch_loader() for source in used}
        if len(loaders) != 1:
            raise ValueError(f"the stages' sources batch their records differently "
                             f"({sorted(loader.__name__ for loader in loaders)})")
        load_batch = loaders.pop()
    wanted_styles = None if config.caption_styles is None else config.caption_styles.to_dict()
    for source in used:
        if source.metadata["caption_styles"] != wanted_styles:
            raise ValueError(f"{source!r} was precomputed with caption style mix {source.metadata['caption_styles']}, "
                             f"but config.caption_styles is {wanted_styles}: precompute again with that mix")
    for key in ("model_fingerprint", "empty_prompt"):
        if any(source.metadata[key] != used[0].metadata[key] for source in used):
            raise ValueError(f"the stages' precomputed sources differ in {key}: they were made with different models")
    catalog = precomputed_catalog(used, shard_index, shard_count, category_names)
    return assemble_pipeline(catalog, config, shard_index, shard_count, host_mean,
                             lambda sampler, stats: load_batch(tuple(stage_sources), catalog, sampler, stats,
                                                               config.max_skips_per_batch, text_multiple))
