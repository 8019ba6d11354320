"""The Mistral / Ministral-3 decoder (text encoder and PE) against transformers on tiny random models."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conversions import checkpoint_files as files
from conversions import mistral as weights
from conversions.safetensors_io import CheckpointError, TensorSource, write_safetensors
from ernie_jax.models import mistral
from ernie_jax.models.mistral import MistralConfig
from tests.conftest import relative_error

FP32_TOLERANCE = 1e-5
# bf16 text features, JAX vs torch both in bf16 on CPU: measured 8.9e-3 to 1.23e-2 over five 24-token prompts
# (1.23e-2 for the one tested), while each bf16 run is 8.5e-3 to 1.5e-2 away from fp32 (rounding inside fused
# ops and accumulation order differ; the tiny random model amplifies them).
BF16_TOLERANCE = 2e-2

YARN = dict(rope_type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=16384, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, vocab_size=131072, rms_norm_eps=1e-5, max_position_embeddings=262144, sliding_window=None,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
VISION = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              head_dim=16, patch_size=14, image_size=28)


def randomise(model, seed, projection_std):
    """Norms perturbed (they start at 1) and projections redrawn with a larger std: at transformers' init
    (0.02) the layers barely move the residual stream, and the tied-embedding LM repeats one token greedily."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
            elif "language_model" in name or name.startswith("model."):
                if "proj" in name:
                    param.normal_(0.0, projection_std)
    return model.eval()


def reference_text_encoder(seed=0, projection_std=0.1):
    from transformers import Mistral3Config, Mistral3Model

    torch.manual_seed(seed)
    config = Mistral3Config(text_config=dict(model_type="mistral", rope_parameters=dict(YARN), **TEXT),
                            vision_config=VISION)
    return randomise(Mistral3Model(config), seed + 100, projection_std)


def reference_pe(seed=0, **rope_overrides):
    from transformers import Ministral3Config, Ministral3ForCausalLM

    torch.manual_seed(seed)
    config = Ministral3Config(rope_parameters={**YARN, **rope_overrides}, pad_token_id=11,
                              **{k: v for k, v in TEXT.items() if k != "sliding_window"})
    return randomise(Ministral3ForCausalLM(config), seed + 100, 0.2)


def prompt(length, seed=0):
    # Token 11 is the PE's pad id, which transformers' generate would mask out of an unmasked prompt.
    return np.random.default_rng(seed).integers(12, 131072, (1, length))


def reference_features(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), output_hidden_states=True).hidden_states[-2][0].float().numpy()


@pytest.fixture(scope="module")
def te_reference():
    return reference_text_encoder()


