"""FLUX.2 VAE weights: the diffusers `AutoencoderKLFlux2` key table and loading.

Sources accepted by `open_vae` / `load_vae`:
- a diffusers VAE folder: `config.json` + `diffusion_pytorch_model.safetensors`, or shards with
  `diffusion_pytorch_model.safetensors.index.json`;
- a diffusers pipeline folder (its `vae/` subfolder is used);
- a converted ernie_jax folder: `config.json` with the format marker + `params/` (Orbax), holding the tree
  of `vae_variables` (parameters and the BatchNorm statistics).
Every key and shape is checked against `nnx.eval_shape` of the model before any tensor data is read.
`bn.num_batches_tracked` is in the released checkpoint but never used; it is skipped silently. Older
diffusers files name the mid-block attention `query/key/value/proj_attn`; those names are accepted.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from flax import nnx

from conversions import checkpoint_files as files
from conversions.key_table import KeyRule, check_tensors, expected_shapes, linear_rules, to_state_dict
from conversions.safetensors_io import TensorSource
from ernie_jax.models.vae import AutoencoderKLFlux2, VAEConfig, abstract_vae

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CLASS_NAME = "AutoencoderKLFlux2"
UNUSED_KEY = "bn.num_batches_tracked"
# Any extra tensor under these prefixes is one of ours that the config does not expect.
OWN_PATTERN = re.compile(r"(encoder|decoder|quant_conv|post_quant_conv|bn)\.")
# diffusers' `_convert_deprecated_attention_blocks`: old name -> current name, inside a mid-block attention.
LEGACY_ATTENTION = re.compile(r"((?:en|de)coder\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def conv_rules(torch_name: str, path: tuple) -> list[KeyRule]:
    """A torch.nn.Conv2d (with bias) stored as an nnx.Conv."""
    return [KeyRule(f"{torch_name}.weight", path + ("kernel",), "conv"),
            KeyRule(f"{torch_name}.bias", path + ("bias",))]


def group_norm_rules(torch_name: str, path: tuple) -> list[KeyRule]:
    return [KeyRule(f"{torch_name}.weight", path + ("scale",)), KeyRule(f"{torch_name}.bias", path + ("bias",))]


def resnet_rules(torch_name: str, path: tuple, in_channels: int, out_channels: int) -> list[KeyRule]:
    rules = []
    for norm, conv in (("norm1", "conv1"), ("norm2", "conv2")):
        rules += group_norm_rules(f"{torch_name}.{norm}", path + (norm,))
        rules += conv_rules(f"{torch_name}.{conv}", path + (conv,))
    if in_channels != out_channels:
        rules += conv_rules(f"{torch_name}.conv_shortcut", path + ("conv_shortcut",))
    return rules


def mid_block_rules(prefix: str, channels: int, attention: bool) -> list[KeyRule]:
    path = (prefix, "mid_block")
    rules = [rule for i in range(2)
             for rule in resnet_rules(f"{prefix}.mid_block.resnets.{i}", path + ("resnets", i), channels, channels)]
    if attention:
        name, attn = f"{prefix}.mid_block.attentions.0", path + ("attention",)
        rules += group_norm_rules(f"{name}.group_norm", attn + ("group_norm",))
        for projection in ("to_q", "to_k", "to_v"):
            rules += linear_rules(f"{name}.{projection}", attn + (projection,), bias=True)
        rules += linear_rules(f"{name}.to_out.0", attn + ("to_out",), bias=True)
    return rules


def stage_rules(prefix: str, blocks: str, resamplers: str, channels: tuple[int, ...],
                num_resnets: int) -> list[KeyRule]:
    """`{prefix}.{blocks}.{i}.resnets.{j}.*` and `.{resamplers}.0.conv` for every block but the last."""
    rules = []
    for i, out_channels in enumerate(channels):
        path = (prefix, blocks, i)
        for j in range(num_resnets):
            in_channels = channels[max(i - 1, 0)] if j == 0 else out_channels
            rules += resnet_rules(f"{prefix}.{blocks}.{i}.resnets.{j}", path + ("resnets", j), in_channels,
                                  out_channels)
        if i < len(channels) - 1:
            rules += conv_rules(f"{prefix}.{blocks}.{i}.{resamplers}.0.conv", path + ("resample", "conv"))
    return rules


def key_table(config: VAEConfig) -> list[KeyRule]:
    """Every tensor of the diffusers `AutoencoderKLFlux2` for `config`, except the unused
    `bn.num_batches_tracked`."""
    encoder_channels, decoder_channels = config.block_out_channels, tuple(reversed(config.decoder_channels))
    rules = conv_rules("encoder.conv_in", ("encoder", "conv_in"))
    rules += stage_rules("encoder", "down_blocks", "downsamplers", encoder_channels, config.layers_per_block)
    rules += mid_block_rules("encoder", encoder_channels[-1], config.mid_block_add_attention)
    rules += group_norm_rules("encoder.conv_norm_out", ("encoder", "conv_norm_out"))
    rules += conv_rules("encoder.conv_out", ("encoder", "conv_out"))
    rules += conv_rules("decoder.conv_in", ("decoder", "conv_in"))
    rules += mid_block_rules("decoder", decoder_channels[0], config.mid_block_add_attention)
    rules += stage_rules("decoder", "up_blocks", "upsamplers", decoder_channels, config.layers_per_block + 1)
    rules += group_norm_rules("decoder.conv_norm_out", ("decoder", "conv_norm_out"))
    rules += conv_rules("decoder.conv_out", ("decoder", "conv_out"))
    if config.use_quant_conv:
        rules += conv_rules("quant_conv", ("quant_conv",))
    if config.use_post_quant_conv:
        rules += conv_rules("post_quant_conv", ("post_quant_conv",))
    rules += [KeyRule("bn.running_mean", ("bn", "running_mean")), KeyRule("bn.running_var", ("bn", "running_var"))]
    return rules


def expected_torch_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """`{diffusers key: shape}` for `config` (minus `bn.num_batches_tracked`), from `nnx.eval_shape`."""
    return expected_shapes(key_table(config), nnx.to_pure_dict(nnx.state(abstract_vae(config))), 0)


def legacy_attention_name(key: str) -> str:
    """Older diffusers VAEs name the mid attention `query/key/value/proj_attn`; diffusers renames on load."""
    return LEGACY_ATTENTION.sub(lambda m: f"{m.group(1)}.{LEGACY_NAMES[m.group(2)]}.", key)


def open_tensors(folder: Path) -> TensorSource:
    return files.open_weights(folder, WEIGHTS_NAME, rename=legacy_attention_name)


VAECheckpoint = files.Checkpoint


def open_vae(path) -> VAECheckpoint:
    """Finds the config and weights at `path` (any layout in the module docstring) and validates them."""
    path, raw_config = files.locate_component(path, "vae", "diffusers VAE")
    config = files.parse_config(VAEConfig.from_dict, raw_config, path / "config.json")
    if files.is_converted(raw_config):
        return VAECheckpoint.converted(config, path, raw_config)
    tensors = open_tensors(path)
    check_tensors(tensors, expected_torch_shapes(config), str(path), own_patterns=[OWN_PATTERN],
                  ignore=lambda key: key == UNUSED_KEY)
    return VAECheckpoint(config, path, tensors=tensors)


def load_vae(path, dtype="float32", *, param_dtype=None, sharding=None, mesh=None, axis_rules=None
             ) -> AutoencoderKLFlux2:
    """Loads the FLUX.2 VAE from any layout `open_vae` accepts.

    `dtype` is the compute dtype; parameters and BatchNorm statistics are stored in `param_dtype` (default:
    `dtype`, as diffusers' `torch_dtype` does). `sharding` places every variable (default: the first device).
    """
    return load_checkpoint(open_vae(path), dtype, param_dtype=param_dtype, sharding=sharding, mesh=mesh,
                           axis_rules=axis_rules)


def load_checkpoint(checkpoint: VAECheckpoint, dtype="float32", *, param_dtype=None,
                    sharding=None, mesh=None, axis_rules=None) -> AutoencoderKLFlux2:
    """`load_vae` for an already opened checkpoint."""
    dtype, param_dtype = files.resolve_dtypes(dtype, param_dtype)
    abstract = abstract_vae(checkpoint.config, dtype=dtype, param_dtype=param_dtype)
    return files.load_module(abstract, checkpoint, key_table(checkpoint.config), 0, sharding=sharding, mesh=mesh,
                             axis_rules=axis_rules)


def vae_variables(model: AutoencoderKLFlux2) -> dict:
    """The pure-dict tree a converted folder stores (`checkpoint_files.save_params`): the parameters and
    the BatchNorm statistics (`nnx.BatchStat`, so not in `nnx.state(model, nnx.Param)`)."""
    return nnx.to_pure_dict(nnx.state(model))


def vae_state_dict(model: AutoencoderKLFlux2) -> dict[str, np.ndarray]:
    """The diffusers state dict `{key: np.ndarray}` of `model`, in its parameter dtype.

    `bn.num_batches_tracked` is written as 0 (int64) so that diffusers finds every buffer it declares; its
    value is never used.
    """
    state_dict = to_state_dict(key_table(model.config), vae_variables(model), 0)
    state_dict[UNUSED_KEY] = np.zeros((), np.int64)
    return state_dict


def diffusers_config(config: VAEConfig) -> dict:
    """The VAE `config.json` (the hub's fields, including `force_upcast`, which diffusers ignores)."""
    return {"_class_name": DIFFUSERS_CLASS_NAME, "_diffusers_version": "0.42.1", **config.to_dict()}
