"""Text-encoder and prompt-enhancer weights: the transformers key tables and loaders.

Sources accepted by `open_text_encoder` / `load_text_encoder`:
- a transformers `Mistral3Model` / `Mistral3ForConditionalGeneration` folder (`config.json` with a nested
  `text_config`, `model.safetensors` or sharded `model.safetensors.index.json`); language-model keys under
  `language_model.`, `model.language_model.` or the legacy `language_model.model.`;
- a diffusers pipeline folder (its `text_encoder/` subfolder);
- a folder written by ernie_jax (config.json with the format marker + Orbax `params/`).
Only `hidden_states[-2]` is used, so the last decoder layer, the final norm and any head are neither
required nor loaded, and the vision tower / projector are skipped silently.

Sources accepted by `open_prompt_enhancer` / `load_prompt_enhancer`: a transformers `Ministral3ForCausalLM`
(or `MistralForCausalLM`) folder (`model.*` keys, `lm_head.weight` absent or ignored when tied), a pipeline
folder (its `pe/` subfolder), or a converted folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from flax import nnx

from conversions import checkpoint_files as files
from conversions.key_table import KeyRule, check_tensors, expected_shapes, linear_rules, to_state_dict
from conversions.safetensors_io import CheckpointError, TensorSource
from ernie_jax.models.mistral import MistralConfig, MistralModel, abstract_model

WEIGHTS_NAME = "model.safetensors"
# Language-model prefixes in Mistral3 checkpoints, most specific first (detected by the embedding key).
TEXT_ENCODER_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
# Mistral3's parts that the text encoder never runs (with and without the ForConditionalGeneration prefix).
SKIPPED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
                    "lm_head.", "language_model.lm_head.")
CAUSAL_LM_PREFIX = "model."


def key_table(config: MistralConfig, encoder_only: bool) -> list[KeyRule]:
    """Every tensor the decoder holds, with keys relative to the language model (`embed_tokens.weight`, ...);
    the head's `lm_head.weight` sits outside it and appears only when untied."""
    layer = "layers.{layer}"
    rules = [KeyRule("embed_tokens.weight", ("embed_tokens", "embedding")),
             KeyRule(f"{layer}.input_layernorm.weight", ("layers", "input_layernorm", "scale")),
             KeyRule(f"{layer}.post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "scale"))]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules += linear_rules(f"{layer}.self_attn.{name}", ("layers", "self_attn", name), bias=False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules += linear_rules(f"{layer}.mlp.{name}", ("layers", "mlp", name), bias=False)
    if not encoder_only:
        rules.append(KeyRule("norm.weight", ("norm", "scale")))
        if not config.tie_word_embeddings:
            rules += linear_rules("lm_head", ("lm_head",), bias=False)
    return rules


def num_layers(config: MistralConfig, encoder_only: bool) -> int:
    return config.num_encoder_layers if encoder_only else config.num_hidden_layers


def expected_torch_shapes(config: MistralConfig, encoder_only: bool) -> dict[str, tuple[int, ...]]:
    """`{key: shape}` (language-model-relative keys) for `config`, derived from `nnx.eval_shape` of the model."""
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(config, encoder_only=encoder_only)))
    return expected_shapes(key_table(config, encoder_only), abstract, num_layers(config, encoder_only))


@dataclasses.dataclass
class DecoderCheckpoint(files.Checkpoint):
    """A located, validated decoder checkpoint (tensor keys relative to the language model) and its role."""

    encoder_only: bool = False


def _prefix(keys: list[str], candidates: tuple[str, ...], where: Path) -> str:
    for prefix in candidates:
        if f"{prefix}embed_tokens.weight" in keys:
            return prefix
    raise CheckpointError(f"{where}: no embedding tensor under any of the prefixes {', '.join(candidates)} "
                          f"(not a Mistral checkpoint of this kind)")


def _open(path, subfolder: str, encoder_only: bool, prefixes: tuple[str, ...], ignore) -> DecoderCheckpoint:
    folder, raw_config = files.locate_component(path, subfolder, "transformers model")
    config = files.parse_config(MistralConfig.from_hf_config, raw_config, folder / "config.json")
    if files.is_converted(raw_config):
        return DecoderCheckpoint.converted(config, folder, raw_config, encoder_only=encoder_only)
    located = files.open_weights(folder, WEIGHTS_NAME)
    prefix = _prefix(located.keys(), prefixes, folder)
    tensors = TensorSource(located.files, strip_prefix=prefix)
    # Our own names for any layer index: a layer beyond the config's means the config disagrees.
    check_tensors(tensors, expected_torch_shapes(config, encoder_only), str(folder),
                  own_patterns=[rule.pattern() for rule in key_table(config, encoder_only)],
                  ignore=lambda key: ignore(config, key))
    return DecoderCheckpoint(config, folder, tensors=tensors, encoder_only=encoder_only)


