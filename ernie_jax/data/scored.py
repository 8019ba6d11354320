"""A scored manifest: another source's records with the aesthetic scores a scoring job gave them
(`ernie_jax.aesthetics.score_data`), optionally filtered, read as a record source of its own.

The manifest is a folder written beside the data, never into it:

    MANIFEST_FILE  scored_source.json: {"format", "format_version", "source" (the scored source's path),
                   "source_records", "scorer", "chunk_size", "batch_size", "filter": {"min_score", "category_quantile"},
                   "records" (kept), "scored", "unreadable" (by exception name), "filtered_out"}
    SCORES_FILE    scores.npz: source_index int64 [M] (ascending), aesthetic float64 [M] of the kept records

`ScoredSource(folder)` is `len() == M` and `source[i]` = the source's record `source_index[i]` with its
`aesthetic` replaced by the score, so the catalog (`catalog.py`) and category weighting (`categories.py`) read
the scores as they read any record's. `precompute.open_source` opens such a folder like a data folder, so a
run's `config.data.source` may name it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

FORMAT = "ernie_jax.scored_source"
FORMAT_VERSION = 1
MANIFEST_FILE = "scored_source.json"
SCORES_FILE = "scores.npz"


def is_scored_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


class ScoredSource:
    """The kept records of a scored manifest folder (module docstring), their `aesthetic` the job's scores.

    `base` is the scored source (by default opened from the manifest's `source` path); it must still hold the
    `source_records` records it held when scored.
    """

    def __init__(self, folder: str | os.PathLike, base=None):
        self.folder = Path(folder)
        try:
            self.metadata = json.loads((self.folder / MANIFEST_FILE).read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{self.folder}: not a readable scored manifest ({error})") from None
        found = (self.metadata.get("format"), self.metadata.get("format_version"))
        if found != (FORMAT, FORMAT_VERSION):
            raise ValueError(f"{self.folder}: format {found[0]!r} version {found[1]}, expected {FORMAT!r} version "
                             f"{FORMAT_VERSION}")
        with np.load(self.folder / SCORES_FILE) as arrays:
            self.source_indices = arrays["source_index"]
            self.scores = arrays["aesthetic"]
        if self.source_indices.shape != self.scores.shape or len(self.scores) != self.metadata["records"]:
            raise ValueError(f"{self.folder}: {SCORES_FILE} holds {self.source_indices.shape} indices and "
                             f"{self.scores.shape} scores for {self.metadata['records']} records")
        if base is None:
            from ernie_jax.data.precompute import open_source

            base = open_source(self.metadata["source"])
        if len(base) != self.metadata["source_records"]:
            raise ValueError(f"{self.folder}: scored {self.metadata['source_records']} records of "
                             f"{self.metadata['source']}, which now has {len(base)} (rescore it)")
        self.base = base

    def __len__(self) -> int:
        return len(self.source_indices)

    def __getitem__(self, index: int) -> dict:
        record = dict(self.base[int(self.source_indices[index])])
        record["aesthetic"] = float(self.scores[index])
        return record

    def __repr__(self) -> str:
        return f"ScoredSource({str(self.folder)!r}, {len(self)} of {self.metadata['source']!r})"
