"""Plain calls of the models (`model(...)`, `vae.decode(...)`, `text_encoder.encode(...)` outside any
transformation) run compiled once per input signature (ernie_jax/models/compiled.py), compute what the traced
math computes, see parameter changes, and leave jax.jit / grad / vmap / nnx transforms working.

Traces are counted by wrapping a function that each model's math calls exactly once per run of its Python
code: a plain call that reuses its compiled program does not run it again.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ernie_jax
from conversions import lora
from conversions.vae import load_vae
from ernie_jax.models import layers, mistral
from ernie_jax.models import vae as V
from ernie_jax.models.compiled import compiled_method
from tests.conftest import TINY, relative_error, run_worker
from tests.test_dit import make_inputs
from tests.test_lora import diffusers_with_lora, peft_lora, write_lora
from tests.test_vae import reference_vae

REPO = Path(__file__).resolve().parents[1]
# XLA fuses the elementwise work of the compiled program, so its rounding differs from running the same
# operations one by one (under jax.disable_jit, today's plain call): measured 2.3e-7 (DiT), 1.4e-7 (text encoder).
OP_BY_OP_TOLERANCE = 1e-6


def counting(monkeypatch, owner, name: str):
    """Replaces `owner.name` by a wrapper that counts its calls; returns the counter (a list of one int).

    Empties JAX's compilation caches first: the compiled plain call's cache is per process, and another test
    file on the same pytest worker may already have compiled the signature this test counts.
    """
    jax.clear_caches()
    original = getattr(owner, name)
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return count


@pytest.fixture
def dit_traces(monkeypatch):
    """How often the DiT's math has run as Python (once per trace, or per call when run op by op)."""
    return counting(monkeypatch, layers, "timestep_sinusoid")


def traced(model):
    """The model's forward inside the caller's own jax.jit, parameters passed through nnx.split."""
    graphdef, state = nnx.split(model)
    return lambda *inputs: jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *inputs)


def test_dit_plain_call_compiles_once_per_shape_and_equals_the_traced_math(tiny_folder, tiny_reference,
                                                                          dit_traces):
    model = ernie_jax.load_transformer(tiny_folder)
    inputs = make_inputs(2, 4, 5, [5, 2], TINY["text_in_dim"])
    first = np.asarray(model(*inputs))
    again = np.asarray(model(*[np.copy(x) for x in inputs]))
    assert dit_traces[0] == 1  # the second call with the same shapes reused the program
    np.testing.assert_array_equal(again, first)
    # The same program as the caller's own jit of the same math, so the same bits.
    np.testing.assert_array_equal(np.asarray(traced(model)(*inputs)), first)
    with jax.disable_jit():
        op_by_op = np.asarray(model(*inputs))
    assert relative_error(first, op_by_op) <= OP_BY_OP_TOLERANCE
    with torch.no_grad():
        expected = tiny_reference(*[torch.from_numpy(x) for x in inputs], return_dict=False)[0].numpy()
    assert relative_error(first, expected) <= 1e-5  # measured 1.4e-6, as op by op

    calls = dit_traces[0]
    other = make_inputs(1, 3, 6, [4], TINY["text_in_dim"], seed=1)
    other_first = np.asarray(model(*other))
    assert dit_traces[0] == calls + 1  # a new shape compiles anew
    np.testing.assert_array_equal(np.asarray(model(*other)), other_first)
    np.testing.assert_array_equal(np.asarray(model(*inputs)), first)
    assert dit_traces[0] == calls + 1  # both programs stay cached


def test_dit_plain_call_uses_changed_parameters_and_settings(tiny_folder, tmp_path, dit_traces):
    model = ernie_jax.load_transformer(tiny_folder)
    inputs = make_inputs(2, 4, 5, [6, 3], TINY["text_in_dim"])
    before = np.asarray(model(*inputs))

    # Values updated in place: the same program, with the new values.
    nnx.update(model, jax.tree.map(lambda a: a * 1.1, nnx.state(model, nnx.Param)))
    scaled = np.asarray(model(*inputs))
    assert dit_traces[0] == 1
    np.testing.assert_array_equal(scaled, np.asarray(traced(model)(*inputs)))
    assert relative_error(scaled, before) > 1e-2

    # A parameter replaced by a new variable.
    model.final_linear.bias = nnx.Param(model.final_linear.bias[...] + 1.0)
    shifted = np.asarray(model(*inputs))
    np.testing.assert_array_equal(shifted, np.asarray(traced(model)(*inputs)))
    assert relative_error(shifted, scaled + 1.0) <= 1e-6

    # A LoRA merged into a model whose plain call is already compiled: diffusers' numbers with the LoRA.
    model = ernie_jax.load_transformer(tiny_folder)
    model(*inputs)
    state, metadata = peft_lora(r=4, lora_alpha=8)
    path = write_lora(tmp_path / "lora.safetensors", state, metadata)
    lora.apply_lora(model, path)
    with torch.no_grad():
        expected = diffusers_with_lora(path)(*[torch.from_numpy(x) for x in inputs], return_dict=False)[0].numpy()
    assert relative_error(np.asarray(model(*inputs)), expected) <= 1e-5
    assert relative_error(expected, before) > 1e-2

    # The module's settings are part of the program: unrolled layers trace anew.
    calls = dit_traces[0]
    model.scan_layers = False
    unrolled = np.asarray(model(*inputs))
    assert dit_traces[0] == calls + 1
    assert relative_error(unrolled, expected) <= 1e-5


