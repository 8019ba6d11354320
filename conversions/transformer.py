"""ERNIE-Image transformer weights: the diffusers key table and loading from every released layout.

Sources accepted by `open_checkpoint` / `load_transformer`:
- a diffusers transformer folder: `config.json` + `diffusion_pytorch_model.safetensors`, or shards with
  `diffusion_pytorch_model.safetensors.index.json`;
- a diffusers pipeline folder (its `transformer/` subfolder is used);
- a single `.safetensors` file, keys optionally under `model.diffusion_model.` (config inferred from shapes,
  or taken from a `config.json` beside it);
- a folder written by `python -m conversions.convert` (Orbax).
Every key and shape is checked against `nnx.eval_shape` of the model before any tensor data is read.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
from flax import nnx

from conversions import checkpoint_files as files
from conversions.key_table import KeyRule, check_tensors, expected_shapes, linear_rules, to_state_dict
from conversions.safetensors_io import CheckpointError, TensorSource
from ernie_jax.models.dit import ErnieImageConfig, ErnieImageTransformer, abstract_transformer

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
SINGLE_FILE_PREFIX = "model.diffusion_model."
DIFFUSERS_CLASS_NAME = "ErnieImageTransformer2DModel"


def key_table(config: ErnieImageConfig) -> list[KeyRule]:
    """Every tensor of the diffusers `ErnieImageTransformer2DModel` for `config`."""
    block = "layers.{layer}"
    rules = [KeyRule("x_embedder.proj.weight", ("x_embedder", "kernel"), "conv"),
             KeyRule("x_embedder.proj.bias", ("x_embedder", "bias"))]
    if config.has_text_proj:
        rules += linear_rules("text_proj", ("text_proj",), bias=False)
    rules += linear_rules("time_embedding.linear_1", ("time_embedding", "linear_1"), bias=True)
    rules += linear_rules("time_embedding.linear_2", ("time_embedding", "linear_2"), bias=True)
    rules += linear_rules("adaLN_modulation.1", ("adaLN_modulation",), bias=True)
    rules.append(KeyRule(f"{block}.adaLN_sa_ln.weight", ("layers", "adaLN_sa_ln", "scale")))
    for name in ("to_q", "to_k", "to_v"):
        rules += linear_rules(f"{block}.self_attention.{name}", ("layers", "self_attention", name), bias=False)
    rules += linear_rules(f"{block}.self_attention.to_out.0", ("layers", "self_attention", "to_out"), bias=False)
    if config.qk_layernorm:
        rules += [KeyRule(f"{block}.self_attention.norm_q.weight", ("layers", "self_attention", "norm_q", "scale")),
                  KeyRule(f"{block}.self_attention.norm_k.weight", ("layers", "self_attention", "norm_k", "scale"))]
    rules.append(KeyRule(f"{block}.adaLN_mlp_ln.weight", ("layers", "adaLN_mlp_ln", "scale")))
    for name in ("gate_proj", "up_proj", "linear_fc2"):
        rules += linear_rules(f"{block}.mlp.{name}", ("layers", "mlp", name), bias=False)
    rules += linear_rules("final_norm.linear", ("final_norm", "linear"), bias=True)
    rules += linear_rules("final_linear", ("final_linear",), bias=True)
    return rules


def expected_torch_shapes(config: ErnieImageConfig) -> dict[str, tuple[int, ...]]:
    """`{diffusers key: shape}` for `config`, derived from `nnx.eval_shape` of the model."""
    abstract = nnx.to_pure_dict(nnx.state(abstract_transformer(config)))
    return expected_shapes(key_table(config), abstract, config.num_layers)


def check_transformer_tensors(tensors: TensorSource, config: ErnieImageConfig, where: str) -> None:
    """Every expected tensor present with its shape; extras of our own naming mean the config disagrees."""
    every_module = dataclasses.replace(config, text_in_dim=config.hidden_size + 1, qk_layernorm=True)
    check_tensors(tensors, expected_torch_shapes(config), where,
                  own_patterns=[rule.pattern() for rule in key_table(every_module)])


def infer_config(tensors: TensorSource, where: str) -> ErnieImageConfig:
    """Reads a config off the tensor shapes of a checkpoint that carries none (single-file releases).

    The head dim comes from the q-norm weight; RoPE settings and eps are the released model's.
    """
    try:
        hidden, in_channels, patch, _ = tensors.shape("x_embedder.proj.weight")
        head_dim = tensors.shape("layers.0.self_attention.norm_q.weight")[0]
        out_features = tensors.shape("final_linear.weight")[0]
        num_layers = 1 + max(int(m.group(1)) for k in tensors.keys() if (m := re.match(r"layers\.(\d+)\.", k)))
        ffn = tensors.shape("layers.0.mlp.gate_proj.weight")[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot infer the transformer config from the tensors (missing {e}); "
                              f"put a config.json beside the file") from e
    text_in_dim = tensors.shape("text_proj.weight")[1] if "text_proj.weight" in tensors else hidden
    return ErnieImageConfig(hidden_size=hidden, num_attention_heads=hidden // head_dim, num_layers=num_layers,
                            ffn_hidden_size=ffn, in_channels=in_channels,
                            out_channels=out_features // (patch * patch), patch_size=patch, text_in_dim=text_in_dim)


TransformerCheckpoint = files.Checkpoint


def open_checkpoint(path) -> TransformerCheckpoint:
    """Finds the config and weights at `path` (any layout in the module docstring) and validates them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a folder or a .safetensors file")
        keys = TensorSource([path]).keys()
        prefix = SINGLE_FILE_PREFIX if any(k.startswith(SINGLE_FILE_PREFIX) for k in keys) else ""
        tensors = TensorSource([path], strip_prefix=prefix)
        config_path = path.parent / "config.json"
        config = (files.parse_config(ErnieImageConfig.from_dict, files.read_json(config_path), config_path)
                  if config_path.is_file() else infer_config(tensors, str(path)))
        check_transformer_tensors(tensors, config, str(path))
        return TransformerCheckpoint(config, path, tensors=tensors)
    path, raw_config = files.locate_component(path, "transformer", "diffusers transformer")
    config = files.parse_config(ErnieImageConfig.from_dict, raw_config, path / "config.json")
    if files.is_converted(raw_config):
        return TransformerCheckpoint.converted(config, path, raw_config)
    tensors = files.open_weights(path, WEIGHTS_NAME)
    check_transformer_tensors(tensors, config, str(path))
    return TransformerCheckpoint(config, path, tensors=tensors)


