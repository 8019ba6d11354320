"""Smoke runs of the benchmark scripts: what they measure besides speed (memory, errors, FLOP counts) and
that their reports are complete; speed is never asserted."""

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


def test_forward_flops_match_xla_cost_analysis_with_patches_and_no_text_projection():
    """benchmarks.common.forward_flops against XLA's cost analysis of the compiled forward (unrolled: the
    analysis counts a scanned body once) on a config with 2x2 patches and text as wide as the model (no
    text projection): the formula counts matmuls only, XLA also the elementwise work, a few percent more."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.common import forward_flops
    from ernie_jax.models.dit import PRESETS, abstract_transformer

    config = dataclasses.replace(PRESETS["tiny"], num_layers=2, patch_size=2, text_in_dim=256)
    graphdef, state = nnx.split(abstract_transformer(config, scan_layers=False))
    batch, side, text_len = 2, 32, 24
    arguments = (jax.ShapeDtypeStruct((batch, config.in_channels, side, side), jnp.float32),
                 jax.ShapeDtypeStruct((batch,), jnp.float32),
                 jax.ShapeDtypeStruct((batch, text_len, config.text_in_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch,), jnp.int32))
    compiled = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(state, *arguments).compile()
    analysis = compiled.cost_analysis()
    xla_flops = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]
    counted = forward_flops(config, batch, (side // 2) ** 2, text_len)
    assert 1.0 <= xla_flops / counted < 1.05, (xla_flops, counted)


def test_gpu_check_tiny_mode_writes_every_part(tmp_path):
    """benchmarks/gpu_check.py --tiny on the CPU (fp32, tiny preset, all parts in one process): the JSON
    holds every part's rows with positive times, ours agrees with diffusers (forward velocity, final
    latents of both loops) to fp32 rounding, the FLOP formula matches XLA's cost analysis, and the only
    error row is cudnn attention, which needs a GPU. The markdown table has a line per row."""
    from benchmarks.common import forward_flops
    from ernie_jax.models.dit import PRESETS

    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["env"]["platform"] == "cpu"
    assert {part: status["status"] for part, status in report["parts"].items()} == {
        "matmul": "ok", "forward": "1 error rows", "train": "ok", "sampling": "ok", "flops": "ok"}
    rows = {(row["part"], row["name"]): row for row in report["rows"]}
    assert [key for key, row in rows.items() if row.get("error")] == [("forward", "ours, cudnn attention")]
    assert "cuDNN" in rows["forward", "ours, cudnn attention"]["error"]

    timed = [row for row in report["rows"] if "seconds" in row]
    assert len(timed) == 9 and all(row["seconds"] > 0 and row["tflops"] > 0 for row in timed), timed
    assert sorted(row["framework"] for row in timed if row.get("peak")) == ["jax", "torch"]
    assert all(row["fraction_of_measured_peak"] > 0 for row in timed if not row.get("peak"))

    compared = [row for row in report["rows"] if "max_rel_error" in row]
    assert [row["name"] for row in compared] == [
        "ours (xla) vs diffusers, velocity", "ours vs diffusers, final latents of the 4-step Turbo loop (guidance 1)",
        "ours vs diffusers, final latents of the 10-step CFG loop (guidance 4)"]
    assert all(0 < row["max_rel_error"] < 1e-5 and 0 < row["mean_rel_error"] < 1e-5 for row in compared), compared

    settings = report["settings"]
    forward = forward_flops(PRESETS["tiny"], 2, settings["latent"] ** 2, settings["text_len"])
    assert rows["forward", "ours, xla attention"]["flops"] == forward
    train = next(row for row in timed if row["part"] == "train")
    assert train["layers"] == 2 and train["flops"] == 3 * forward / 2 and train["loss"] > 0
    flop_check = next(row for row in report["rows"] if row["part"] == "flops")
    assert flop_check["flops"] == forward and 1.0 <= flop_check["xla_over_formula"] < 1.05, flop_check

    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {row['part']} | {row['name']} |" in table for row in report["rows"])


def test_gpu_check_skips_parts_beyond_the_budget(tmp_path):
    """With less budget than a part's estimate, the part is skipped before any process starts and the report
    says so."""
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--parts", "matmul,flops",
                    "--budget-s", "1", "--out", str(tmp_path)], cwd=REPO, check=True, capture_output=True, timeout=60)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["parts"] == {"matmul": {"status": "skipped", "seconds": None},
                               "flops": {"status": "skipped", "seconds": None}}
    assert [row["error"].split(":")[0] for row in report["rows"]] == ["skipped", "skipped"]
