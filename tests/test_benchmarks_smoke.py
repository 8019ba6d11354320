"""Smoke runs of the benchmark scripts that measure memory rather than speed (speed is never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_sharded_loading_overhead_stays_near_one_tensor(tmp_path):
    """benchmarks/loading.py --size small: the whole-file load holds a second copy of the checkpoint in
    anonymous memory; the sharded loader's peak RSS stays within two tensors of (RSS after import jax + the
    loaded model): the mapped file pages of the tensor being read plus one device's slice of it."""
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "loading.py"), "--size", "small", "--only",
                    "naive,sharded", "--workdir", str(tmp_path), "--json", str(tmp_path / "results.json")],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "results.json").read_text())
    naive, sharded = report["results"]["naive"], report["results"]["sharded"]
    assert sharded["resident"] >= report["total"] and naive["resident"] == sharded["resident"]
    assert naive["overhead_anon"] > 0.8 * report["total"], naive
    assert sharded["overhead_rss"] < 2 * report["largest_tensor"], (sharded, report["largest_tensor"])
