"""Preference pairs for DPO: (caption, chosen image, rejected image, weight) read from a manifest, precomputed
to latents like the pre-training data (precompute.py), stored as a preference folder, and batched for the
DPO step.

    python -m ernie_jax.data.preferences --model PIPELINE_DIR --manifest MANIFEST --out OUT_DIR \\
        (--stage-side 256 | --buckets HxW,...) [--tie-weight W] [the other options of ernie_jax.data.precompute]

Manifest: a `.jsonl` or `.parquet` file, or a folder whose `*.jsonl` and `*.parquet` files are read in name
order, in the Pick-a-Pic layout: one record (a JSON object a line, or a Parquet row) with
  caption           str
  image_0, image_1  paths of the two images, relative to the manifest file's folder (or absolute); or
  jpg_0, jpg_1      the images' encoded bytes (any format PIL reads): base64 strings in JSONL, binary
                    columns in Parquet (Pick-a-Pic v2's own files, read as they are)
  label_0           1: image 0 preferred, 0: image 1 preferred, 0.5: a tie (Pick-a-Pic's label_1 = 1 - label_0
                    is not read)
A Parquet file may have both an image_k and a jpg_k column: a row's path where it has one, else its bytes.
Its other columns are not read, and its image bytes only when the pair is precomputed (a row group at a
time), so a manifest of a million pairs is not held in memory. Blank JSONL lines are skipped; any other malformed record
is an error naming the file and line (Parquet: row, counted from 1), raised before any compute. Images that
fail to decode are skipped and counted, as `precompute` does.

Ties: dropped unless `tie_weight` is given; then a tie becomes two pairs, image 0 over image 1 and image 1
over image 0, each of weight `tie_weight / 2` (other pairs weigh 1). A tie says neither image is better,
which one order alone would contradict. Both orders together give DPO's loss -log s(z) - log s(-z) of the
pair's implicit reward margin z, whose gradient (2 s(z) - 1) is zero where the policy separates the two
images exactly as the reference does (z = 0) and pulls z back there from either side: a kept tie anchors
the pair's margin instead of pushing it. Half the weight each keeps a tie's total weight at `tie_weight`.

Both images of a pair go to the bucket that image 0's aspect picks (so the two orders of a tie share their
latents' shape), are center-cropped and resized to it, and are encoded by the frozen VAE as
`precompute` encodes images; the caption's features are `precompute`'s. Pairs where either image's crop
exceeds the bound are skipped.

A preference folder has the precomputed layout (precomputed.py) with format "ernie_jax.preferences":
- records: `latents` float [2, C, h, w] (chosen, rejected; normalised packed latents), `text` [T, D]
  (T <= max_text_len), and header fields `source_index` (the pair's number), `caption`, `weight`,
  `category` (""), `aesthetic` (None), `image_size` (image 0's original [h, w]; the bucket for generated
  pairs), `bucket`, and `origin`: {"manifest", "line" (a Parquet file's row), "label_0", "chosen": 0 or 1}
  for a manifest pair, generated_pairs.py's fields for a generated one;
- index.npz: the precomputed index fields plus `pair_weight` float32;
- metadata.json: the precomputed fields (`source` names the manifest or the generating model), plus
  `pairs` (counts of what the manifest held).
`build_preference_pipeline` batches them as the DPO step reads them (`LoadPreferenceBatch`); its
bucket assignment and crop bound see image 0's original size, as the precomputation did.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import functools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from ernie_jax.data import precomputed
from ernie_jax.data.buckets import Bucket, assign_buckets, crop_fraction, resize_and_crop
from ernie_jax.data.catalog import shard_indices
from ernie_jax.data.pipeline import PipelineConfig, TrainingData, mean_over_processes
from ernie_jax.data.precompute import (
    CROP_SKIP,
    BatchEncoder,
    PrecomputeConfig,
    ShardWriter,
    add_precompute_arguments,
    encode_in_buckets,
    encoder_metadata,
    load_encoders,
    model_fingerprint,
    precompute_arguments,
)
from ernie_jax.data.precomputed import (
    METADATA_FILE,
    LoadPrecomputedBatch,
    PrecomputedSource,
    batch_text_features,
    build_precomputed_pipeline,
)
from ernie_jax.data.sources import decode_image

FORMAT = "ernie_jax.preferences"
FORMAT_VERSION = 1
INDEX_DTYPES = {**precomputed.INDEX_DTYPES, "pair_weight": np.float32}
LABELS = (1.0, 0.0, 0.5)  # label_0: image 0 preferred, image 1 preferred, a tie


@dataclasses.dataclass(frozen=True)
class ParquetCell:
    """An image's bytes in a Parquet manifest: `column` of row `row` (0-based) of `file`, read on demand."""

    file: str
    row: int
    column: str

    def read_bytes(self) -> bytes:
        starts = _row_group_starts(self.file)
        group = int(np.searchsorted(starts, self.row, side="right")) - 1
        value = _row_group_column(self.file, group, self.column)[self.row - int(starts[group])].as_py()
        if not isinstance(value, bytes):
            raise ValueError(f"{self.file}: row {self.row + 1}: {self.column} holds no image bytes ({value!r:.40})")
        return value


