"""Offline: an aesthetic score for every record of a dataset, written as a scored manifest
(`ernie_jax.data.scored`) that training reads in place of the dataset, optionally filtered.

    python -m ernie_jax.aesthetics.score_data --scorer SPEC --source DATA --out DATA.scored \\
        [--min-score T] [--category-quantile Q] [--chunk-size 4096] [--batch-size 16] [--workers 8] \\
        [--shard-index I --shard-count N]

SPEC is a scorer spec (`scorers.SCORERS`: `laion:CLIP_FOLDER,HEAD_FILE`); DATA an image folder, a tfds dataset
folder or another scored manifest (`precompute.open_source`). Point the run's `config.data.source` at OUT: its
category weighting and within-category draws (`categories.py`) then use the scores.

The records are cut into chunks of `chunk_size` consecutive source indices; chunk c is scored by host
`c % shard_count` (`catalog.shard_indices` over chunks) into OUT/chunks/chunk-CCCCCC.npz (`score` float64 and
`category` str per record, `error` the exception name of a record that could not be read, else ""), each
written atomically. A rerun skips the chunks already written, so a killed job resumes where it stopped, and
since a chunk's scores depend only on its records (same batches, same padding) the result is byte-identical
whatever the interruptions or the number of hosts. Every host points at the same OUT (a shared file system);
the host that finds every chunk written when it finishes writes the manifest, so rerunning any host's job
after all have finished (with other filters, say: nothing is rescored) writes it too.

Filters (both optional, applied together): `--min-score T` keeps scores >= T; `--category-quantile Q` keeps
the records scoring at least their category's Q-quantile (numpy's linear interpolation over the category's
scored records), so every category keeps its best 1 - Q whatever its score level. Records that could not be
read are left out and counted in the manifest's `unreadable`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ernie_jax.aesthetics.scorers import checked_scores, load_scorer
from ernie_jax.data.catalog import shard_indices
from ernie_jax.data.scored import FORMAT, FORMAT_VERSION, MANIFEST_FILE, SCORES_FILE
from ernie_jax.data.sources import decode_image, record_category

JOB_FILE = "job.json"
CHUNKS_DIR = "chunks"
DEFAULT_CHUNK_SIZE = 4096
DEFAULT_BATCH_SIZE = 16


def chunk_path(out_dir: Path, chunk: int) -> Path:
    return out_dir / CHUNKS_DIR / f"chunk-{chunk:06d}.npz"


def write_atomically(path: Path, write) -> None:
    """`write(file)` into a hidden staging file beside `path`, then renamed to it, so that a reader never sees a
    partial `path`. The staging name is unique (hosts may write the same shared file at once); a failure
    removes it, only a kill leaves it behind."""
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(staging, "wb") as file:
            write(file)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _read(source, index: int) -> tuple[np.ndarray | None, str, str]:
    """(image uint8 [H, W, 3] or None, category, "" or the exception name of a record that cannot be read)."""
    try:
        record = source[index]
        return decode_image(record["image"]), record_category(record), ""
    except Exception as error:  # noqa: BLE001 - any unreadable record is skipped and counted
        return None, "", type(error).__name__


def score_chunk(source, indices: np.ndarray, scorer, batch_size: int, pool: ThreadPoolExecutor,
                progress) -> dict[str, np.ndarray]:
    """Scores of `source[indices]` in batches of `batch_size` images: {"score": float64 [n] (NaN where
    unreadable), "category": str [n], "error": str [n]}."""
    scores = np.full(len(indices), np.nan)
    categories, errors = [""] * len(indices), [""] * len(indices)
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        readable, images = [], []
        read = pool.map(lambda index: _read(source, int(index)), batch)
        for position, (image, category, error) in enumerate(read, start):
            categories[position], errors[position] = category, error
            if image is not None:
                readable.append(position)
                images.append(image)
        if images:
            scores[readable] = checked_scores(scorer(images), len(images), scorer)
        progress.update(len(batch))
    return {"score": scores, "category": np.array(categories, dtype=str), "error": np.array(errors, dtype=str)}


def _check_job(out_dir: Path, job: dict) -> None:
    """Writes OUT/job.json, or checks that an earlier run's is this job: chunks of another scorer, source or
    chunking must not be mixed."""
    path = out_dir / JOB_FILE
    if path.is_file():
        earlier = json.loads(path.read_text("utf-8"))
        if earlier != job:
            changed = sorted(key for key in job.keys() | earlier.keys() if earlier.get(key) != job.get(key))
            raise ValueError(f"{out_dir} holds the chunks of another job (different {changed}: "
                             f"{ {key: earlier.get(key) for key in changed} }); use another --out")
        return
    write_atomically(path, lambda file: file.write((json.dumps(job, indent=1) + "\n").encode()))


def keep_mask(scores: np.ndarray, categories: np.ndarray, min_score: float | None,
              category_quantile: float | None) -> np.ndarray:
    """Which records pass the filters (module docstring). scores float64 [N] (NaN: unreadable, never kept),
    categories str [N] -> bool [N]."""
    keep = ~np.isnan(scores)
    if min_score is not None:
        keep &= scores >= min_score
    if category_quantile is not None:
        for category in np.unique(categories[~np.isnan(scores)]):
            members = (categories == category) & ~np.isnan(scores)
            keep &= ~members | (scores >= np.quantile(scores[members], category_quantile))
    return keep


def write_manifest(out_dir: Path, job: dict, min_score: float | None, category_quantile: float | None) -> dict:
    """Assembles every chunk into the scored manifest (`scored.py`), filtered; returns its metadata."""
    num_chunks = -(-job["source_records"] // job["chunk_size"])
    parts = []
    for chunk in range(num_chunks):
        with np.load(chunk_path(out_dir, chunk)) as arrays:
            parts.append({name: arrays[name] for name in ("score", "category", "error")})
    scores = np.concatenate([part["score"] for part in parts])
    categories = np.concatenate([part["category"] for part in parts])
    errors = np.concatenate([part["error"] for part in parts])
    keep = keep_mask(scores, categories, min_score, category_quantile)
    source_indices = np.flatnonzero(keep).astype(np.int64)
    write_atomically(out_dir / SCORES_FILE, lambda file: np.savez(file, source_index=source_indices,
                                                                  aesthetic=scores[keep]))
    scored = int(np.count_nonzero(~np.isnan(scores)))
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **job,
                "filter": {"min_score": min_score, "category_quantile": category_quantile},
                "records": len(source_indices), "scored": scored,
                "unreadable": dict(sorted(collections.Counter(errors[errors != ""].tolist()).items())),
                "filtered_out": scored - len(source_indices)}
    # Written last: its presence is what makes the folder a manifest.
    write_atomically(out_dir / MANIFEST_FILE, lambda file: file.write((json.dumps(metadata, indent=1) + "\n").encode()))
    return metadata


def check_settings(chunk_size: int, batch_size: int, workers: int, category_quantile: float | None) -> None:
    if chunk_size < 1 or batch_size < 1 or workers < 1:
        raise ValueError(f"chunk_size, batch_size and workers must be positive, got {chunk_size}, {batch_size}, "
                         f"{workers}")
    if category_quantile is not None and not 0 <= category_quantile <= 1:
        raise ValueError(f"category_quantile must be in [0, 1], got {category_quantile}")


def score_data(source, scorer, out_dir: str | os.PathLike, *, source_path: str, scorer_spec: str,
               chunk_size: int = DEFAULT_CHUNK_SIZE, batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 8,
               min_score: float | None = None, category_quantile: float | None = None, shard_index: int = 0,
               shard_count: int = 1, progress: bool = True) -> dict | None:
    """Scores this host's chunks of `source` with `scorer` (`scorers.Scorer`) into `out_dir`, skipping chunks
    already written, then writes the manifest if every chunk is there. `source_path` and `scorer_spec` are
    recorded (the manifest reopens the source from `source_path`). Returns the manifest's metadata, or None
    while other hosts' chunks are missing."""
    check_settings(chunk_size, batch_size, workers, category_quantile)
    out_dir = Path(out_dir)
    num_records = len(source)
    if not num_records:
        raise ValueError(f"{source!r} has no records to score")
    num_chunks = -(-num_records // chunk_size)
    chunks = shard_indices(num_chunks, shard_index, shard_count)
    job = {"source": source_path, "source_records": num_records, "scorer": scorer_spec, "chunk_size": chunk_size,
           "batch_size": batch_size}
    (out_dir / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    _check_job(out_dir, job)
    todo = [int(chunk) for chunk in chunks if not chunk_path(out_dir, int(chunk)).is_file()]
    mine = sum(min(chunk_size, num_records - chunk * chunk_size) for chunk in chunks.tolist())
    remaining = sum(min(chunk_size, num_records - chunk * chunk_size) for chunk in todo)
    bar = tqdm(total=mine, initial=mine - remaining, desc=f"score shard {shard_index}/{shard_count}",
               unit="record", disable=not progress)
    with ThreadPoolExecutor(workers) as pool:
        for chunk in todo:
            indices = np.arange(chunk * chunk_size, min((chunk + 1) * chunk_size, num_records))
            arrays = score_chunk(source, indices, scorer, batch_size, pool, bar)
            write_atomically(chunk_path(out_dir, chunk), lambda file, arrays=arrays: np.savez(file, **arrays))
    bar.close()
    if not all(chunk_path(out_dir, chunk).is_file() for chunk in range(num_chunks)):
        return None
    return write_manifest(out_dir, job, min_score, category_quantile)


def main(argv=None) -> None:
    from ernie_jax.data.precompute import open_source

    parser = argparse.ArgumentParser(prog="python -m ernie_jax.aesthetics.score_data",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorer", required=True, help="scorer spec, e.g. laion:CLIP_FOLDER,HEAD_FILE")
    parser.add_argument("--source", required=True, help="image folder, tfds dataset folder or scored manifest")
    parser.add_argument("--out", required=True, help="the scored manifest folder (beside the data, not in it)")
    parser.add_argument("--min-score", type=float, help="keep records scoring at least this")
    parser.add_argument("--category-quantile", type=float,
                        help="keep records scoring at least this quantile of their category's scores")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="records per resumable chunk")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per scorer call")
    parser.add_argument("--workers", type=int, default=8, help="threads reading and decoding images")
    parser.add_argument("--shard-index", type=int, default=0, help="this host's shard of the chunks")
    parser.add_argument("--shard-count", type=int, default=1)
    args = parser.parse_args(argv)
    # Settings are checked before the scorer and the source are loaded.
    shard_indices(0, args.shard_index, args.shard_count)
    check_settings(args.chunk_size, args.batch_size, args.workers, args.category_quantile)
    source_path = str(Path(args.source).resolve())
    if Path(args.out).resolve() == Path(source_path):
        raise ValueError(f"--out {args.out} is the source itself; write the manifest beside it")
    source = open_source(source_path)
    scorer = load_scorer(args.scorer, args.batch_size)
    metadata = score_data(source, scorer, args.out, source_path=source_path, scorer_spec=args.scorer,
                          chunk_size=args.chunk_size, batch_size=args.batch_size, workers=args.workers,
                          min_score=args.min_score, category_quantile=args.category_quantile,
                          shard_index=args.shard_index, shard_count=args.shard_count)
    if metadata is None:
        print(f"scored shard {args.shard_index} of {args.shard_count}; the manifest is written when every shard "
              f"has finished (rerun any shard's command then)")
    else:
        print(f"wrote {Path(args.out) / MANIFEST_FILE}: {metadata['records']} of {metadata['source_records']} "
              f"records kept, {metadata['filtered_out']} filtered out, unreadable {metadata['unreadable']}")


if __name__ == "__main__":
    from conversions.common import run_command

    sys.exit(run_command(main))
