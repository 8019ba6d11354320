"""CLIP and SigLIP image-tower weights: the transformers key table, loading, and the folder's image preprocessing.

Sources accepted by `open_vision_tower` / `load_vision_tower`: a transformers folder (`config.json`,
`model.safetensors` or sharded `model.safetensors.index.json`) of
- `CLIPModel` or `CLIPVisionModelWithProjection`: vision keys under `vision_model.`, `visual_projection.weight`
  beside them;
- `CLIPVisionModel`: vision keys at the top level (transformers 5) or under `vision_model.` (transformers 4);
  no projection;
- `SiglipModel` (keys under `vision_model.`) or `SiglipVisionModel` (top level);
- a diffusers pipeline folder (its `image_encoder/` subfolder).
The text tower (`text_model.*`, `text_projection.*`, `logit_scale`, `logit_bias`) and the non-persistent
`position_ids` buffers older checkpoints saved are skipped. Every key and shape is checked against
`nnx.eval_shape` of the tower before any tensor is read. `load_image_preprocessor` reads the folder's
`preprocessor_config.json`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

from conversions import checkpoint_files as files
from conversions.key_table import KeyRule, check_tensors, expected_shapes, linear_rules
from conversions.safetensors_io import CheckpointError, TensorSource
from ernie_jax.data.image_preprocess import ImagePreprocessor
from ernie_jax.models.vision_tower import VisionTower, VisionTowerConfig, abstract_vision_tower

WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"
PIPELINE_SUBFOLDER = "image_encoder"
VISION_PREFIX = "vision_model."
PROJECTION_KEY = "visual_projection.weight"  # beside the vision model, never under its prefix
# What a CLIPModel / SiglipModel holds besides the vision tower, and buffers transformers 4 saved.
SKIPPED_PREFIXES = ("text_model.", "text_projection.", "logit_scale", "logit_bias")
SKIPPED_KEYS = ("embeddings.position_ids",)


def key_table(config: VisionTowerConfig) -> list[KeyRule]:
    """Every tensor of the tower, keys relative to the vision model (`embeddings.*`, `encoder.*`, ...) except
    CLIP's `visual_projection.weight`."""
    clip = config.family == "clip"
    layer = "encoder.layers.{layer}"
    rules = [KeyRule("embeddings.patch_embedding.weight", ("patch_embedding", "kernel"), "conv")]
    if clip:
        rules.append(KeyRule("embeddings.class_embedding", ("class_embedding",)))
    else:
        rules.append(KeyRule("embeddings.patch_embedding.bias", ("patch_embedding", "bias")))
    rules.append(KeyRule("embeddings.position_embedding.weight", ("position_embedding",)))
    if clip:
        rules += norm_rules("pre_layrnorm", ("pre_layrnorm",))
    rules += norm_rules(f"{layer}.layer_norm1", ("layers", "layer_norm1"))
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += linear_rules(f"{layer}.self_attn.{name}", ("layers", "self_attn", name), bias=True)
    rules += norm_rules(f"{layer}.layer_norm2", ("layers", "layer_norm2"))
    for name in ("fc1", "fc2"):
        rules += linear_rules(f"{layer}.mlp.{name}", ("layers", "mlp", name), bias=True)
    rules += norm_rules("post_layernorm", ("post_layernorm",))
    if config.vision_use_head:
        rules += [KeyRule("head.probe", ("head", "probe")),
                  KeyRule("head.attention.in_proj_weight", ("head", "in_proj", "kernel"), "linear"),
                  KeyRule("head.attention.in_proj_bias", ("head", "in_proj", "bias"))]
        rules += linear_rules("head.attention.out_proj", ("head", "out_proj"), bias=True)
        rules += norm_rules("head.layernorm", ("head", "layernorm"))
        for name in ("fc1", "fc2"):
            rules += linear_rules(f"head.mlp.{name}", ("head", "mlp", name), bias=True)
    if config.projection_dim is not None:
        rules += linear_rules("visual_projection", ("visual_projection",), bias=False)
    return rules