@functools.lru_cache(maxsize=64)
def _row_group_starts(file: str) -> np.ndarray:
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(file).metadata
    return np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])


# Pairs are precomputed in row order, so the row group being read is the one cached; a few are kept because
# a host's shard and the two image columns interleave.
@functools.lru_cache(maxsize=4)
def _row_group_column(file: str, group: int, column: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).read_row_group(group, columns=[column]).column(0)


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One pair of a manifest: `images` (image 0, image 1) as bytes, a file path or a `ParquetCell`,
    `chosen` the index of the preferred one, `weight` its weight in the loss, `label_0` the manifest's label,
    `file` and `line` (1-based; a Parquet file's row) where it stands."""

    caption: str
    images: tuple
    chosen: int
    weight: float
    label_0: float
    file: str
    line: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The pairs of a manifest in order, with what the tie policy did: `rows` records read, `ties_dropped`
    and `ties_kept` (each kept tie gives two pairs)."""

    path: str
    pairs: tuple[PreferencePair, ...]
    rows: int
    ties_dropped: int
    ties_kept: int


def _manifest_image(row: dict, number: int, folder: Path, where: str, cell: ParquetCell | None = None):
    """Image `number` of a record: a path, or the bytes (base64 in JSONL; in Parquet `cell`, the binary
    column's cell, given where that column holds a value)."""
    path, encoded = row.get(f"image_{number}"), cell or row.get(f"jpg_{number}")
    if (path is None) == (encoded is None):
        raise ValueError(f"{where}: give exactly one of image_{number} (a path) and jpg_{number} (the image's bytes)")
    if isinstance(encoded, ParquetCell):
        return encoded
    if encoded is not None:
        if not isinstance(encoded, str):
            raise ValueError(f"{where}: jpg_{number} must be a base64 string, got {type(encoded).__name__}")
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error as error:
            raise ValueError(f"{where}: jpg_{number} is not valid base64 ({error})") from None
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: image_{number} must be a path string, got {path!r}")
    resolved = folder / path
    if not resolved.is_file():
        raise ValueError(f"{where}: image_{number} {str(resolved)!r} is not a file")
    return resolved


def _record_pairs(row: dict, images, file: Path, line: int, where: str,
                  tie_weight: float | None) -> tuple[float, list[PreferencePair]]:
    """(label_0, the pairs of one manifest record); `images()` gives its two images once the record is valid."""
    caption, label = row.get("caption"), row.get("label_0")
    if not isinstance(caption, str):
        raise ValueError(f"{where}: caption must be a string, got {caption!r}")
    if isinstance(label, bool) or not isinstance(label, (int, float)) or float(label) not in LABELS:
        raise ValueError(f"{where}: label_0 must be 1 (image 0 preferred), 0 (image 1 preferred) or 0.5 (a tie), "
                         f"got {label!r}")
    images = images()
    label = float(label)
    if label != 0.5:
        return label, [PreferencePair(caption, images, 0 if label == 1.0 else 1, 1.0, label, str(file), line)]
    if tie_weight is None:
        return label, []
    return label, [PreferencePair(caption, images, chosen, tie_weight / 2, label, str(file), line)
                   for chosen in (0, 1)]


def _jsonl_records(file: Path, tie_weight: float | None):
    """(label_0, pairs) of each record of a JSONL manifest file."""
    with open(file, encoding="utf-8") as lines:
        for line, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            where = f"{file}:{line}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not a JSON object ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield _record_pairs(row, lambda row=row, where=where: tuple(
                _manifest_image(row, number, file.parent, where) for number in (0, 1)), file, line, where, tie_weight)


