"""Runs the tiny DiT forward with context-parallel meshes and prints, as JSON, per case: the largest relative
error against the single-device "xla" forward, and what the traced program does with attention (the
shard_map's output spec, its all-gathers and their mesh axes, the Pallas calls inside it). Also: Mistral-style
masked grouped-query attention, and attention gradients, sharded against one device.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/workers/sharded_attention.py
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np
from flax import nnx

from ernie_jax import parallel
from ernie_jax.models import layers
from ernie_jax.models.dit import PRESETS, init_transformer
from tests.workers.common import relative_error

# RoPE on the first 64 of each head's 128 channels (heads split over tensor, channels never split).
PARTIAL_ROTARY = dataclasses.replace(PRESETS["tiny"], rope_axes_dim=(16, 24, 24))
# (mesh, attention implementation, padded text length, model config): 16x16 latents are 256 image tokens, so
# text of 8 makes S = 264, which 2, 4 and 8 divide; text of 7 makes S = 263, which no context size divides.
CASES = {
    "context=2,fsdp=4": ({"context": 2, "fsdp": 4}, "xla", 8, PRESETS["tiny"]),
    "context=4,tensor=2": ({"context": 4, "tensor": 2}, "xla", 8, PRESETS["tiny"]),
    "context=8": ({"context": 8}, "xla", 8, PRESETS["tiny"]),
    "context=8,S=263": ({"context": 8}, "xla", 7, PRESETS["tiny"]),
    "splash:context=2,fsdp=4": ({"context": 2, "fsdp": 4}, "splash", 8, PRESETS["tiny"]),
    "splash:context=4,tensor=2": ({"context": 4, "tensor": 2}, "splash", 8, PRESETS["tiny"]),
    "partial_rotary:splash:context=4,tensor=2": ({"context": 4, "tensor": 2}, "splash", 8, PARTIAL_ROTARY),
}


def inputs(text_len: int, batch: int = 4, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 128, 16, 16), np.float32), rng.uniform(0, 1000, batch).astype(np.float32),
            rng.standard_normal((batch, text_len, 64), np.float32), rng.integers(1, text_len + 1, batch))


def equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in it (scan, remat, shard_map, pjit bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from equations(sub)


def attention_program(jaxpr) -> dict:
    """The shard_maps of a traced forward: their output specs (the query's) and what runs inside them."""
    shard_maps = [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "shard_map"]
    inside = [e for eqn in shard_maps for e in equations(eqn.params["jaxpr"])]
    return {"shard_maps": len(shard_maps),
            "output_specs": sorted({str(eqn.params["out_specs"][0]) for eqn in shard_maps}),
            "all_gather_axes": [list(e.params["axis_name"]) for e in inside if e.primitive.name == "all_gather"],
            "pallas_calls": sum(e.primitive.name == "pallas_call" for e in inside)}


def masked_grouped_attention(kv_heads: int) -> dict:
    """Mistral-style attention (grouped heads, causal mask, no key lengths) on data=2,context=2,tensor=2:
    heads split over tensor only where both 4 query heads and `kv_heads` divide."""
    rng = np.random.default_rng(1)
    query = rng.standard_normal((4, 16, 4, 8), np.float32)
    key, value = (rng.standard_normal((4, 16, kv_heads, 8), np.float32) for _ in range(2))
    mask = np.broadcast_to(np.tril(np.ones((16, 16), bool)), (4, 1, 16, 16))
    expected = layers.attention(query, key, value, None, mask=mask)
    mesh = parallel.make_mesh({"data": 2, "context": 2, "tensor": 2})
    function = parallel.jit_sharded(lambda q, k, v, m: layers.attention(q, k, v, None, mask=m), mesh,
                                    parallel.TRAINING_RULES, None, None)
    traced = function.trace(query, key, value, mask)
    return dict(error=relative_error(traced.lower().compile()(query, key, value, mask), expected),
                **attention_program(traced.jaxpr.jaxpr))


def attention_gradients(implementation: str, kv_heads: int) -> dict:
    """Gradients of a weighted sum of attention (key lengths, grouped heads) with respect to query, key and
    value on data=2,context=2,tensor=2, against one device (the gather's transpose is a reduce-scatter)."""
    rng = np.random.default_rng(2)
    query, weights = (rng.standard_normal((4, 16, 4, 8), np.float32) for _ in range(2))
    key, value = (rng.standard_normal((4, 16, kv_heads, 8), np.float32) for _ in range(2))
    key_lengths = np.array([3, 16, 9, 12])
    loss = lambda q, k, v: (layers.attention(q, k, v, key_lengths, implementation) * weights).sum()
    gradients = jax.grad(loss, argnums=(0, 1, 2))
    expected = jax.jit(gradients)(query, key, value)
    mesh = parallel.make_mesh({"data": 2, "context": 2, "tensor": 2})
    actual = parallel.jit_sharded(gradients, mesh, parallel.TRAINING_RULES, None, None)(query, key, value)
    return {"error": max(relative_error(a, e) for a, e in zip(actual, expected, strict=True))}


def forward_fn(graphdef):
    return lambda state, *args: nnx.merge(graphdef, state)(*args)


def main():
    rules = parallel.TRAINING_RULES
    expected = {}
    results = {}
    for name, (sizes, implementation, text_len, config) in CASES.items():
        graphdef, state = nnx.split(init_transformer(config))
        args = inputs(text_len)
        if (text_len, config) not in expected:
            expected[text_len, config] = np.asarray(jax.jit(forward_fn(graphdef))(state, *args))
        # The same weights; only the attention implementation differs.
        impl_graphdef, _ = nnx.split(init_transformer(config, attention_impl=implementation))
        mesh = parallel.make_mesh(sizes)
        state_spec = parallel.state_shardings(state, mesh, rules)
        batch = [parallel.batch_sharding(mesh, rules, np.shape(a)) for a in args]
        function = parallel.jit_sharded(forward_fn(impl_graphdef), mesh, rules, (state_spec, *batch), batch[0])
        start = time.perf_counter()
        traced = function.trace(jax.device_put(state, state_spec), *args)
        output = traced.lower().compile()(jax.device_put(state, state_spec), *args)
        seconds = time.perf_counter() - start
        results[name] = dict(error=relative_error(output, expected[text_len, config]), seconds=seconds,
                             **attention_program(traced.jaxpr.jaxpr))
    for kv_heads in (2, 1):
        results[f"grouped_causal:kv_heads={kv_heads}"] = masked_grouped_attention(kv_heads)
        for implementation in ("xla", "splash"):
            results[f"gradients:{implementation}:kv_heads={kv_heads}"] = attention_gradients(implementation, kv_heads)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