def load_transformer(path, dtype="float32", *, param_dtype=None, attention_impl: str = "xla", remat: str = "none",
                     scan_layers: bool = True, sharding=None, mesh=None, axis_rules=None) -> ErnieImageTransformer:
    """Loads the ERNIE-Image transformer from any layout `open_checkpoint` accepts.

    `dtype` is the compute dtype; parameters are stored in `param_dtype` (default: `dtype`, as diffusers'
    `torch_dtype` does). With a `mesh` (any `jax.sharding.Mesh` with the axes data, fsdp, context, tensor:
    ernie_jax.parallel.normalize_mesh), every parameter is read straight into the sharding its logical axes
    get under `axis_rules` (default: ernie_jax.parallel.INFERENCE_RULES, which split the weights over an fsdp
    axis of size > 1), each device reading only its slice of the memory-mapped file; otherwise `sharding`
    places every parameter (default: first device).
    """
    return load_checkpoint(open_checkpoint(path), dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                           remat=remat, scan_layers=scan_layers, sharding=sharding, mesh=mesh,
                           axis_rules=axis_rules)


def load_checkpoint(checkpoint: TransformerCheckpoint, dtype="float32", *, param_dtype=None,
                    attention_impl: str = "xla", remat: str = "none", scan_layers: bool = True,
                    sharding=None, mesh=None, axis_rules=None) -> ErnieImageTransformer:
    """`load_transformer` for an already opened checkpoint."""
    dtype, param_dtype = files.resolve_dtypes(dtype, param_dtype)
    config = checkpoint.config
    abstract = abstract_transformer(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                    remat=remat, scan_layers=scan_layers)
    return files.load_module(abstract, checkpoint, key_table(config), config.num_layers, sharding=sharding,
                             mesh=mesh, axis_rules=axis_rules)


def transformer_state_dict(model: ErnieImageTransformer) -> dict[str, np.ndarray]:
    """The diffusers state dict `{key: np.ndarray}` of `model`, in its parameter dtype."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return to_state_dict(key_table(model.config), params, model.config.num_layers)


def diffusers_config(config: ErnieImageConfig) -> dict:
    """The `config.json` diffusers writes for this transformer."""
    return {"_class_name": DIFFUSERS_CLASS_NAME, "_diffusers_version": "0.42.1", **config.to_dict()}