def _parquet_records(file: Path, tie_weight: float | None):
    """(label_0, pairs) of each row of a Parquet manifest file; its image bytes stay in the file."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file)
    names = set(parquet.schema_arrow.names)
    for needed in ("caption", "label_0"):
        if needed not in names:
            raise ValueError(f"{file}: no {needed!r} column (columns: {sorted(names)})")
    for number in (0, 1):
        if f"image_{number}" not in names and f"jpg_{number}" not in names:
            raise ValueError(f"{file}: no image_{number} (paths) or jpg_{number} (bytes) column")
    paths = [name for name in ("image_0", "image_1") if name in names]
    row_number = 0
    for batch in parquet.iter_batches(columns=["caption", "label_0", *paths]):
        for row in batch.to_pylist():
            line, where = row_number + 1, f"{file}: row {row_number + 1}"
            # A row's path where it has one, else its bytes (not read here: a null cell is an unreadable image).
            cells = {number: ParquetCell(str(file), row_number, f"jpg_{number}")
                     if row.get(f"image_{number}") is None and f"jpg_{number}" in names else None for number in (0, 1)}
            yield _record_pairs(row, lambda row=row, where=where, cells=cells: tuple(
                _manifest_image(row, number, file.parent, where, cells[number]) for number in (0, 1)),
                file, line, where, tie_weight)
            row_number += 1


def manifest_files(path: str | os.PathLike) -> list[Path]:
    """The files of a manifest: the `.jsonl` or `.parquet` file itself, or a folder's `*.jsonl` and
    `*.parquet` files in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(file for file in path.iterdir() if file.suffix in MANIFEST_READERS)
        if not files:
            raise ValueError(f"{path}: no *.jsonl or *.parquet manifest file in the folder")
        return files
    if not path.is_file():
        raise ValueError(f"{path}: no such manifest file or folder")
    if path.suffix not in MANIFEST_READERS:
        raise ValueError(f"{path}: a manifest file is .jsonl or .parquet")
    return [path]


def read_manifest(path: str | os.PathLike, *, tie_weight: float | None = None) -> Manifest:
    """The preference pairs of a manifest (module docstring); ties dropped, or kept as two pairs of weight
    `tie_weight / 2` each. Raises ValueError naming the file and line of the first malformed record."""
    if tie_weight is not None and not (math.isfinite(tie_weight) and tie_weight > 0):
        raise ValueError(f"tie_weight must be positive and finite (or None to drop ties), got {tie_weight}")
    pairs, rows, ties = [], 0, 0
    for file in manifest_files(path):
        for label, made in MANIFEST_READERS[file.suffix](file, tie_weight):
            rows += 1
            ties += label == 0.5
            pairs.extend(made)
    if not pairs:
        raise ValueError(f"{path}: no preference pair ({rows} records, {ties} of them ties"
                         f"{', dropped' if tie_weight is None else ''})")
    return Manifest(str(path), tuple(pairs), rows, ties if tie_weight is None else 0,
                    0 if tie_weight is None else ties)


MANIFEST_READERS = {".jsonl": _jsonl_records, ".parquet": _parquet_records}


class PreferenceWriter(ShardWriter):
    """Pairs into a preference folder's record files and index (module docstring)."""

    def __init__(self, folder: Path, shard_size: int):
        super().__init__(folder, shard_size, INDEX_DTYPES)

    def write_pair(self, source_index: int, caption: str, weight: float, image_size, bucket: Bucket,
                   chosen: np.ndarray, rejected: np.ndarray, text: np.ndarray, origin: dict) -> None:
        """One pair: `chosen` and `rejected` latents [C, h, w] and `text` [T, D] in one storage dtype."""
        header = {"source_index": source_index, "caption": caption, "weight": weight, "category": "",
                  "aesthetic": None, "image_size": list(image_size), "bucket": [bucket.height, bucket.width],
                  "origin": origin}
        row = {"source_index": source_index, "image_height": image_size[0], "image_width": image_size[1],
               "bucket_height": bucket.height, "bucket_width": bucket.width, "text_length": text.shape[0],
               "aesthetic": math.nan, "category": "", "pair_weight": weight}
        self.write(header, row, np.stack([chosen, rejected]), text)


def write_metadata(folder: Path, writer: PreferenceWriter, encoder: BatchEncoder, *, model: str,
                   model_fingerprint: str, **fields) -> dict:
    """Closes `writer` and writes the folder's metadata.json (format, `encoder_metadata` with `fields` added
    or replacing its entries, the record count and files); returns it."""
    writer.close()
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                **encoder_metadata(encoder, model=model, model_fingerprint=model_fingerprint),
                **fields, "records": writer.records, "files": writer.files}
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata


