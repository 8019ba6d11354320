"""The frozen teacher's ODE pairs for DMD's regression term (DMD v1, `training/objectives/dmd.py`): for
precomputed training records (precomputed.py), a noise and the teacher's deterministic sample from it (its
Euler sampler with CFG, `ernie_jax.sampling`), stored with the record's latents and text features so that the
training pipeline batches the pair with its prompt. The runner's `ode_pairs` stage makes them.

An ODE-pair folder has the precomputed layout (precomputed.py) with format "ernie_jax.ode_pairs":
- records: the precomputed record's header fields plus `origin` {"seed"}, `latents` float [3, C, h, w] (the
  record's own latents, the noise, the teacher's output from that noise) and its `text` [T, D];
- index.npz: the precomputed index fields of the records it holds;
- metadata.json: the precomputed folders' shared fields (encoders, buckets, crop bound, dtype, empty prompt,
  caption styles: the folder stands in for them in training), its own `shard_index` / `shard_count`, and
  `ode_pairs`: how the outputs were made (teacher, steps, guidance scale, shift, seed, records asked for).

The noise of the record with source index i is the pipeline's for seed `seed + i`
(`generated_pairs.sample_noise`: `jax.random.normal(jax.random.key(seed + i), [1, C, h, w])`) in the storage
dtype, and the teacher samples from that stored noise, so a pair is what `ErnieImagePipeline(prompt_embeds=the
record's features, negative_prompt_embeds=the empty prompt's, latents=noise, output_type="latent")` gives at
the same steps and guidance (the texts are zero-padded to the folder's max_text_len for batching; padded keys
are masked). `LoadOdePairBatch` batches them as the DMD step reads them: `latents`, `text`, `text_lens`,
`ode_noise`, `ode_target`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from ernie_jax.data.generated_pairs import sample_noise
from ernie_jax.data.precompute import ShardWriter
from ernie_jax.data.precomputed import (
    INDEX_DTYPES,
    METADATA_FILE,
    STORAGE_DTYPES,
    LoadPrecomputedBatch,
    PrecomputedSource,
    batch_text_features,
)

FORMAT = "ernie_jax.ode_pairs"
FORMAT_VERSION = 1
# (noise [B, C, h, w] float32, text [B, T, D] float32, text_lens [B] int32) -> the teacher's output [B, C, h, w].
Sampler = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def teacher_sampler(teacher, empty_prompt: np.ndarray, *, num_inference_steps: int, guidance_scale: float,
                    shift: float) -> Sampler:
    """The pipeline's Euler sampler of `teacher` (an `ErnieImageTransformer`) at `num_inference_steps` on the
    grid of `shift`, with CFG `guidance_scale` against `empty_prompt` [T_e, D] (the negative prompt "")."""
    from ernie_jax import sampling

    def sample(noise: np.ndarray, text: np.ndarray, text_lens: np.ndarray) -> np.ndarray:
        count = len(noise)
        negative = np.broadcast_to(empty_prompt, (count, *empty_prompt.shape))
        outputs = sampling.sample(teacher, noise, text, text_lens, negative_text_bth=negative,
                                  negative_text_lens=np.full(count, len(empty_prompt), np.int32),
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  shift=shift)
        return np.asarray(outputs, np.float32)

    return sample


def selected_positions(source: PrecomputedSource, records: int, shard_index: int, shard_count: int) -> np.ndarray:
    """Positions in `source` of the records that get pairs in this shard: of the `records` smallest source
    indices (0: every record), those whose index is `shard_index` modulo `shard_count`; in source-index order."""
    if records < 0:
        raise ValueError(f"records must be >= 0 (0: every record), got {records}")
    order = np.argsort(source.index["source_index"], kind="stable")
    if records:
        order = order[:records]
    mine = order[source.index["source_index"][order] % shard_count == shard_index]
    if not mine.size:
        raise ValueError(f"no record of {source!r} for pairs in shard {shard_index} of {shard_count} "
                         f"(records {records})")
    return mine


def make_ode_pairs(sampler: Sampler, source: PrecomputedSource, out_dir: str | os.PathLike, *, seed: int,
                   records: int = 0, batch_size: int = 16, shard_index: int = 0, shard_count: int = 1,
                   settings: dict | None = None, progress: bool = True) -> dict:
    """Writes this shard's pairs (`selected_positions`) of `source` as the ODE-pair folder `out_dir`
    (atomically: a failure leaves nothing there); returns its metadata. `sampler` runs on `batch_size` records
    of one bucket at a time (a last smaller batch is filled up with copies of its last record, so that one
    program serves every batch of a bucket). `settings` (how `sampler` samples) go to metadata's `ode_pairs`."""
    from conversions.common import atomic_directory

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    positions = selected_positions(source, records, shard_index, shard_count)
    dtype = STORAGE_DTYPES[source.metadata["dtype"]]
    length = source.metadata["max_text_len"]
    buckets = np.stack([source.index["bucket_height"][positions], source.index["bucket_width"][positions]], 1)
    with atomic_directory(out_dir) as staging:
        writer = ShardWriter(staging, 4096, INDEX_DTYPES)
        bar = tqdm(total=len(positions), desc=f"ode pairs shard {shard_index}/{shard_count}", unit="pair",
                   disable=not progress)
        for bucket in np.unique(buckets, axis=0):
            in_bucket = positions[(buckets == bucket).all(1)]
            for start in range(0, len(in_bucket), batch_size):
                chunk = in_bucket[start:start + batch_size].tolist()
                loaded = [source[position] for position in chunk]
                filled = loaded + loaded[-1:] * (batch_size - len(loaded))
                seeds = [seed + int(record["source_index"]) for record in filled]
                noise = np.asarray(sample_noise(seeds, filled[0]["latents"].shape, dtype)).astype(np.float32)
                text, text_lens = batch_text_features([record["text"].astype(np.float32) for record in filled],
                                                      length)
                targets = sampler(noise, text, text_lens)
                made = zip(chunk, loaded, noise[:len(chunk)], targets[:len(chunk)], strict=True)
                for position, record, record_noise, target in made:
                    header = {k: v for k, v in record.items() if k not in ("latents", "text")}
                    header["origin"] = {"seed": seed + int(record["source_index"])}
                    row = {name: source.index[name][position] for name in INDEX_DTYPES}
                    stacked = np.stack([record["latents"], record_noise.astype(dtype), target.astype(dtype)])
                    writer.write(header, row, stacked, record["text"])
                bar.update(len(chunk))
        bar.close()
        writer.close()
        metadata = {**source.metadata, "format": FORMAT, "format_version": FORMAT_VERSION, "source": repr(source),
                    "shard_index": shard_index, "shard_count": shard_count, "records": writer.records,
                    "files": writer.files, "ode_pairs": {**(settings or {}), "seed": seed, "records": records}}
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata


class LoadOdePairBatch(LoadPrecomputedBatch):
    """Batch plan -> DMD batch of ODE-pair records: `LoadPrecomputedBatch`'s (`latents` the records' own
    [B, C, h, w], `text`, `text_lens`, ...) plus `ode_noise` and `ode_target` float32 [B, C, h, w]."""

    def _collate(self, loaded: list) -> dict:
        batch = super()._collate(loaded)
        stacked = batch.pop("latents")
        return {**batch, "latents": stacked[:, 0], "ode_noise": stacked[:, 1], "ode_target": stacked[:, 2]}


class OdePairSource(PrecomputedSource):
    """An ODE-pair folder, or the folders of all its shards, as one source (`PrecomputedSource` of the ODE-pair
    format): `source[position]` -> the record dict, `latents` [3, C, h, w] (the record's, noise, target)."""

    format_name = FORMAT
    format_version = FORMAT_VERSION

    def batch_loader(self) -> type[LoadPrecomputedBatch]:
        return LoadOdePairBatch
