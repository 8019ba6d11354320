"""Offline: VAE latents and text-encoder features of a record source, for one stage's buckets, as
ArrayRecord shards, so that training does not run the frozen encoders every step.

    python -m ernie_jax.data.precompute --model PIPELINE_DIR --source SOURCE --stage-side 256 --out OUT_DIR \\
        [--max-text-len 256] [--batch-size 16] [--shard-size 4096] [--dtype float32|bfloat16] \\
        [--max-crop-fraction 0.25] [--buckets HxW,HxW,...] [--workers 8] [--shard-index I --shard-count N] \\
        [--caption-styles '{"keep_dense": 0.25, "rewriter": "rules"}']

SOURCE is an image folder (`sources.FolderSource`) or a tfds dataset folder (`sources.TfdsSource`). Each
host precomputes its shard (`catalog.shard_indices`) into its own OUT_DIR; `precomputed.PrecomputedSource`
reads the shards' folders together. The layout is described in `precomputed.py`.

Per record: the image gets its stage bucket as the image pipeline assigns it (records whose crop would
exceed the bound are skipped, as the pipeline leaves them out), is center-cropped and resized to it, and
encoded by `vae.encode_to_packed_latents`: the posterior mean (no sampling, as diffusers' FLUX.2 training
script's `latent_dist.mode()`), 2x2-patchified and normalised with the VAE's BatchNorm statistics, eps
1e-5 (the ERNIE pipeline's decode direction) -> [128, h/16, w/16]. The caption's features are the
pipeline's `encode_prompt` (hidden_states[-2]), cut to `max_text_len` tokens: the text encoder is causal,
so this equals encoding the truncated tokens. Images are encoded in batches of one bucket and captions
with them; every batch is padded to `batch_size`, so the VAE compiles once per bucket and the text
encoder once per 64-token length bucket. Records that cannot be read or decoded are skipped and counted.
With a caption style mix (`--caption-styles`, the JSON fields of `prompt_styles.StyleMix`), each record's
caption is first rewritten into the style its index draws, as the training pipeline with the same mix
rewrites it; the metadata records the mix and training checks it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from ernie_jax.data.buckets import (
    Bucket,
    as_buckets,
    assign_buckets,
    crop_fraction,
    resize_and_crop,
    stage_buckets,
)
from ernie_jax.data.catalog import shard_indices
from ernie_jax.data.precomputed import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_DTYPES,
    INDEX_FILE,
    METADATA_FILE,
    STORAGE_DTYPES,
    encode_record,
)
from ernie_jax.data.prompt_styles import StyleMix, styled
from ernie_jax.data.scored import ScoredSource, is_scored_folder
from ernie_jax.data.sources import (
    FolderSource,
    TfdsSource,
    decode_image,
    record_aesthetic,
    record_caption,
    record_category,
)
from ernie_jax.models import vae as vae_lib

# Components the fingerprint covers: what the stored features depend on.
ENCODER_COMPONENTS = ("vae", "text_encoder", "tokenizer")
# Configs and tokenizer files are hashed whole (up to FINGERPRINT_TEXT_BYTES), other files up to
# FINGERPRINT_CONTENT_BYTES too. A larger one (weights, in any layout) is hashed by its head (a safetensors
# file's whole header) and FINGERPRINT_SAMPLES blocks spread evenly over the rest: a multi-GB weight file
# costs its header plus 256 KiB of reads.
FINGERPRINT_TEXT_SUFFIXES = (".json", ".txt", ".model", ".jinja")
FINGERPRINT_TEXT_BYTES = 1 << 26
FINGERPRINT_CONTENT_BYTES = 1 << 20
FINGERPRINT_HEAD_BYTES = 1 << 16
FINGERPRINT_SAMPLES = 64
FINGERPRINT_SAMPLE_BYTES = 1 << 12
SAFETENSORS_MAX_HEADER_BYTES = 100 << 20  # the format's own bound
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: cheap random access
CROP_SKIP = "beyond the crop bound"
PREPARE_WINDOW_PER_WORKER = 8  # records decoded ahead per thread; bounds the memory of cropped images


@dataclasses.dataclass(frozen=True)
class PrecomputeConfig:
    """What a precomputation stores.

    buckets: the stage's bucket set (`buckets.stage_buckets(stage_side)` for a released-aspect stage).
    stage_side: recorded in the metadata (None for a custom bucket set).
    max_crop_fraction: records whose crop to their bucket removes more are skipped (the pipeline's bound).
    max_text_len: text features are cut to this many tokens.
    batch_size: images (and captions) per encoder call. shard_size: records per ArrayRecord file.
    dtype: storage dtype of latents and features, "float32" or "bfloat16".
    workers: threads reading and decoding records.
    caption_styles: the prompt-style mix whose captions are encoded (`prompt_styles.StyleMix`, the
      training `PipelineConfig.caption_styles`); None encodes the captions as they are. Only image
      records are restyled: preference pairs keep the captions their images were judged against.
    """

    buckets: tuple
    stage_side: int | None = None
    max_crop_fraction: float = 0.25
    max_text_len: int = 256
    batch_size: int = 16
    shard_size: int = 4096
    dtype: str = "float32"
    workers: int = 8
    caption_styles: StyleMix | None = None

    def __post_init__(self):
        object.__setattr__(self, "buckets", as_buckets(self.buckets))
        if not 0.0 <= self.max_crop_fraction < 1.0:
            raise ValueError(f"max_crop_fraction {self.max_crop_fraction} must be in [0, 1)")
        for name in ("max_text_len", "batch_size", "shard_size", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {list(STORAGE_DTYPES)}")


def vae_input(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1], as diffusers' VaeImageProcessor (x / 255 * 2 - 1)."""
    return (images.astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(0, 3, 1, 2)


@functools.partial(jax.jit, static_argnums=(0,))
def encode_images(graphdef, state, images):
    """`vae_input` images `[B, 3, H, W]` -> normalised packed latents `[B, C, H/f, W/f]` of the VAE
    `nnx.merge(graphdef, state)`; compiled once per VAE and batch shape."""
    return vae_lib.encode_to_packed_latents(nnx.merge(graphdef, state), images)


class BatchEncoder:
    """Runs the frozen encoders of `encoders` (an ErnieImagePipeline; its transformer may be None) on
    batches padded to `config.batch_size`; results are numpy arrays in the storage dtype."""

    def __init__(self, encoders, config: PrecomputeConfig):
        self.encoders = encoders
        self.config = config
        self.dtype = STORAGE_DTYPES[config.dtype]
        self._vae_graphdef, self._vae_state = nnx.split(encoders.vae)

    def latents(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 images [h, w, 3] of one bucket -> packed latents [N, C, h/16, w/16]."""
        batch = np.zeros((self.config.batch_size, *images[0].shape), np.uint8)
        batch[: len(images)] = images
        latents = encode_images(self._vae_graphdef, self._vae_state, vae_input(batch))
        return np.asarray(latents[: len(images)]).astype(self.dtype)

    def text(self, captions: list[str]) -> list[np.ndarray]:
        """Captions -> their features [T_i, D], T_i <= max_text_len (empty captions pad the batch)."""
        features = self.encoders.encode_prompt(captions + [""] * (self.config.batch_size - len(captions)))
        return [np.asarray(f).astype(self.dtype) for f in features[: len(captions)]]


@dataclasses.dataclass
class _Pending:
    source_index: int
    image: np.ndarray
    caption: str
    caption_style: str
    category: str
    aesthetic: float
    image_size: tuple[int, int]
    bucket_index: int = -1


class ShardWriter:
    """Records into `records-NNNNN.array_record` files of at most `shard_size` records, plus one index row
    per record (`index_dtypes`: field -> dtype of the index's arrays)."""

    def __init__(self, folder: Path, shard_size: int, index_dtypes: dict):
        self.folder = folder
        self.shard_size = shard_size
        self.index_dtypes = index_dtypes
        self.files: list[dict] = []
        self.rows: dict[str, list] = collections.defaultdict(list)
        self._writer = None

    def write(self, header: dict, index_row: dict, latents: np.ndarray, text: np.ndarray) -> None:
        """One `encode_record(header, latents, text)` record; `index_row` holds every index field."""
        if index_row.keys() != self.index_dtypes.keys():
            raise ValueError(f"index row fields {sorted(index_row)} are not {sorted(self.index_dtypes)}")
        if self._writer is None or self.files[-1]["records"] == self.shard_size:
            from array_record.python.array_record_module import ArrayRecordWriter

            self._close_file()
            self.files.append({"name": f"records-{len(self.files):05d}.array_record", "records": 0})
            self._writer = ArrayRecordWriter(str(self.folder / self.files[-1]["name"]), ARRAY_RECORD_OPTIONS)
        self._writer.write(encode_record(header, latents, text))
        self.files[-1]["records"] += 1
        for name, value in index_row.items():
            self.rows[name].append(value)

    @property
    def records(self) -> int:
        return sum(file["records"] for file in self.files)

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        """Closes the last file and writes the index."""
        self._close_file()
        with open(self.folder / INDEX_FILE, "wb") as file:
            np.savez(file, **{name: np.array(self.rows[name], dtype) for name, dtype in self.index_dtypes.items()})


def _record_fields(item: _Pending, bucket: Bucket, text: np.ndarray) -> tuple[dict, dict]:
    """The stored header and the index row of a precomputed image record."""
    header = {"source_index": item.source_index, "caption": item.caption, "caption_style": item.caption_style,
              "category": item.category, "aesthetic": None if math.isnan(item.aesthetic) else item.aesthetic,
              "image_size": list(item.image_size), "bucket": [bucket.height, bucket.width]}
    row = {"source_index": item.source_index, "image_height": item.image_size[0],
           "image_width": item.image_size[1], "bucket_height": bucket.height, "bucket_width": bucket.width,
           "text_length": text.shape[0], "aesthetic": item.aesthetic, "category": item.category}
    return header, row


def _prepare(source, buckets: tuple[Bucket, ...], max_crop_fraction: float, index: int) -> _Pending | str:
    """The record's image cropped to its bucket, and its metadata; or why it is skipped: the exception type
    of a record that cannot be read or decoded, `CROP_SKIP` for one beyond the crop bound."""
    try:
        record = source[index]
        image = decode_image(record["image"])
        item = _Pending(index, image, record_caption(record), record.get("caption_style", "dense"),
                        record_category(record), record_aesthetic(record), image.shape[:2])
    except Exception as error:  # noqa: BLE001 - any unreadable record is skipped and counted
        return type(error).__name__
    height, width = item.image_size
    item.bucket_index = int(assign_buckets([height], [width], buckets)[0])
    bucket = buckets[item.bucket_index]
    if crop_fraction([height], [width], [bucket.height], [bucket.width])[0] > max_crop_fraction:
        return CROP_SKIP
    item.image = resize_and_crop(image, bucket)
    return item


def precompute(encoders, source, out_dir: str | os.PathLike, config: PrecomputeConfig, *, shard_index: int = 0,
               shard_count: int = 1, model_fingerprint: str = "", model: str = "", progress: bool = True) -> dict:
    """Precomputes shard `shard_index` of `shard_count` of `source` into `out_dir` (written atomically: a
    failure leaves nothing there); returns the metadata written to `metadata.json`."""
    from conversions.common import atomic_directory

    indices = shard_indices(len(source), shard_index, shard_count)
    if not indices.size:
        raise ValueError(f"{source!r} has no record in shard {shard_index} of {shard_count}")
    encoder = BatchEncoder(encoders, config)
    truncated = 0
    with atomic_directory(out_dir) as staging:
        writer = ShardWriter(staging, config.shard_size, INDEX_DTYPES)

        def flush(bucket_index: int, items: list[_Pending]) -> None:
            nonlocal truncated
            bucket = config.buckets[bucket_index]
            latents = encoder.latents([item.image for item in items])
            texts = encoder.text([item.caption for item in items])
            for item, item_latents, text in zip(items, latents, texts):
                truncated += text.shape[0] > config.max_text_len
                text = text[: config.max_text_len]
                writer.write(*_record_fields(item, bucket, text), item_latents, text)

        prepare = functools.partial(_prepare, styled(source, config.caption_styles), config.buckets,
                                    config.max_crop_fraction)
        unreadable, dropped_for_crop = encode_in_buckets(prepare, indices, config, flush,
                                                         f"precompute shard {shard_index}/{shard_count}", progress)
        writer.close()
        if not writer.records:
            raise ValueError(f"no record of {source!r} (shard {shard_index} of {shard_count}) could be precomputed: "
                             f"{dict(unreadable)} unreadable, {dropped_for_crop} beyond the crop bound")
        metadata = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            **encoder_metadata(encoder, model=model, model_fingerprint=model_fingerprint),
            "caption_styles": None if config.caption_styles is None else config.caption_styles.to_dict(),
            "source": repr(source), "source_records": len(source),
            "shard_index": shard_index, "shard_count": shard_count, "records": writer.records,
            "skipped": {"unreadable": dict(unreadable), "crop": dropped_for_crop}, "truncated_texts": truncated,
            "files": writer.files,
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata


def encode_in_buckets(prepare, indices: np.ndarray, config: PrecomputeConfig, flush, description: str,
                      progress: bool = True) -> tuple[collections.Counter, int]:
    """Runs `prepare(index)` over `indices` in `config.workers` threads and hands what it prepared to
    `flush(bucket_index, items)` one bucket at a time, `config.batch_size` items per call (the rest of each
    bucket at the end, buckets in order). `prepare` returns an item with a `bucket_index`, `CROP_SKIP`, or
    the exception name of a record it could not read. Returns (unreadable records by exception name,
    records beyond the crop bound)."""
    unreadable, dropped_for_crop = collections.Counter(), 0
    pending = collections.defaultdict(list)
    bar = tqdm(total=len(indices), desc=description, unit="record", disable=not progress)
    # Decoding runs ahead in threads (PIL releases the GIL) by at most one window, in source order.
    window = PREPARE_WINDOW_PER_WORKER * config.workers
    with ThreadPoolExecutor(config.workers) as pool:
        for start in range(0, len(indices), window):
            for item in pool.map(prepare, indices[start:start + window].tolist()):
                bar.update()
                if not isinstance(item, str):
                    pending[item.bucket_index].append(item)
                    if len(pending[item.bucket_index]) == config.batch_size:
                        flush(item.bucket_index, pending.pop(item.bucket_index))
                elif item == CROP_SKIP:
                    dropped_for_crop += 1
                else:
                    unreadable[item] += 1
    bar.close()
    for bucket_index, items in sorted(pending.items()):
        flush(bucket_index, items)
    return unreadable, dropped_for_crop


def encoder_metadata(encoder: BatchEncoder, *, model: str, model_fingerprint: str) -> dict:
    """The metadata fields that say how a folder's features were made (shared by every precomputed
    format): the encoders' model and fingerprint, the buckets, crop bound, storage dtype, feature sizes,
    text truncation, and the empty prompt's features."""
    config = encoder.config
    empty = encoder.text([""])[0]
    return {"model": model, "model_fingerprint": model_fingerprint, "stage_side": config.stage_side,
            "buckets": [[b.height, b.width] for b in config.buckets], "max_crop_fraction": config.max_crop_fraction,
            "dtype": config.dtype, "latent_channels": encoder.encoders.vae.config.packed_channels,
            "text_dim": int(empty.shape[1]), "max_text_len": config.max_text_len,
            "empty_prompt": {"length": int(empty.shape[0]), "features": empty.astype(np.float32).tolist()}}


def _head_bytes(path: Path, size: int) -> int:
    """How much of a large file's start is hashed whole: a safetensors file's length field and JSON header
    (every tensor's name, dtype, shape and offsets), else FINGERPRINT_HEAD_BYTES."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
        if header_length <= SAFETENSORS_MAX_HEADER_BYTES and 8 + header_length <= size:
            return 8 + header_length
    return min(FINGERPRINT_HEAD_BYTES, size)


def _update_with_content(digest, path: Path, size: int) -> None:
    """A file's bytes into `digest`: all of them for a small file, else its head and FINGERPRINT_SAMPLES
    evenly strided blocks of the rest (retrained weights change every block)."""
    whole = FINGERPRINT_TEXT_BYTES if path.suffix in FINGERPRINT_TEXT_SUFFIXES else FINGERPRINT_CONTENT_BYTES
    with open(path, "rb") as f:
        if size <= whole:
            digest.update(f.read())
            return
        head = _head_bytes(path, size)
        digest.update(f.read(head))
        if size - head <= FINGERPRINT_SAMPLES * FINGERPRINT_SAMPLE_BYTES:
            digest.update(f.read())
            return
        stride = (size - head - FINGERPRINT_SAMPLE_BYTES) / (FINGERPRINT_SAMPLES - 1)
        for sample in range(FINGERPRINT_SAMPLES):
            f.seek(head + int(sample * stride))
            digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over the encoder components' files (VAE, text encoder, tokenizer; safetensors, Orbax or any
    other layout): each file's name, size and content, large files sampled (see `_update_with_content`),
    so features of a retrained encoder of the same architecture do not match."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for component in ENCODER_COMPONENTS:
        for path in sorted(p for p in (root / component).rglob("*") if p.is_file()):
            size = path.stat().st_size
            digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
            _update_with_content(digest, path, size)
    return digest.hexdigest()


def load_encoders(model_dir: str | os.PathLike, dtype: str = "float32"):
    """An ErnieImagePipeline holding only the VAE, text encoder and tokenizer of a pipeline folder (the
    transformer is not loaded)."""
    from conversions import mistral, vae
    from conversions.safetensors_io import CheckpointError
    from ernie_jax.pipeline import ErnieImagePipeline
    from ernie_jax.tokenizer import Tokenizer

    root = Path(model_dir)
    if not (root / "model_index.json").is_file():
        raise CheckpointError(f"{root}: no model_index.json (not an ERNIE-Image pipeline folder)")
    for component in ENCODER_COMPONENTS:
        if not (root / component).is_dir():
            raise CheckpointError(f"{root}: the pipeline has no {component}/ component")
    return ErnieImagePipeline(None, vae.load_vae(root / "vae", dtype),
                              mistral.load_text_encoder(root / "text_encoder", dtype),
                              Tokenizer.from_folder(root / "tokenizer"))


def open_source(path: str | os.PathLike):
    """A scored manifest folder (`scored.ScoredSource`), a tfds dataset folder (holding dataset_info.json) or
    an image folder, as a record source."""
    folder = Path(path)
    if is_scored_folder(folder):
        source = ScoredSource(folder)
    elif (folder / "dataset_info.json").is_file():
        source = TfdsSource(folder)
    else:
        source = FolderSource(folder)
    if not len(source):
        raise ValueError(f"{folder}: no records (no images with captions, or an empty dataset)")
    return source


def parse_buckets(text: str) -> tuple[Bucket, ...]:
    """"256x256,192x336" (height x width) -> Buckets."""
    try:
        sizes = [tuple(int(side) for side in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        sizes = None
    if not sizes or any(len(size) != 2 for size in sizes):
        raise ValueError(f"--buckets {text!r}: expected HEIGHTxWIDTH pairs separated by commas")
    return as_buckets(sizes)


def parse_style_mix(text: str | None) -> StyleMix | None:
    """`--caption-styles` JSON (StyleMix's fields) -> a StyleMix; None without one."""
    if text is None:
        return None
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--caption-styles {text!r} is not JSON ({error})") from None
    if not isinstance(fields, dict):
        # ValueError, not TypeError: bad input is reported as one `error:` line.
        raise ValueError(f"--caption-styles {text!r}: expected a JSON object of StyleMix fields")  # noqa: TRY004
    try:
        return StyleMix(**fields)
    except TypeError as error:
        raise ValueError(f"--caption-styles {text!r}: {error}") from None


def add_precompute_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every precomputing command shares: the encoders, the output, the buckets, the
    `PrecomputeConfig` fields but `caption_styles` (only image records are restyled) and this host's shard
    (read back by `precompute_arguments`)."""
    parser.add_argument("--model", required=True, help="ERNIE-Image pipeline folder (VAE, text encoder, tokenizer)")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--stage-side", type=int, help="the stage's buckets are buckets.stage_buckets(side)")
    parser.add_argument("--buckets", help="explicit bucket set instead, HEIGHTxWIDTH,...")
    parser.add_argument("--max-text-len", type=int, default=PrecomputeConfig.max_text_len)
    parser.add_argument("--max-crop-fraction", type=float, default=PrecomputeConfig.max_crop_fraction)
    parser.add_argument("--batch-size", type=int, default=PrecomputeConfig.batch_size)
    parser.add_argument("--shard-size", type=int, default=PrecomputeConfig.shard_size,
                        help="records per ArrayRecord file")
    parser.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default=PrecomputeConfig.dtype,
                        help="the encoders' compute dtype and the storage dtype")
    parser.add_argument("--workers", type=int, default=PrecomputeConfig.workers, help="threads decoding images")
    parser.add_argument("--shard-index", type=int, default=0, help="this host's shard of the source")
    parser.add_argument("--shard-count", type=int, default=1)


def precompute_arguments(args: argparse.Namespace) -> PrecomputeConfig:
    """The config of `add_precompute_arguments`' arguments, after checking the shard and the output folder
    (before any work)."""
    if (args.stage_side is None) == (args.buckets is None):
        raise ValueError("give exactly one of --stage-side and --buckets")
    buckets = stage_buckets(args.stage_side) if args.buckets is None else parse_buckets(args.buckets)
    config = PrecomputeConfig(buckets, args.stage_side, args.max_crop_fraction, args.max_text_len, args.batch_size,
                              args.shard_size, args.dtype, args.workers)
    shard_indices(0, args.shard_index, args.shard_count)
    if Path(args.out).exists():
        raise ValueError(f"{args.out}: already exists (refusing to overwrite)")
    return config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ernie_jax.data.precompute", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="image folder or tfds dataset folder")
    add_precompute_arguments(parser)
    parser.add_argument("--caption-styles", help="a prompt-style mix as JSON: the fields of prompt_styles.StyleMix")
    args = parser.parse_args(argv)
    config = dataclasses.replace(precompute_arguments(args), caption_styles=parse_style_mix(args.caption_styles))
    source = open_source(args.source)
    encoders = load_encoders(args.model, args.dtype)
    metadata = precompute(encoders, source, args.out, config, shard_index=args.shard_index,
                          shard_count=args.shard_count, model_fingerprint=model_fingerprint(args.model),
                          model=str(Path(args.model).resolve()))
    print(f"wrote {args.out}: {metadata['records']} records, skipped {metadata['skipped']}, "
          f"{metadata['truncated_texts']} texts cut to {config.max_text_len} tokens")


if __name__ == "__main__":
    from conversions.common import run_command

    sys.exit(run_command(main))