def _text_encoder_ignores(config: MistralConfig, key: str) -> bool:
    # The vision side is never run; the last layer, final norm and head feed only hidden_states[-1].
    last = f"layers.{config.num_hidden_layers - 1}."
    return key.startswith(SKIPPED_PREFIXES) or key.startswith(last) or key == "norm.weight"


def _prompt_enhancer_ignores(config: MistralConfig, key: str) -> bool:
    # A tied head may still be on disk; transformers ties it to embed_tokens regardless.
    return config.tie_word_embeddings and key == "lm_head.weight"


def open_text_encoder(path) -> DecoderCheckpoint:
    """Finds and validates the text encoder at `path` (see the module docstring)."""
    return _open(path, "text_encoder", True, TEXT_ENCODER_PREFIXES, _text_encoder_ignores)


def open_prompt_enhancer(path) -> DecoderCheckpoint:
    """Finds and validates the PE (causal LM) at `path` (see the module docstring)."""
    return _open(path, "pe", False, (CAUSAL_LM_PREFIX,), _prompt_enhancer_ignores)


def load_checkpoint(checkpoint: DecoderCheckpoint, dtype="float32", *, param_dtype=None, attention_impl: str = "xla",
                    remat: str = "none", scan_layers: bool = True, sharding=None, mesh=None,
                    axis_rules=None) -> MistralModel:
    """The model of an opened checkpoint; `dtype` is the compute dtype, parameters are stored in
    `param_dtype` (default `dtype`), placed by `sharding` (default: the first device)."""
    dtype, param_dtype = files.resolve_dtypes(dtype, param_dtype)
    config = checkpoint.config
    abstract = abstract_model(config, encoder_only=checkpoint.encoder_only, dtype=dtype, param_dtype=param_dtype,
                              attention_impl=attention_impl, remat=remat, scan_layers=scan_layers)
    return files.load_module(abstract, checkpoint, key_table(config, checkpoint.encoder_only),
                             num_layers(config, checkpoint.encoder_only), sharding=sharding, mesh=mesh,
                             axis_rules=axis_rules)


def load_text_encoder(path, dtype="float32", **kwargs) -> MistralModel:
    """The text encoder (`encoder_only`: its `encode` gives ERNIE-Image's text features) from `path`."""
    return load_checkpoint(open_text_encoder(path), dtype, **kwargs)


def load_prompt_enhancer(path, dtype="float32", **kwargs) -> MistralModel:
    """The prompt enhancer (full causal LM, for `ernie_jax.models.mistral.generate`) from `path`."""
    return load_checkpoint(open_prompt_enhancer(path), dtype, **kwargs)


def state_dict(model: MistralModel, prefix: str | None = None) -> dict[str, np.ndarray]:
    """The transformers state dict `{key: np.ndarray}` of `model`, in its parameter dtype.

    Keys are `language_model.*` for an encoder_only model (as `Mistral3Model` saves them, without the
    last layer and final norm it never held) and `model.*` (+ `lm_head.weight` when untied) for a causal
    LM; `prefix` overrides the language-model prefix.
    """
    config = model.config
    if prefix is None:
        prefix = "language_model." if model.encoder_only else CAUSAL_LM_PREFIX
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = to_state_dict(key_table(config, model.encoder_only), params, model.num_layers)
    return {key if key.startswith("lm_head.") else prefix + key: value for key, value in tensors.items()}


def hf_config(model: MistralModel) -> dict:
    """The transformers config.json of `model`: a Mistral3-style wrapper around the text config for a
    text encoder, the text config itself (Ministral3ForCausalLM) for a causal LM."""
    text = model.config.to_hf_text_config()
    if model.encoder_only:
        return {"model_type": "mistral3", "architectures": ["Mistral3Model"], "text_config": text}
    return {**text, "architectures": ["Ministral3ForCausalLM" if model.config.llama_4_query_scaling
                                      else "MistralForCausalLM"]}
