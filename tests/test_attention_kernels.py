"""Attention kernels: Pallas splash attention (interpret mode on CPU) against the "xla" reference, its
errors, and attention under shard_map with context parallelism.

The sharded runs need 8 devices, emulated on CPU with XLA_FLAGS, which must be set before JAX starts:
they run in a subprocess (tests/workers/sharded_attention.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.models import layers, splash
from ernie_jax.models.dit import PRESETS, ErnieImageTransformer, init_transformer
from tests.conftest import relative_error, run_worker

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 2e-6  # fp32; measured 2e-7 to 5e-7


def random_qkv(batch, q_len, kv_len, heads, kv_heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, head_dim), np.float32)
    k, v = (rng.standard_normal((batch, kv_len, kv_heads, head_dim), np.float32) for _ in range(2))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize("batch,q_len,kv_len,heads,kv_heads,head_dim", [
    (2, 24, 24, 2, 2, 128),  # shorter than one 128 block
    (3, 130, 130, 2, 2, 64),  # two blocks, the second almost all padding
    (2, 64, 200, 4, 2, 32),  # queries and keys of different lengths, grouped-query attention
    (1, 256, 256, 2, 1, 128),  # whole blocks, no padding, one shared key head
])
def test_splash_matches_xla(batch, q_len, kv_len, heads, kv_heads, head_dim):
    q, k, v = random_qkv(batch, q_len, kv_len, heads, kv_heads, head_dim)
    key_lengths = jnp.asarray(np.random.default_rng(1).integers(1, kv_len + 1, batch))
    for lengths in (key_lengths, None):
        expected = layers.attention(q, k, v, lengths, "xla")
        assert relative_error(layers.attention(q, k, v, lengths, "splash"), expected) <= TOLERANCE


def test_splash_gradients_match_xla():
    q, k, v = random_qkv(2, 40, 40, 2, 1, 128)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape, np.float32))
    key_lengths = jnp.asarray([17, 40])

    def gradients(implementation):
        loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v, key_lengths, implementation) * weights)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for actual, expected in zip(gradients("splash"), gradients("xla")):
        assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("rope_axes_dim", [(32, 48, 48), (16, 24, 24)])  # RoPE on all / half of the 128 channels
def test_dit_with_splash_attention_matches_xla(rope_axes_dim):
    config = dataclasses.replace(PRESETS["tiny"], rope_axes_dim=rope_axes_dim)
    rng = np.random.default_rng(0)
    inputs = (rng.standard_normal((2, 128, 4, 4), np.float32), np.array([10.0, 700.0], np.float32),
              rng.standard_normal((2, 8, 64), np.float32), np.array([3, 8]))
    outputs = {}
    for implementation in ("xla", "splash"):
        graphdef, state = nnx.split(init_transformer(config, attention_impl=implementation))
        outputs[implementation] = jax.jit(lambda s, *a, g=graphdef: nnx.merge(g, s)(*a))(state, *inputs)
    assert relative_error(outputs["splash"], outputs["xla"]) <= TOLERANCE


def test_attention_errors():
    q, k, v = random_qkv(1, 8, 8, 4, 4, 16)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        layers.attention(q, k, v, None, "flash")
    with pytest.raises(ValueError, match="splash attention takes only the key-padding mask"):
        layers.attention(q, k, v, None, "splash", mask=jnp.ones((1, 1, 8, 8), bool))
    with pytest.raises(ValueError, match="3 key heads must divide 4 query heads"):
        splash.splash_attention(q, k[:, :, :3], v[:, :, :3], None)
    with pytest.raises(ValueError, match="must share batch and head dim"):
        splash.splash_attention(q, k[..., :8], v[..., :8], None)
    with pytest.raises(ValueError, match="of equal shapes"):
        splash.splash_attention(q, k, v[:, :4], None)
    with pytest.raises(ValueError, match=r"positive multiples of 128, got \{'block_q': 64\}"):
        splash.splash_attention(q, k, v, None, block_sizes=splash.pallas_splash.BlockSizes(block_q=64, block_kv=128))
    with pytest.raises(ValueError, match="block_kv=256 must be a multiple of block_kv_compute=384"):
        splash.splash_attention(q, k, v, None, block_sizes=splash.pallas_splash.BlockSizes(
            block_q=128, block_kv=256, block_kv_compute=384))
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        ErnieImageTransformer(PRESETS["tiny"], attention_impl="flash", rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def sharded_attention():
    return run_worker("sharded_attention.py")


@pytest.mark.parametrize("case,output_spec,pallas_calls", [
    ("context=2,fsdp=4", "P('fsdp', 'context', None, None)", 0),
    ("context=4,tensor=2", "P(None, 'context', 'tensor', None)", 0),
    ("context=8", "P(None, 'context', None, None)", 0),
    ("splash:context=2,fsdp=4", "P('fsdp', 'context', None, None)", 1),
    ("splash:context=4,tensor=2", "P(None, 'context', 'tensor', None)", 1),
    ("partial_rotary:splash:context=4,tensor=2", "P(None, 'context', 'tensor', None)", 1),
    # Mistral-style: heads split over tensor only where the key heads divide too.
    ("grouped_causal:kv_heads=2", "P('data', 'context', 'tensor', None)", 0),
    ("grouped_causal:kv_heads=1", "P('data', 'context', None, None)", 0),
])
def test_context_parallel_attention_is_exact(sharded_attention, case, output_spec, pallas_calls):
    result = sharded_attention[case]
    assert result["error"] <= 1e-5, result
    # One shard_map per traced attention (the layers are scanned): queries stay split over context, and
    # keys and values are all-gathered over it.
    assert result["shard_maps"] == 1 and result["output_specs"] == [output_spec], result
    assert result["all_gather_axes"] == [["context"], ["context"]], result
    assert result["pallas_calls"] == pallas_calls, result


@pytest.mark.parametrize("case", ["gradients:xla:kv_heads=2", "gradients:xla:kv_heads=1",
                                  "gradients:splash:kv_heads=2", "gradients:splash:kv_heads=1"])
def test_context_parallel_attention_gradients_are_exact(sharded_attention, case):
    assert sharded_attention[case]["error"] <= 1e-5, sharded_attention[case]


def test_sequence_not_divisible_by_context_stays_whole(sharded_attention):
    # S = 256 + 7 = 263 on context=8: the length stays unsplit, as the activation rules leave it, so
    # nothing is gathered and every context shard computes the whole attention.
    result = sharded_attention["context=8,S=263"]
    assert result["error"] <= 1e-5 and result["output_specs"] == ["P(None, None, None, None)"], result
    assert result["all_gather_axes"] == [], result