def norm_rules(torch_name: str, path: tuple[str, ...]) -> list[KeyRule]:
    """The rules of a torch.nn.LayerNorm (`weight`, `bias`) stored as our `LayerNorm` (`scale`, `bias`)."""
    return [KeyRule(f"{torch_name}.weight", path + ("scale",)), KeyRule(f"{torch_name}.bias", path + ("bias",))]


def expected_torch_shapes(config: VisionTowerConfig) -> dict[str, tuple[int, ...]]:
    """`{key: shape}` (vision-model-relative keys, plus `visual_projection.weight`) for `config`, derived from
    `nnx.eval_shape` of the tower."""
    abstract = nnx.to_pure_dict(nnx.state(abstract_vision_tower(config)))
    return expected_shapes(key_table(config), abstract, config.num_hidden_layers)


def _ignored(key: str) -> bool:
    return key.startswith(SKIPPED_PREFIXES) or key in SKIPPED_KEYS


def _vision_prefix(keys: list[str], where: Path) -> str:
    for prefix in (VISION_PREFIX, ""):
        if f"{prefix}embeddings.patch_embedding.weight" in keys:
            return prefix
    raise CheckpointError(f"{where}: no embeddings.patch_embedding.weight, at the top level or under "
                          f"{VISION_PREFIX} (not a CLIP or SigLIP vision checkpoint)")


def open_vision_tower(path) -> files.Checkpoint:
    """Finds the config and weights at `path` (any layout in the module docstring) and validates them."""
    folder, raw_config = files.locate_component(path, PIPELINE_SUBFOLDER, "transformers CLIP or SigLIP")
    located = files.open_weights(folder, WEIGHTS_NAME)
    config = files.parse_config(
        lambda values: VisionTowerConfig.from_hf_config(values, with_projection=PROJECTION_KEY in located),
        raw_config, folder / "config.json")
    tensors = TensorSource(located.files, strip_prefix=_vision_prefix(located.keys(), folder))
    # Our own names for any layer index and every optional part: one beyond the config means it disagrees.
    every_part = dataclasses.replace(config, vision_use_head=config.family == "siglip")
    check_tensors(tensors, expected_torch_shapes(config), str(folder),
                  own_patterns=[rule.pattern() for rule in key_table(every_part)], ignore=_ignored)
    return files.Checkpoint(config, folder, tensors=tensors)


def load_vision_tower(path, dtype="float32", *, param_dtype=None, attention_impl: str = "xla", remat: str = "none",
                      scan_layers: bool = True, sharding=None, mesh=None, axis_rules=None) -> VisionTower:
    """The CLIP or SigLIP tower at `path`; `dtype` is the compute dtype, parameters are stored in `param_dtype`
    (default `dtype`), placed by `mesh` + `axis_rules` or by `sharding` (default: the first device), as
    `conversions.transformer.load_transformer` does."""
    checkpoint = open_vision_tower(path)
    dtype, param_dtype = files.resolve_dtypes(dtype, param_dtype)
    config = checkpoint.config
    abstract = abstract_vision_tower(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                     remat=remat, scan_layers=scan_layers)
    return files.load_module(abstract, checkpoint, key_table(config), config.num_hidden_layers, sharding=sharding,
                             mesh=mesh, axis_rules=axis_rules)


def load_image_preprocessor(path) -> ImagePreprocessor:
    """The preprocessing of the folder at `path` (a pipeline folder's `image_encoder/`), from its
    preprocessor_config.json."""
    folder, _ = files.locate_component(path, PIPELINE_SUBFOLDER, "transformers CLIP or SigLIP")
    config_path = folder / PREPROCESSOR_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no {PREPROCESSOR_NAME} (the image processor's settings)")
    return files.parse_config(ImagePreprocessor.from_config, files.read_json(config_path), config_path)
