"""Pallas splash attention (the TPU flash-attention kernel) with ERNIE-Image's key-padding mask.

The kernel knows static masks and segment ids, not per-sample lengths, so the text padding becomes kv
segment ids: keys before `key_lengths[b]` are segment 0, later keys (and the kernel's own padding) segment
1, and every query is segment 0. Both sequences are padded to whole kernel blocks; padded keys are
masked by their segment and padded query rows are dropped from the output.

On CPU the kernel runs in Pallas interpret mode (slow, exact), which is how the tests check it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as pallas_splash

# With segment ids every query and key block must be a whole number of TPU lanes (128).
LANES = 128
# 128 for every forward and backward block: the kernel's own default, not tuned for ERNIE-Image.
DEFAULT_BLOCK_SIZES = pallas_splash.BlockSizes.get_default()
_VALID, _PADDED = 0, 1


def _lcm(*sizes: int | None) -> int:
    return math.lcm(*(s for s in sizes if s is not None))


def _check_block_sizes(block_sizes: pallas_splash.BlockSizes) -> None:
    named = {name: getattr(block_sizes, name) for name in (
        "block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute",
        "block_q_dq", "block_kv_dq")}
    bad = {name: size for name, size in named.items() if size is not None and (size <= 0 or size % LANES)}
    if bad:
        raise ValueError(f"splash attention block sizes must be positive multiples of {LANES}, got {bad}")
    if block_sizes.block_kv % block_sizes.block_kv_compute:
        raise ValueError(f"splash attention block_kv={block_sizes.block_kv} must be a multiple of "
                         f"block_kv_compute={block_sizes.block_kv_compute}")


def _check_shapes(query: jax.Array, key: jax.Array, value: jax.Array) -> None:
    if query.ndim != 4 or key.ndim != 4 or key.shape != value.shape:
        raise ValueError(f"splash attention needs query [B, T, H, D] and key/value [B, S, K, D] of equal shapes, "
                         f"got query {query.shape}, key {key.shape}, value {value.shape}")
    (b, _, h, d), (kb, _, k, kd) = query.shape, key.shape
    if b != kb or d != kd:
        raise ValueError(f"splash attention: query {query.shape} and key {key.shape} must share batch and head dim")
    if h % k:
        raise ValueError(f"splash attention: {k} key heads must divide {h} query heads (grouped-query attention)")


def _pad_sequence(x: jax.Array, length: int) -> jax.Array:
    """`[B, L, ...] -> [B, length, ...]` with zeros after the end."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def interpret_by_default() -> bool:
    """Interpret mode on CPU (tests); the compiled Mosaic kernel on TPU; other backends have no splash kernel."""
    backend = jax.default_backend()
    if backend not in ("cpu", "tpu"):
        raise ValueError(f"splash attention is a TPU kernel (interpreted on CPU); on {backend!r} use 'cudnn' or 'xla'")
    return backend == "cpu"


def splash_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    key_lengths: jax.Array | None,
    *,
    block_sizes: pallas_splash.BlockSizes = DEFAULT_BLOCK_SIZES,
    interpret: bool | None = None,
) -> jax.Array:
    """Splash attention `q [B, T, H, D], k/v [B, S, K, D] -> [B, T, H, D]`, scale 1/sqrt(D).

    Keys at positions >= key_lengths[b] (all keys when None) are masked. K may divide H (query head h
    reads key head h // (H / K)). T and S are padded up to whole blocks (every forward and backward block
    size in `block_sizes`, each a multiple of 128). `interpret=None` interprets on CPU and compiles on
    TPU (see `interpret_by_default`). The query is scaled in fp32 and rounded to its dtype before the
    kernel, which has no scale of its own.
    """
    _check_shapes(query, key, value)
    _check_block_sizes(block_sizes)
    if interpret is None:
        interpret = interpret_by_default()
    b, t, h, d = query.shape
    s = key.shape[1]
    q_block = _lcm(block_sizes.block_q, block_sizes.block_q_dkv, block_sizes.block_q_dq)
    kv_block = _lcm(block_sizes.block_kv, block_sizes.block_kv_dkv, block_sizes.block_kv_dq)
    t_padded, s_padded = -(-t // q_block) * q_block, -(-s // kv_block) * kv_block

    scaled = (query.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(query.dtype)
    heads_first = lambda x, length: _pad_sequence(x, length).transpose(0, 2, 1, 3)
    q, k, v = heads_first(scaled, t_padded), heads_first(key, s_padded), heads_first(value, s_padded)
    lengths = jnp.full((b,), s, jnp.int32) if key_lengths is None else key_lengths.astype(jnp.int32)
    key_positions = jnp.arange(s_padded, dtype=jnp.int32)[None, :]
    segment_ids = pallas_splash.SegmentIds(
        q=jnp.full((b, t_padded), _VALID, jnp.int32),
        kv=jnp.where(key_positions < lengths[:, None], _VALID, _PADDED).astype(jnp.int32))

    mask = pallas_splash.MultiHeadMask([pallas_splash.FullMask((t_padded, s_padded)) for _ in range(h)])
    kernel = pallas_splash.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
    out = jax.vmap(kernel)(q, k, v, segment_ids=segment_ids)  # [B, H, T_padded, D]
    return out[:, :, :t].transpose(0, 2, 1, 3)
