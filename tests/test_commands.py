"""The README's main job, run as a user runs it: random checkpoint -> convert -> denoise."""

from __future__ import annotations

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


def test_denoise_rejects_bad_sizes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ernie_jax.denoise", "--model", str(tmp_path), "--height", "100",
                             "--out", str(tmp_path / "x.npy")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "multiple of 16" in result.stderr
    assert not (tmp_path / "x.npy").exists()