def _refuse_caption_styles(config: PrecomputeConfig | PipelineConfig) -> None:
    """Preference pairs keep the captions their images were judged against: a config with a caption style
    mix is an error."""
    if config.caption_styles is not None:
        raise ValueError(f"preference pairs keep the captions their images were judged against; "
                         f"config.caption_styles must be None, got {config.caption_styles}")


@dataclasses.dataclass
class _PendingPair:
    source_index: int
    pair: PreferencePair
    chosen: np.ndarray
    rejected: np.ndarray
    image_size: tuple[int, int]
    bucket_index: int


def _prepare_pair(pairs: tuple[PreferencePair, ...], buckets: tuple[Bucket, ...], max_crop_fraction: float,
                  index: int) -> _PendingPair | str:
    """Both images of pair `index` cropped to image 0's bucket; or why the pair is skipped (see precompute's
    `_prepare`)."""
    pair = pairs[index]
    try:
        images = [decode_image(image if isinstance(image, bytes) else image.read_bytes()) for image in pair.images]
    except Exception as error:  # noqa: BLE001 - any unreadable image is skipped and counted
        return type(error).__name__
    heights, widths = [image.shape[0] for image in images], [image.shape[1] for image in images]
    bucket_index = int(assign_buckets(heights[:1], widths[:1], buckets)[0])
    bucket = buckets[bucket_index]
    if (crop_fraction(heights, widths, [bucket.height] * 2, [bucket.width] * 2) > max_crop_fraction).any():
        return CROP_SKIP
    cropped = [resize_and_crop(image, bucket) for image in images]
    return _PendingPair(index, pair, cropped[pair.chosen], cropped[1 - pair.chosen], images[0].shape[:2],
                        bucket_index)


def precompute_preferences(encoders, manifest: Manifest, out_dir: str | os.PathLike, config: PrecomputeConfig, *,
                           shard_index: int = 0, shard_count: int = 1, model_fingerprint: str = "", model: str = "",
                           progress: bool = True) -> dict:
    """Precomputes shard `shard_index` of `shard_count` of the manifest's pairs (`catalog.shard_indices`
    over pair numbers) into the preference folder `out_dir`, written atomically; returns its metadata."""
    from conversions.common import atomic_directory

    _refuse_caption_styles(config)
    indices = shard_indices(len(manifest.pairs), shard_index, shard_count)
    if not indices.size:
        raise ValueError(f"{manifest.path}: no pair in shard {shard_index} of {shard_count}")
    encoder = BatchEncoder(encoders, config)
    truncated = 0
    with atomic_directory(out_dir) as staging:
        writer = PreferenceWriter(staging, config.shard_size)

        def flush(bucket_index: int, items: list[_PendingPair]) -> None:
            nonlocal truncated
            chosen = encoder.latents([item.chosen for item in items])
            rejected = encoder.latents([item.rejected for item in items])
            texts = encoder.text([item.pair.caption for item in items])
            for item, item_chosen, item_rejected, text in zip(items, chosen, rejected, texts):
                truncated += text.shape[0] > config.max_text_len
                pair = item.pair
                writer.write_pair(item.source_index, pair.caption, pair.weight, item.image_size,
                                  config.buckets[bucket_index], item_chosen, item_rejected,
                                  text[: config.max_text_len],
                                  {"manifest": pair.file, "line": pair.line, "label_0": pair.label_0,
                                   "chosen": pair.chosen})

        prepare = functools.partial(_prepare_pair, manifest.pairs, config.buckets, config.max_crop_fraction)
        unreadable, dropped_for_crop = encode_in_buckets(
            prepare, indices, config, flush, f"preferences shard {shard_index}/{shard_count}", progress)
        if not writer.records:
            raise ValueError(f"no pair of {manifest.path} (shard {shard_index} of {shard_count}) could be "
                             f"precomputed: {dict(unreadable)} unreadable, {dropped_for_crop} beyond the crop bound")
        metadata = write_metadata(
            staging, writer, encoder, model=model, model_fingerprint=model_fingerprint, source=manifest.path,
            source_records=len(manifest.pairs), shard_index=shard_index, shard_count=shard_count,
            skipped={"unreadable": dict(unreadable), "crop": dropped_for_crop}, truncated_texts=truncated,
            pairs={"manifest_rows": manifest.rows, "ties_dropped": manifest.ties_dropped,
                   "ties_kept": manifest.ties_kept})
    return metadata