def test_dit_inside_jit_grad_vmap_and_nnx_transforms(tiny_folder, tiny_reference):
    model = ernie_jax.load_transformer(tiny_folder)
    latents, timesteps, text, text_lens = make_inputs(2, 3, 4, [5, 2], TINY["text_in_dim"])
    weights = np.random.default_rng(2).standard_normal((2, 128, 3, 4)).astype(np.float32)
    model(latents, timesteps, text, text_lens)  # a compiled plain call first must not disturb what follows

    # diffusers' gradients of sum(velocity * weights) for the input and two weights.
    torch_latents = torch.from_numpy(latents).requires_grad_(True)
    tiny_reference.zero_grad()
    velocity = tiny_reference(torch_latents, torch.from_numpy(timesteps), torch.from_numpy(text),
                              torch.from_numpy(text_lens), return_dict=False)[0]
    (velocity * torch.from_numpy(weights)).sum().backward()
    expected_latents = torch_latents.grad.numpy()
    expected_final = tiny_reference.final_linear.weight.grad.numpy().T
    expected_to_q = tiny_reference.layers[1].self_attention.to_q.weight.grad.numpy().T
    tiny_reference.zero_grad()

    loss = lambda m, x: jnp.sum(m(x, timesteps, text, text_lens) * weights)
    graphdef, params = nnx.split(model)
    # Parameters (through nnx.split / merge) and the input differentiated inside the caller's jax.jit.
    jax_param_grads, latents_grad = jax.jit(jax.grad(lambda p, x: loss(nnx.merge(graphdef, p), x), argnums=(0, 1)))(
        params, latents)
    nnx_param_grads = nnx.jit(nnx.grad(lambda m: loss(m, latents)))(model)
    # Measured against torch: 2.1e-6 (latents), 2.5e-6 (final_linear), 3.4e-6 (to_q) relative.
    assert relative_error(latents_grad, expected_latents) <= 1e-5
    for grads in (jax_param_grads, nnx_param_grads):
        assert relative_error(grads["final_linear"]["kernel"][...], expected_final) <= 1e-5
        assert relative_error(grads["layers"]["self_attention"]["to_q"]["kernel"][...][1], expected_to_q) <= 1e-5

    batched = np.asarray(model(latents, timesteps, text, text_lens))
    one_at_a_time = jax.jit(jax.vmap(lambda x, t, c, n: model(x[None], t[None], c[None], n[None])[0]))(
        latents, timesteps, text, text_lens)
    assert relative_error(one_at_a_time, batched) <= 1e-6  # measured 0


def test_a_compiled_method_may_not_change_its_module():
    class Accumulator(nnx.Module):
        def __init__(self):
            self.total = nnx.Variable(jnp.zeros(()))

        @compiled_method
        def add(self, x):
            self.total[...] = self.total[...] + jnp.sum(x)
            return x

    with pytest.raises(ValueError, match="Accumulator.add changes its module's variables"):
        Accumulator().add(jnp.ones(3))


def test_vae_plain_calls_compile_once_per_shape_and_tile_size(monkeypatch, tmp_path):
    reference_vae().save_pretrained(tmp_path)  # loading the tiny reference is much cheaper than init_vae
    model = load_vae(tmp_path)
    decodes = counting(monkeypatch, V.Decoder, "__call__")
    encodes = counting(monkeypatch, V.Encoder, "__call__")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 32, 6, 5)).astype(np.float32)
    images = rng.uniform(-1, 1, (1, 3, 24, 16)).astype(np.float32)

    decoded = np.asarray(model.decode(z))
    np.testing.assert_array_equal(np.asarray(model.decode(z)), decoded)
    model.encode(images)
    model.encode(images)
    assert (decodes[0], encodes[0]) == (1, 1)
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s).decode(x))(state, z)), decoded)
    # tile_size is static: another value is another program (here one that fits the latent, so no tiles).
    untiled = np.asarray(model.decode(z, tile_size=8))
    model.decode(z, tile_size=8)
    assert decodes[0] == 3
    np.testing.assert_array_equal(untiled, decoded)


def test_text_encoder_plain_calls_compile_once_per_shape(monkeypatch):
    config = mistral.MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = mistral.init_model(config)
    traces = counting(monkeypatch, mistral, "rope_cos_sin")
    ids = np.random.default_rng(0).integers(0, 512, (2, 7))
    lengths = np.array([7, 4])

    features = np.asarray(model.encode(ids, lengths))
    np.testing.assert_array_equal(np.asarray(model.encode(ids, lengths)), features)
    logits = np.asarray(model(ids, lengths))
    np.testing.assert_array_equal(np.asarray(model(ids, lengths)), logits)
    assert traces[0] == 2  # one program each for encode and the causal-LM forward
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda s, *a: nnx.merge(graphdef, s).encode(*a))(state, ids, lengths)), features)
    with jax.disable_jit():
        op_by_op = np.asarray(model(ids, lengths))
    assert relative_error(logits, op_by_op) <= OP_BY_OP_TOLERANCE

    positions = np.broadcast_to(np.arange(7), (2, 7))
    calls = traces[0]
    one_layer, _ = model.hidden_states(ids, positions, lengths, num_layers=1)
    model.hidden_states(ids, positions, lengths, num_layers=1)
    model.hidden_states(ids, positions, lengths, num_layers=2)
    assert traces[0] == calls + 2  # num_layers is static: one program per value
    assert relative_error(one_layer, features) > 1e-2


def test_dit_plain_call_under_a_mesh_and_activation_sharding(tiny_folder):
    report = run_worker("sharded_plain_call.py", str(tiny_folder), timeout=600)
    assert report["gate_proj_shard"] == [2, 64, 256]  # the parameters really are split (fsdp=4, tensor=2)
    assert report["sharded"] <= 1e-5 and report["constrained"] <= 1e-5, report
    # Sharded parameters compile anew; inside activation_sharding (another trace context) anew again; back
    # outside it, the first sharded program is reused.
    assert report["traces"] == [1, 2, 2, 3, 3, 3], report
