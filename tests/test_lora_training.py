"""LoRA adapters for training (ernie_jax.models.lora) and their export (conversions.lora.save_lora), against
diffusers' ErnieImagePipeline.load_lora_weights with peft."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

import ernie_jax
from conversions import lora as lora_files
from conversions.safetensors_io import CheckpointError, read_header
from ernie_jax import parallel
from ernie_jax.models import dit, layers, lora
from tests.conftest import TINY, relative_error
from tests.test_dit import make_inputs, reference_forward
from tests.test_lora import diffusers_with_lora

# rsLoRA rank 4 on stacked layers (names and a dotted suffix) and on text_proj; rank 2 by regex on three
# unstacked layers: the export needs a rank_pattern for them.
STACKED = lora.LoRAConfig(rank=4, alpha=6.0, use_rslora=True,
                          target_modules=("to_q", "self_attention.to_out.0", "mlp.up_proj", "text_proj"))
UNSTACKED = lora.LoRAConfig(rank=2, alpha=3.0,
                            target_modules=r"final_linear|adaLN_modulation\.1|time_embedding\.linear_1")


def adapted_transformer(folder, *configs, dtype="float32", seed=0, random_b=True):
    """The tiny transformer at `folder` with adapters for `configs`; lora_B random (not zero) when `random_b`."""
    model = ernie_jax.load_transformer(folder, dtype)
    names = lora_files.diffusers_names(model.config)
    rngs = nnx.Rngs(seed)
    for config in configs:
        lora.add_lora(model, config, rngs, names)
    if random_b:
        for i, (_, adapter) in enumerate(lora.adapters(model)):
            adapter.b[...] = 0.2 * jax.random.normal(jax.random.key(100 + i), adapter.b.shape)
    return model


def test_parity_with_diffusers_peft(tiny_folder, tmp_path):
    plain = ernie_jax.load_transformer(tiny_folder)
    plain_graphdef = nnx.graphdef(plain)
    model = adapted_transformer(tiny_folder, STACKED, UNSTACKED)
    path = tmp_path / "lora.safetensors"
    written = lora_files.save_lora(model, path)
    assert "layers.1.self_attention.to_out.0" in written and "adaLN_modulation.1" in written and len(written) == 10
    _, header = read_header(path)
    metadata = json.loads(header[lora_files.METADATA_KEY])
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 4
    assert metadata["transformer.rank_pattern"]["^final_linear"] == 2

    inputs = make_inputs(2, 4, 5, [6, 3], TINY["text_in_dim"])
    diffusers_lora = diffusers_with_lora(path)
    expected = reference_forward(diffusers_lora, *inputs)
    base = np.asarray(plain(*inputs))
    assert relative_error(expected, base) > 1e-2  # the adapters really change the output
    assert relative_error(np.asarray(model(*inputs)), expected) <= 1e-5
    merged = lora.merge_lora(model)
    assert not lora.adapters(merged) and lora.adapters(model)
    assert relative_error(np.asarray(merged(*inputs)), expected) <= 1e-5

    # Training gradients: ours w.r.t. a and b against peft's w.r.t. lora_A = a.T and lora_B = (scale * b).T.
    weights = np.random.default_rng(1).standard_normal(expected.shape).astype(np.float32)
    out = diffusers_lora(*[torch.from_numpy(x) for x in inputs], return_dict=False)[0]
    (out * torch.from_numpy(weights)).sum().backward()
    torch_grads = {name: p.grad.numpy() for name, p in diffusers_lora.named_parameters() if p.grad is not None}
    graphdef, adapters, base_state = nnx.split(model, lora.LoRAParam, ...)
    grads = jax.grad(lambda a: jnp.sum(nnx.merge(graphdef, a, base_state)(*inputs) * weights))(adapters)
    adapter_paths = {path for path, _ in nnx.to_flat_state(adapters)}
    assert {path for path, _ in nnx.to_flat_state(grads)} == adapter_paths and len(adapter_paths) == 2 * 7
    assert not any("lora" in path for path, _ in nnx.to_flat_state(base_state))
    grad_model = nnx.merge(graphdef, grads, base_state)
    names = lora_files.diffusers_names(model.config)
    for linear_path, adapter in lora.adapters(grad_model):
        name = names[linear_path]
        layer_names = [name.format(layer=i) for i in range(2)] if "{layer}" in name else [name]
        for i, module in enumerate(layer_names):
            index = (i,) if "{layer}" in name else ()
            grad_a = torch_grads[f"{module}.lora_A.test.weight"].T
            grad_b = torch_grads[f"{module}.lora_B.test.weight"].T * adapter.scale
            assert relative_error(np.asarray(adapter.a[...][index]), grad_a) <= 1e-4, module
            assert relative_error(np.asarray(adapter.b[...][index]), grad_b) <= 1e-4, module

    # The base with the adapters switched off: the plain model's graph on the same arrays (no second copy).
    off = lora.without_adapters(model)
    assert nnx.graphdef(off) == plain_graphdef
    assert off.layers.self_attention.to_q.kernel[...] is model.layers.self_attention.to_q.kernel[...]
    assert np.array_equal(np.asarray(off(*inputs)), base)
    assert np.array_equal(np.asarray(nnx.merge(plain_graphdef, base_state)(*inputs)), base)

    # Our loader merges the file into a plain model: the same kernels as merge_lora.
    assert sorted(lora_files.apply_lora(plain, path)) == written
    ours = nnx.to_flat_state(nnx.state(merged, nnx.Param))
    loaded = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    assert len(ours) == len(loaded)
    for param_path, variable in ours:
        assert relative_error(loaded[param_path][...], variable[...]) <= 1e-6, param_path


def test_fresh_adapter_changes_nothing(tiny_folder):
    base = ernie_jax.load_transformer(tiny_folder, "bfloat16")
    inputs = make_inputs(1, 3, 4, [5], TINY["text_in_dim"])
    expected = np.asarray(base(*inputs).astype(jnp.float32))
    model = adapted_transformer(tiny_folder, STACKED, UNSTACKED, dtype="bfloat16", random_b=False)
    for _, adapter in lora.adapters(model):
        a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
        bound = 1 / np.sqrt(a.shape[-2])  # PEFT's kaiming_uniform_(a=sqrt(5))
        assert a.dtype == b.dtype == np.float32
        assert 0.9 * bound < np.abs(a).max() <= bound and not b.any()
    assert np.array_equal(np.asarray(model(*inputs).astype(jnp.float32)), expected)


def test_adapters_shard_like_their_base():
    config = dit.PRESETS["tiny"]
    names = lora_files.diffusers_names(config)

    def build():
        model, rngs = dit.ErnieImageTransformer(config, rngs=nnx.Rngs(0)), nnx.Rngs(1)
        return lora.add_lora(lora.add_lora(model, STACKED, rngs, names), UNSTACKED, rngs, names)

    model = nnx.eval_shape(build)
    # The fsdp x tensor mesh of 8 devices, abstract: shardings need no devices.
    mesh = AbstractMesh((1, 4, 1, 2), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    shardings = parallel.state_shardings(nnx.state(model), mesh, parallel.TRAINING_RULES)
    specs = {path: sharding.spec for path, sharding in nnx.to_flat_state(shardings)}
    assert specs[("layers", "self_attention", "to_q", "kernel")] == PartitionSpec(None, "fsdp", "tensor")
    assert specs[("layers", "self_attention", "to_q", "lora", "a")] == PartitionSpec(None, "fsdp", None)
    assert specs[("layers", "self_attention", "to_q", "lora", "b")] == PartitionSpec(None, None, "tensor")
    split = 0
    for path, _ in lora.adapters(model):
        kernel = tuple(specs[path + ("kernel",)])
        assert specs[path + ("lora", "a")] == PartitionSpec(*kernel[:-1], None), path
        assert specs[path + ("lora", "b")] == PartitionSpec(*kernel[:-2], None, kernel[-1]), path
        split += any(axis is not None for axis in kernel)
    assert split == 7  # every adapted kernel but final_linear's (embed, conv_out) is split on this mesh


def test_bad_configs(tiny_folder, tmp_path):
    bad = [
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=4.0), "rank must be a positive integer"),
        (dict(rank=4, alpha=-1), "alpha must be a positive number"),
        (dict(rank=4, dropout=1.5), r"dropout must be in \[0, 1\]"),
        (dict(rank=4, target_modules=()), "non-empty sequence"),
        (dict(rank=4, target_modules=("to_q", "")), "non-empty sequence"),
        (dict(rank=4, target_modules="to_(q"), "not a valid regular expression"),
    ]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            lora.LoRAConfig(**fields)
    model = ernie_jax.load_transformer(tiny_folder)
    names = lora_files.diffusers_names(model.config)
    with pytest.raises(ValueError, match=r"\['to_qq', 'to_out'\] match no Linear layer"):
        lora.add_lora(model, lora.LoRAConfig(rank=2, target_modules=("to_q", "to_qq", "to_out")), nnx.Rngs(0), names)
    with pytest.raises(ValueError, match="match no Linear layer"):
        lora.add_lora(model, lora.LoRAConfig(rank=2, target_modules=r"norm_q"), nnx.Rngs(0), names)
    with pytest.raises(ValueError, match="select 1 of the 2 stacked layers of layers.{layer}.mlp.up_proj"):
        lora.add_lora(model, lora.LoRAConfig(rank=2, target_modules=r"layers\.0\.mlp\.up_proj"), nnx.Rngs(0), names)
    assert not lora.adapters(model)  # a refused config attaches nothing
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora_files.save_lora(model, tmp_path / "none.safetensors")
    lora.add_lora(model, lora.LoRAConfig(rank=2, target_modules=("to_q",)), nnx.Rngs(0), names)
    with pytest.raises(ValueError, match="layers.{layer}.self_attention.to_q already has a LoRA adapter"):
        lora.add_lora(model, lora.LoRAConfig(rank=2, target_modules=("to_q",)), nnx.Rngs(0), names)
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"")
    with pytest.raises(CheckpointError, match="already exists"):
        lora_files.save_lora(model, existing)


class TwoLayers(nnx.Module):
    """Two stacked Linears `[2, 8, 8]` then a plain one, for dropout on both kinds of adapter."""

    def __init__(self, rngs):
        kw = dict(use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32)
        self.stack = layers.create_stacked(
            lambda layer_rngs: layers.linear(8, 8, axes=("embed", "mlp"), rngs=layer_rngs, **kw), 2, rngs)
        self.head = layers.linear(8, 8, axes=("mlp", "embed"), rngs=rngs, **kw)

    def __call__(self, x):
        x, _ = layers.run_stacked(self.stack, lambda layer, h, _: (layer(h), None), x, remat="none", scan=True)
        return self.head(x)


def dropout_model(rate, *, identity=False):
    """TwoLayers with rank-8 adapters (scale 1) on every layer; with `identity` the base is zero and each
    adapter's A @ B the identity, so the model computes dropout(dropout(dropout(x))). Built in one compiled
    program (op by op it takes seconds)."""
    return nnx.jit(lambda: _build_dropout_model(rate, identity))()


def _build_dropout_model(rate, identity):
    model = lora.add_lora(TwoLayers(nnx.Rngs(0)), lora.LoRAConfig(rank=8, target_modules=("stack", "head"),
                                                                   dropout=rate), nnx.Rngs(1))
    for i, (path, adapter) in enumerate(lora.adapters(model)):
        if identity:
            linear = model.head if path == ("head",) else model.stack
            linear.kernel[...] = jnp.zeros_like(linear.kernel[...])
            linear.bias[...] = jnp.zeros_like(linear.bias[...])
            adapter.a[...] = adapter.b[...] = jnp.broadcast_to(jnp.eye(8), adapter.a.shape)
        else:
            adapter.b[...] = jax.random.normal(jax.random.key(i), adapter.b.shape)
    return model


def test_dropout_only_in_training_mode():
    x = jax.random.uniform(jax.random.key(7), (64, 8), minval=1.0, maxval=2.0)
    model = dropout_model(0.5, identity=True)
    assert np.array_equal(model(x), x)  # adapters start in inference mode
    model.train()
    with pytest.raises(ValueError, match="set_training"):
        model(x)
    forward = jax.jit(lambda state, key: lora.set_training(nnx.merge(*state), key)(x))
    state = nnx.split(model)
    first = forward(state, jax.random.key(0))
    assert np.array_equal(forward(state, jax.random.key(0)), first)
    assert not np.array_equal(forward(state, jax.random.key(1)), first)
    # Three independent inverted-dropout masks: each element survives with probability 1/8, scaled by 2^3.
    ratio = np.asarray(first / x)
    kept = np.isclose(ratio, 8.0, rtol=1e-6)
    assert np.all(kept | (ratio == 0)) and 64 - 25 < kept.sum() < 64 + 25, kept.sum()
    lora.set_training(model, None)
    assert np.array_equal(model(x), x)

    everything_dropped = lora.set_training(dropout_model(1.0), jax.random.key(3))
    base = lora.without_adapters(everything_dropped)(x)
    assert np.array_equal(everything_dropped(x), base)
    assert relative_error(lora.set_training(everything_dropped, None)(x), base) > 1e-2
