"""The README's main job, run as a user runs it: random checkpoint -> convert -> denoise."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def test_main_job(tmp_path):
    run("conversions.random_checkpoint", str(tmp_path / "tiny"), "--preset", "tiny")
    run("conversions.convert", str(tmp_path / "tiny"), str(tmp_path / "tiny-jax"))
    result = run("ernie_jax.denoise", "--model", str(tmp_path / "tiny-jax"), "--height", "64", "--width", "48",
                 "--turbo", "--out", str(tmp_path / "latents.npy"))
    assert "8 steps, guidance 1.0" in result.stdout
    latents = np.load(tmp_path / "latents.npy")
    assert latents.shape == (1, 128, 4, 3) and np.isfinite(latents).all()


def test_generate_writes_images_and_settings(tmp_path):
    from PIL import Image

    run("conversions.random_checkpoint", str(tmp_path / "pipe"), "--pipeline", "--with-pe")
    run("conversions.convert", str(tmp_path / "pipe"), str(tmp_path / "pipe-jax"))
    run("ernie_jax.generate", "--model", str(tmp_path / "pipe-jax"), "--prompt", "a red circle", "--prompt", "一只猫",
        "--height", "32", "--width", "48", "--steps", "3", "--num-images", "2", "--seed", "5", "--dtype", "float32",
        "--out", str(tmp_path / "images"))
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == [f"{p:03d}_{i:02d}.{ext}" for p in range(2) for i in range(2) for ext in ("json", "png")]
    record = json.loads((tmp_path / "images" / "001_01.json").read_text())
    assert record["prompt"] == "一只猫" and record["seed"] == 6 and record["num_inference_steps"] == 3
    assert record["use_pe"] is True and isinstance(record["revised_prompt"], str)
    assert Image.open(tmp_path / "images" / "000_00.png").size == (48, 32)
    # A size that is not a multiple of this model's pixels per token: one error line, nothing written.
    bad = subprocess.run([sys.executable, "-m", "ernie_jax.generate", "--model", str(tmp_path / "pipe-jax"),
                          "--prompt", "x", "--height", "20", "--out", str(tmp_path / "bad")], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "error: height must be a positive multiple of" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()
    # A pipeline without a prompt enhancer records that none ran, whatever --no-pe says.
    without_pe = tmp_path / "pipe-jax-no-pe"
    shutil.copytree(tmp_path / "pipe-jax", without_pe)
    index = json.loads((without_pe / "model_index.json").read_text())
    (without_pe / "model_index.json").write_text(json.dumps({**index, "pe": [None, None], "pe_tokenizer": [None, None]}))
    run("ernie_jax.generate", "--model", str(without_pe), "--prompt", "a red circle", "--height", "32", "--width", "32",
        "--steps", "1", "--dtype", "float32", "--out", str(tmp_path / "no_pe"))
    record = json.loads((tmp_path / "no_pe" / "000_00.json").read_text())
    assert record["use_pe"] is False and record["revised_prompt"] is None


def test_denoise_rejects_bad_sizes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ernie_jax.denoise", "--model", str(tmp_path), "--height", "100",
                             "--out", str(tmp_path / "x.npy")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "multiple of 16" in result.stderr
    assert not (tmp_path / "x.npy").exists()
