"""LoRA merging against diffusers' ErnieImagePipeline.load_lora_weights (with peft)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ernie_jax
from conversions import lora
from conversions.safetensors_io import CheckpointError, write_safetensors
from tests.conftest import TINY, reference_transformer, relative_error
from tests.test_dit import make_inputs, reference_forward

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "gate_proj", "up_proj", "linear_fc2", "adaLN_modulation.1",
           "final_linear", "text_proj"]


def peft_lora(seed=0, **config):
    """A random LoRA on the tiny reference: (state dict with `transformer.` keys, adapter metadata)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = reference_transformer()
    torch.manual_seed(seed)
    lora_config = LoraConfig(target_modules=TARGETS, init_lora_weights=False, **config)
    model.add_adapter(lora_config)
    state = {f"transformer.{k}": v.detach().float().numpy() for k, v in get_peft_model_state_dict(model).items()}
    # As diffusers' save_lora_weights stores it: the LoraConfig as JSON, sets as lists.
    metadata = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v
                for k, v in lora_config.to_dict().items()
                if isinstance(v, (int, float, str, bool, dict, list, set, type(None)))}
    return state, metadata


def write_lora(path, state, metadata=None, prefix="transformer."):
    tensors = {prefix + k[len("transformer."):]: v for k, v in state.items()}
    header = {"format": "pt"}
    if metadata is not None:
        header[lora.METADATA_KEY] = json.dumps(metadata)
    write_safetensors(path, tensors, header)
    return path


def diffusers_with_lora(path, scale=1.0):
    from diffusers import ErnieImagePipeline, FlowMatchEulerDiscreteScheduler

    pipe = ErnieImagePipeline(transformer=reference_transformer(), vae=None, text_encoder=None, tokenizer=None,
                              scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.load_lora_weights(str(path), adapter_name="test")
    if scale != 1.0:
        pipe.set_adapters(["test"], [scale])
    return pipe.transformer


@pytest.mark.parametrize("prefix", ["transformer.", "diffusion_model.", "base_model.model."],
                         ids=["diffusers", "ai_toolkit", "peft"])
def test_lora_matches_diffusers(prefix, tiny_folder, tmp_path):
    state, metadata = peft_lora(r=4, lora_alpha=8, rank_pattern={"to_q": 2}, alpha_pattern={"linear_fc2": 3})
    path = write_lora(tmp_path / "lora.safetensors", state, metadata, prefix)
    inputs = make_inputs(2, 4, 5, [6, 3], TINY["text_in_dim"])
    expected = reference_forward(diffusers_with_lora(path), *inputs)
    base = reference_forward(reference_transformer(), *inputs)
    model = ernie_jax.load_transformer(tiny_folder)
    changed = lora.apply_lora(model, path)
    assert "layers.1.self_attention.to_q" in changed and "final_linear" in changed
    assert relative_error(np.asarray(model(*inputs)), expected) <= 1e-5
    assert relative_error(expected, base) > 1e-2  # the LoRA really changes the output


def test_lora_without_metadata_and_scaled(tiny_folder, tmp_path):
    state, _ = peft_lora(seed=1, r=4, lora_alpha=16)
    path = write_lora(tmp_path / "lora.safetensors", state)  # no metadata: alpha = r, factor 1
    inputs = make_inputs(1, 3, 4, [5], TINY["text_in_dim"])
    expected = reference_forward(diffusers_with_lora(path, scale=0.5), *inputs)
    model = ernie_jax.load_transformer(tiny_folder)
    lora.apply_lora(model, path, scale=0.5)
    assert relative_error(np.asarray(model(*inputs)), expected) <= 1e-5


def test_bad_lora_files(tiny_folder, tmp_path):
    model = ernie_jax.load_transformer(tiny_folder)
    kohya = tmp_path / "kohya.safetensors"
    write_safetensors(kohya, {
        "lora_unet_layers_0_self_attention_to_q.lora_down.weight": np.zeros((4, 256), np.float32),
        "lora_unet_layers_0_self_attention_to_q.lora_up.weight": np.zeros((256, 4), np.float32),
        "lora_unet_layers_0_self_attention_to_q.alpha": np.array(4.0, np.float32)})
    with pytest.raises(CheckpointError, match="kohya"):
        lora.apply_lora(model, kohya)
    wrong = write_lora(tmp_path / "wrong.safetensors", {
        "transformer.layers.0.self_attention.to_q.lora_A.weight": np.zeros((4, 100), np.float32),
        "transformer.layers.0.self_attention.to_q.lora_B.weight": np.zeros((256, 4), np.float32)})
    with pytest.raises(CheckpointError, match="does not fit"):
        lora.apply_lora(model, wrong)
    missing_layer = write_lora(tmp_path / "layer.safetensors", {
        "transformer.layers.7.mlp.up_proj.lora_A.weight": np.zeros((4, 256), np.float32),
        "transformer.layers.7.mlp.up_proj.lora_B.weight": np.zeros((512, 4), np.float32)})
    with pytest.raises(CheckpointError, match="layers.7.mlp.up_proj"):
        lora.apply_lora(model, missing_layer)