class PreferenceSource(PrecomputedSource):
    """A preference folder, or the folders of all its shards, as one source (`PrecomputedSource` of the
    preference format): `source[position]` -> the record dict, `latents` [2, C, h, w] (chosen, rejected)."""

    format_name = FORMAT
    format_version = FORMAT_VERSION
    index_fields = tuple(INDEX_DTYPES)


class LoadPreferenceBatch(LoadPrecomputedBatch):
    """Batch plan -> DPO batch of preference records.

    The batch: `latents_chosen`, `latents_rejected` float32 [B, C, h/16, w/16] (normalised packed latents),
    `text_bth` float32 [B, T, D] zero-padded to T = `text_multiple` (the folder's max_text_len: one shape
    for every step), `text_lens` int32 [B], `pair_weights` float32 [B], and `LoadBatch`'s `captions`,
    `caption_style` (every one "dense"), `category`, `aesthetic`, `bucket`, `step`, `stage`, `num_skipped`.
    """

    def _load(self, row: int, plan: dict) -> tuple[tuple, dict]:
        record = self.stage_sources[plan["stage"]].record_of(int(self.catalog.indices[row]))
        return (record["latents"], record["text"], record["weight"]), record

    def _collate(self, loaded: list) -> dict:
        latents = np.stack([latents for latents, _, _ in loaded]).astype(np.float32)
        text, lengths = batch_text_features([text for _, text, _ in loaded], self.text_multiple)
        return {"latents_chosen": latents[:, 0], "latents_rejected": latents[:, 1], "text_bth": text,
                "text_lens": lengths, "pair_weights": np.array([weight for _, _, weight in loaded], np.float32)}


def build_preference_pipeline(sources, config: PipelineConfig, *, shard_index: int | None = None,
                              shard_count: int | None = None, host_mean=mean_over_processes) -> TrainingData:
    """The DPO input pipeline over preference folders (`PreferenceSource`s: one per bucket set the
    curriculum uses): `pipeline.build_pipeline`'s draws, step k's batch a pure function of (seed, k, shard),
    so the grain iterator's state is its position and a resumed run sees the same pairs; each host reads
    its shard of the pairs and yields `stage.batch_size / shard_count` of them. Batches as
    `LoadPreferenceBatch`. Pairs are drawn uniformly (no categories, no scores): the loss weighs them.
    Captions are not restyled (`config.caption_styles` must be None)."""
    sources = (sources,) if isinstance(sources, PrecomputedSource) else tuple(sources)
    if not sources or not all(isinstance(source, PreferenceSource) for source in sources):
        raise ValueError(f"build_preference_pipeline needs PreferenceSources, got {sources!r}")
    _refuse_caption_styles(config)
    lengths = {source.metadata["max_text_len"] for source in sources}
    if len(lengths) != 1:
        raise ValueError(f"the preference sources cut their texts to different lengths {sorted(lengths)}")
    return build_precomputed_pipeline(sources, config, shard_index=shard_index, shard_count=shard_count,
                                      host_mean=host_mean, text_multiple=lengths.pop(),
                                      load_batch=LoadPreferenceBatch)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ernie_jax.data.preferences",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True,
                        help="a .jsonl or .parquet manifest (Pick-a-Pic's own files), or a folder of them")
    parser.add_argument("--tie-weight", type=float,
                        help="keep ties as both orders, each with half this weight (default: drop ties)")
    add_precompute_arguments(parser)
    args = parser.parse_args(argv)
    config = precompute_arguments(args)
    manifest = read_manifest(args.manifest, tie_weight=args.tie_weight)
    encoders = load_encoders(args.model, args.dtype)
    metadata = precompute_preferences(encoders, manifest, args.out, config, shard_index=args.shard_index,
                                      shard_count=args.shard_count, model_fingerprint=model_fingerprint(args.model),
                                      model=str(Path(args.model).resolve()))
    print(f"wrote {args.out}: {metadata['records']} pairs from {manifest.rows} manifest records "
          f"({manifest.ties_dropped} ties dropped, {manifest.ties_kept} kept as two pairs), "
          f"skipped {metadata['skipped']}")


if __name__ == "__main__":
    from conversions.common import run_command

    sys.exit(run_command(main))
