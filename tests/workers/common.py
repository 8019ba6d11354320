"""What the sharded-equivalence workers share: the inputs and the error measure."""

from __future__ import annotations

import numpy as np


def tiny_inputs(batch: int = 8, text_len: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the tiny DiT (text width 64): the same arrays in every process for the same seed."""
    rng = np.random.default_rng(seed)
    return dict(latents=rng.standard_normal((batch, 128, 4, 4), np.float32),
                timesteps=rng.uniform(0, 1000, batch).astype(np.float32),
                text=rng.standard_normal((batch, text_len, 64), np.float32),
                text_lens=rng.integers(1, text_len + 1, batch),
                negative=rng.standard_normal((batch, 2, 64), np.float32),
                negative_lens=np.ones(batch, np.int64))


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())
