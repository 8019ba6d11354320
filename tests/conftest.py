"""Shared helpers: tiny randomised PyTorch reference models and error measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


def emulated_devices_flags(devices: int) -> str:
    """XLA_FLAGS for `devices` emulated CPU devices. XLA:CPU aborts the process when one device's thread reaches
    a collective over 40 s after the others: on two cores, beside the other test worker, one of eight device
    threads can be descheduled that long (it happened once, in a collective permute of the sharded pipeline),
    so the abort waits as long as a test may run."""
    return (f"--xla_force_host_platform_device_count={devices}"
            " --xla_cpu_collective_call_terminate_timeout_seconds=900")


def run_worker(script: str, *args, devices: int = 8, timeout: float = 900):
    """Runs `tests/workers/SCRIPT ARGS...` in a fresh process with `devices` emulated CPU devices and returns
    the JSON its last line of output holds; a failing worker fails the test with the end of its stderr."""
    env = dict(os.environ, XLA_FLAGS=emulated_devices_flags(devices), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / script), *map(str, args)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])

TINY = dict(hidden_size=256, num_attention_heads=2, num_layers=2, ffn_hidden_size=512, in_channels=128,
            out_channels=128, patch_size=1, text_in_dim=64, rope_theta=256, rope_axes_dim=(32, 48, 48), eps=1e-6,
            qk_layernorm=True)


def reference_transformer(seed: int = 0, **overrides):
    """A diffusers ErnieImageTransformer2DModel (fp32) with every tensor random.

    The reference zero-initialises adaLN_modulation and final_linear, and its norms start at 1: left
    that way the output is exactly 0 and the norms untested, so both are randomised here.
    """
    from diffusers import ErnieImageTransformer2DModel

    torch.manual_seed(seed)
    model = ErnieImageTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or "final_linear" in name:
                param.normal_(0.0, 0.05)
            elif "norm" in name or "_ln" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the numerics contract's measure."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def pad_text(features: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's `_pad_text`: a list of `[T_i, D]` -> zero-padded `[B, T_max, D]` and lengths `[B]`."""
    lengths = np.array([f.shape[0] for f in features], np.int64)
    out = np.zeros((len(features), lengths.max(), features[0].shape[1]), np.float32)
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f
    return out, lengths


@pytest.fixture(scope="session")
def tiny_reference():
    return reference_transformer()


@pytest.fixture(scope="session")
def tiny_folder(tiny_reference, tmp_path_factory):
    """The tiny reference saved by diffusers: config.json + diffusion_pytorch_model.safetensors."""
    folder = tmp_path_factory.mktemp("tiny_transformer")
    tiny_reference.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def random_pipeline_folder(tmp_path_factory):
    """A tiny random ERNIE-Image pipeline folder without a PE (conversions.random_checkpoint), shared by the
    tests that only read it: writing one takes ~15 s of eager initialisation."""
    from conversions.random_checkpoint import write_random_pipeline

    folder = tmp_path_factory.mktemp("random_pipeline") / "pipeline"
    write_random_pipeline(folder, "tiny")
    return folder