@pytest.fixture(scope="module")
def te_folder(te_reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_encoder")
    te_reference.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def te_model(te_folder):
    return weights.load_text_encoder(te_folder)


@pytest.fixture(scope="module")
def pe_reference():
    return reference_pe()


@pytest.fixture(scope="module")
def pe_folder(pe_reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pe")
    pe_reference.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pe_model(pe_folder):
    return weights.load_prompt_enhancer(pe_folder)


# ------------------------------------------------------------------------------------------------ text encoder


def test_yarn_frequencies_match_transformers(te_reference):
    inv_freq, attention_factor = MistralConfig.from_hf_config(te_reference.config.to_dict()).inverse_frequencies()
    rotary = te_reference.language_model.rotary_emb
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=0, atol=0)
    assert attention_factor == rotary.attention_scaling == 1.0


@pytest.mark.parametrize("length", [1, 7, 40])
def test_text_encoder_matches_transformers_fp32(te_reference, te_model, length):
    # 40 positions: angles of the YaRN-blended dims (20..37 of 64 at real size) are past a full turn.
    ids = prompt(length, seed=length)
    expected = reference_features(te_reference, ids)
    actual = te_model.encode(ids, np.array([length]))
    assert actual.dtype == jnp.float32
    assert relative_error(np.asarray(actual)[0], expected) <= FP32_TOLERANCE


def test_batched_prompts_equal_prompts_alone(te_model):
    lengths = [40, 1, 9]
    ids = np.zeros((3, 40), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = prompt(n, seed=i)
    ids[1:, 40 - 5:] = 77  # padding values must not matter
    batched = np.asarray(te_model.encode(ids, np.array(lengths)))
    for i, n in enumerate(lengths):
        alone = np.asarray(te_model.encode(ids[i:i + 1, :n], np.array([n])))[0]
        assert relative_error(batched[i, :n], alone) <= 1e-6


def test_text_encoder_bf16_drift(te_reference, te_folder):
    ids = prompt(24, seed=3)
    fp32 = reference_features(te_reference, ids)
    bf16_reference = reference_features(reference_text_encoder().to(torch.bfloat16), ids)
    actual = weights.load_text_encoder(te_folder, "bfloat16").encode(ids, np.array([24]))
    assert actual.dtype == jnp.bfloat16
    error = relative_error(np.asarray(actual, np.float32)[0], bf16_reference)
    assert error <= BF16_TOLERANCE, error
    assert relative_error(bf16_reference, fp32) > 1e-4  # a real bf16 run


def rewrite(folder, destination, rename, drop=lambda key: False):
    """Copies a checkpoint with renamed / dropped keys (other layouts of the same weights)."""
    destination.mkdir()
    source = files.open_weights(folder, "model.safetensors")
    write_safetensors(destination / "model.safetensors",
                      {rename(k): np.array(source[k]) for k in source.keys() if not drop(k)})
    (destination / "config.json").write_text((folder / "config.json").read_text())
    return destination


def test_text_encoder_layouts_load_silently(te_folder, te_model, tmp_path, caplog):
    ids = prompt(6)
    expected = np.asarray(te_model.encode(ids, np.array([6])))
    keys = TensorSource([te_folder / "model.safetensors"]).keys()
    assert any(k.startswith("vision_tower.") for k in keys)
    assert any(k.startswith("multi_modal_projector.") for k in keys)
    # transformers 5 saves Mistral3Model in the legacy layout (language_model.model.*); the others are the
    # in-memory names and Mistral3ForConditionalGeneration's.
    assert "language_model.model.embed_tokens.weight" in keys
    plain = lambda k: k.replace("language_model.model.", "language_model.")
    layouts = {
        "plain": (plain, lambda k: False),
        "conditional_generation": (lambda k: "model." + plain(k), lambda k: False),
        "without_unused_layer": (lambda k: k, lambda k: k.startswith(("language_model.model.layers.2.",
                                                                      "language_model.model.norm."))),
    }
    with caplog.at_level(logging.WARNING):
        loaded = [weights.load_text_encoder(te_folder)]
        for name, (rename, drop) in layouts.items():
            loaded.append(weights.load_text_encoder(rewrite(te_folder, tmp_path / name, rename, drop)))
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    for model in loaded:
        np.testing.assert_array_equal(np.asarray(model.encode(ids, np.array([6]))), expected)


def test_text_encoder_checkpoint_errors(te_folder, tmp_path):
    folder = rewrite(te_folder, tmp_path / "missing", lambda k: k, lambda k: k.endswith("layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="1 missing tensors \\(layers.1.mlp.up_proj.weight\\)"):
        weights.load_text_encoder(folder)
    config = json.loads((te_folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    folder = rewrite(te_folder, tmp_path / "extra", lambda k: k)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="tensors the config does not expect"):
        weights.load_text_encoder(folder)


def test_converted_folders_and_state_dicts_round_trip(te_reference, te_model, pe_reference, pe_model, tmp_path):
    for model, reference in ((te_model, te_reference), (pe_model, pe_reference)):
        exported = weights.state_dict(model)
        expected = {k: v.numpy() for k, v in reference.state_dict().items()}
        if model.encoder_only:  # the last layer and final norm are never loaded, so never exported
            expected = {k: v for k, v in expected.items() if k.startswith("language_model.")
                        and not k.startswith(("language_model.layers.2.", "language_model.norm."))}
        else:  # tied head: transformers reports it, the checkpoint need not hold it
            expected.pop("lm_head.weight")
        assert sorted(exported) == sorted(expected)
        for key, value in exported.items():
            np.testing.assert_array_equal(value, expected[key])
        folder = tmp_path / ("te" if model.encoder_only else "pe")
        folder.mkdir()
        config = {**weights.hf_config(model), files.CONVERTED_FORMAT_KEY: 1, files.CONVERTED_DTYPE_KEY: "float32"}
        (folder / "config.json").write_text(json.dumps(config))
        files.save_params(folder, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        load = weights.load_text_encoder if model.encoder_only else weights.load_prompt_enhancer
        restored = load(folder)
        assert restored.config == model.config
        for a, b in zip(jax.tree.leaves(nnx.state(restored)), jax.tree.leaves(nnx.state(model)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------ PE


def test_pe_logits_match_transformers_fp32(pe_reference, pe_model):
    ids = prompt(21, seed=5)
    with torch.no_grad():
        expected = pe_reference(torch.from_numpy(ids)).logits.numpy()
    assert relative_error(np.asarray(pe_model(ids)), expected) <= FP32_TOLERANCE


def test_kv_cache_decode_equals_full_recompute(pe_model):
    ids = prompt(12, seed=6)
    full = np.asarray(pe_model(ids))[0]
    graphdef, state = nnx.split(pe_model)

    @jax.jit
    def run(state, ids, positions, cache, write_start):
        model = nnx.merge(graphdef, state)
        hidden, cache = model.hidden_states(ids, positions, positions[:, -1] + 1, cache=cache, write_start=write_start)
        return model.logits(hidden)[0], cache

    logits, cache = run(state, ids[:, :5], np.arange(5)[None], pe_model.init_cache(1, 16), np.array([0]))
    steps = [logits]
    for t in range(5, 12):
        logits, cache = run(state, ids[:, t:t + 1], np.array([[t]]), cache, np.array([t]))
        steps.append(logits)
    assert relative_error(np.concatenate(steps), full) <= 1e-6


def reference_generate(model, ids, max_new_tokens, **kwargs):
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                             do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("original_max", [16384, 8])
def test_greedy_generation_matches_transformers(tmp_path, original_max):
    # original_max_position_embeddings = 8 puts positions 8.. under the Llama-4 query scale (and changes YaRN).
    reference = reference_pe(seed=7, original_max_position_embeddings=original_max)
    reference.save_pretrained(tmp_path)
    model = weights.load_prompt_enhancer(tmp_path)
    ids = prompt(6, seed=8)
    expected = reference_generate(reference, ids, 12)
    np.testing.assert_array_equal(mistral.generate(model, ids, max_new_tokens=12, do_sample=False), expected)
    assert len(set(expected[0])) > 4  # not a degenerate repetition
    # Make a later generated token the eos: generation stops at its first occurrence and includes it.
    stop = next(i for i in range(3, 12) if expected[0, i] not in expected[0, :i])
    eos = int(expected[0, stop])
    expected = reference_generate(reference, ids, 12, eos_token_id=eos)
    actual = mistral.generate(model, ids, max_new_tokens=12, temperature=0.0, eos_token_id=eos)
    np.testing.assert_array_equal(actual, expected)
    assert actual.shape == (1, stop + 1) and actual[0, -1] == eos


def test_batched_generation_equals_prompts_alone(pe_model):
    ids = np.zeros((2, 9), np.int64)
    ids[0], ids[1, :4] = prompt(9, seed=9)[0], prompt(4, seed=10)[0]
    eos = int(mistral.generate(pe_model, ids[1:, :4], max_new_tokens=6, do_sample=False)[0, 2])
    batched = mistral.generate(pe_model, ids, [9, 4], max_new_tokens=6, do_sample=False, eos_token_id=eos)
    for i, n in enumerate([9, 4]):
        alone = mistral.generate(pe_model, ids[i:i + 1, :n], max_new_tokens=6, do_sample=False, eos_token_id=eos)
        np.testing.assert_array_equal(batched[i, :alone.shape[1]], alone[0])
        assert (batched[i, alone.shape[1]:] == 11).all()  # the config's pad after eos


def test_seeded_sampling_is_reproducible_and_compiles_once(pe_model):
    sample = lambda ids, seed: mistral.generate(pe_model, ids, max_new_tokens=8, temperature=0.9, top_k=40,
                                                top_p=0.9, seed=seed)
    ids = prompt(10, seed=11)
    first = sample(ids, 0)
    compiled = mistral._generate_jit._cache_size()
    np.testing.assert_array_equal(sample(ids, 0), first)
    sample(prompt(30, seed=12), 1)  # another length in the same 64-token bucket
    mistral.generate(pe_model, ids, max_new_tokens=8, do_sample=False)  # greedy: the same program
    assert mistral._generate_jit._cache_size() == compiled
    draws = {tuple(sample(ids, seed)[0]) for seed in range(4)}
    assert len(draws) > 1


WARPER_SETTINGS = [(1.0, 50, 1.0), (0.6, 50, 0.95), (1.3, 0, 0.5), (0.7, 5, 0.999), (1.0, 3000, 0.3), (2.0, 1, 0.9)]


@pytest.mark.parametrize("temperature,top_k,top_p", WARPER_SETTINGS)
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(int(temperature * 10 + top_k))
    logits = (3 * rng.standard_normal((3, 4096))).astype(np.float32)
    logits[2, :64] = logits[2, 100]  # ties at and around the boundaries
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(None, torch.from_numpy(logits)).numpy()
    actual = np.asarray(jax.jit(mistral.filter_logits)(logits, np.float32(temperature), np.int32(top_k),
                                                       np.float32(top_p)))
    kept = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), kept)
    # XLA:CPU divides by a runtime scalar as a multiply by its reciprocal (torch divides exactly): 1 ulp.
    np.testing.assert_allclose(actual[kept], expected[kept], rtol=1.2e-7, atol=0)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(actual)), torch.softmax(torch.from_numpy(expected), -1),
                               rtol=1e-5, atol=1e-9)


def test_sample_logits_greedy_and_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(jax.vmap(lambda k, t, kk, p: mistral.sample_logits(logits, k, t, kk, p)[0],
                            in_axes=(0, None, None, None)))
    assert (np.asarray(draw(keys, 0.0, 50, 1.0)) == 0).all()
    counts = np.bincount(np.asarray(draw(keys, 1.0, 0, 1.0)), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top_p 0.7 keeps {0.5, 0.3}; top_k 1 keeps the argmax; temperature 0.5 squares the odds.
    assert set(np.asarray(draw(keys, 1.0, 0, 0.7)).tolist()) == {0, 1}
    assert set(np.asarray(draw(keys, 1.0, 1, 1.0)).tolist()) == {0}
    counts = np.bincount(np.asarray(draw(keys, 0.5, 2, 1.0)), minlength=4) / 4000
    np.testing.assert_allclose(counts, [25 / 34, 9 / 34, 0, 0], atol=0.03)


# ------------------------------------------------------------------------------------------------ configs, sizes


def test_config_from_hf(te_reference, pe_reference):
    te = MistralConfig.from_hf_config(te_reference.config.to_dict())
    pe = MistralConfig.from_hf_config(pe_reference.config.to_dict())
    assert te == mistral.PRESETS["tiny_text_encoder"] and not te.llama_4_query_scaling
    assert pe == mistral.PRESETS["tiny_pe"] and pe.llama_4_query_scaling and pe.pad_token_id == 11
    assert MistralConfig.from_hf_config(pe.to_hf_text_config()) == pe
    with pytest.raises(ValueError, match="model_type"):
        MistralConfig.from_hf_config({**pe.to_hf_text_config(), "model_type": "llama"})
    with pytest.raises(ValueError, match="lacks hidden_size"):
        MistralConfig.from_hf_config({"model_type": "mistral3", "text_config": {"vocab_size": 10}})
    with pytest.raises(ValueError, match="hidden_act"):
        MistralConfig.from_hf_config({**pe.to_hf_text_config(), "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        MistralConfig.from_hf_config({**pe.to_hf_text_config(), "num_key_value_heads": 3})


def test_parameters_carry_logical_axes():
    model = mistral.init_model(MistralConfig(**{**TEXT, "sliding_window": None, "tie_word_embeddings": False,
                                                "eos_token_id": 2}))
    allowed = {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm"}
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = param.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(param.shape), path
        assert set(axes) <= allowed, (path, axes)
        assert (axes[0] == "layers") == (path[0] == "layers"), path


def released_config(model_type):
    text = dict(hidden_size=3072, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=131072, rms_norm_eps=1e-5,
                max_position_embeddings=262144, sliding_window=None, tie_word_embeddings=True, bos_token_id=1,
                eos_token_id=2, rope_parameters=dict(YARN))
    if model_type == "ministral3":
        return {**text, "model_type": "ministral3", "pad_token_id": 11}
    return {"model_type": "mistral3", "text_config": {**text, "model_type": "mistral"}}


def test_real_size_keys_shapes_and_counts():
    from transformers import AutoConfig, Ministral3ForCausalLM, Mistral3Model

    language_model_params = 3_429_006_336
    last_layer_and_norm = 116_398_080 + 3072
    for model_type, reference_class in (("mistral3", Mistral3Model), ("ministral3", Ministral3ForCausalLM)):
        raw = released_config(model_type)
        config = MistralConfig.from_hf_config(raw)
        assert config == mistral.PRESETS["text_encoder" if model_type == "mistral3" else "pe"]
        hf_config = AutoConfig.for_model(**raw)
        with torch.device("meta"):
            reference = reference_class(hf_config)
        encoder_only = model_type == "mistral3"
        if encoder_only:  # the encoder holds layers 0..24 only: layer 25 and the final norm feed hs[-1]
            prefix = "language_model."
            reference_shapes = {k[len(prefix):]: tuple(v.shape) for k, v in reference.state_dict().items()
                                if k.startswith(prefix) and not k.startswith((prefix + "layers.25.", prefix + "norm."))}
        else:  # lm_head.weight is tied to embed_tokens
            reference_shapes = {k.removeprefix("model."): tuple(v.shape) for k, v in reference.state_dict().items()
                                if k != "lm_head.weight"}
        assert weights.expected_torch_shapes(config, encoder_only) == reference_shapes
        abstract = mistral.abstract_model(config, encoder_only=encoder_only)
        count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
        assert count == language_model_params - (last_layer_and_norm if encoder_only else 0)
