"""LoRA safetensors for the ERNIE-Image transformer, merged into its weights as diffusers does.

Accepted key formats (reference doc section 8), all naming diffusers module paths
(`layers.{i}.self_attention.to_q`, `mlp.gate_proj`, `adaLN_modulation.1`, ...):
- diffusers: `transformer.<module>.lora_A.weight` `[r, in]` / `transformer.<module>.lora_B.weight` `[out, r]`;
- AI-Toolkit: `diffusion_model.<module>.lora_A/B.weight`;
- PEFT: `base_model.model.<module>.lora_A/B.weight`.
The merged weight is W + scale * (alpha / r) * B @ A (rsLoRA: alpha / sqrt(r)), with r, alpha and their
per-module patterns read from the header's `lora_adapter_metadata` as PEFT's LoraConfig would; without
metadata alpha = r (factor 1). kohya files (`lora_down`/`lora_up`/`.alpha`) are rejected: diffusers
would silently ignore them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversions.key_table import KeyRule, first, get_path, set_path
from conversions.safetensors_io import CheckpointError, TensorSource, read_header, write_safetensors
from conversions.transformer import key_table
from ernie_jax.models import lora as lora_model
from ernie_jax.models.dit import ErnieImageConfig, ErnieImageTransformer

logger = logging.getLogger(__name__)

PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")
METADATA_KEY = "lora_adapter_metadata"


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module name that equals it or ends in '.' + it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_lora(path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """`({module: (lora_A [r, in], lora_B [out, r])}, adapter config)` from a LoRA safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file")
    tensors = TensorSource([path])
    _, header_metadata = read_header(path)
    keys = tensors.keys()
    if any("lora_down" in k or "lora_up" in k or k.endswith(".alpha") for k in keys):
        raise CheckpointError(f"{path}: kohya-format LoRA (lora_down/lora_up/alpha keys) is not supported; "
                              "convert it to the diffusers/PEFT format (lora_A/lora_B)")
    dora = [k for k in keys if "dora_scale" in k]
    if dora:
        logger.warning("%s: dropping %d DoRA 'dora_scale' tensors, as diffusers does", path, len(dora))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key in keys:
        if key in dora:
            continue
        match = re.fullmatch(r"(?:transformer\.|diffusion_model\.|base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise CheckpointError(f"{path}: unsupported LoRA tensor {key!r} (expected <module>.lora_A/lora_B.weight)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = np.asarray(tensors[key], np.float32)
    incomplete = sorted(m for m, p in pairs.items() if len(p) != 2)
    if incomplete:
        raise CheckpointError(f"{path}: modules with only one of lora_A/lora_B: {first(incomplete)}")
    if not pairs:
        raise CheckpointError(f"{path}: no LoRA tensors")
    config = {}
    if METADATA_KEY in header_metadata:
        try:
            raw = json.loads(header_metadata[METADATA_KEY])
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable {METADATA_KEY} ({e})") from e
        config = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith("transformer.")}
    return {m: (p["A"], p["B"]) for m, p in pairs.items()}, config


def lora_factors(modules: dict[str, tuple[np.ndarray, np.ndarray]], config: dict) -> dict[str, float]:
    """Per-module alpha / r (or alpha / sqrt(r) with rsLoRA), as PEFT builds them from the config."""
    factors = {}
    for module, (lora_a, _) in modules.items():
        rank = lora_a.shape[0]
        if config:
            rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
        else:
            alpha = rank
        factors[module] = alpha / (np.sqrt(rank) if config.get("use_rslora") else rank)
    return factors


def _module_rules(config: ErnieImageConfig) -> dict[str, KeyRule]:
    """diffusers module name (with `{layer}`) -> the rule of its Linear weight."""
    return {rule.torch_key[: -len(".weight")]: rule for rule in key_table(config) if rule.transform == "linear"}


def diffusers_names(config: ErnieImageConfig) -> dict[tuple[str, ...], str]:
    """The path of each Linear of the DiT -> its diffusers module name (`{layer}` for stacked ones): the
    `module_names` with which ernie_jax.models.lora.add_lora matches PEFT-style targets on the DiT."""
    return {rule.path[:-1]: name for name, rule in _module_rules(config).items()}


# The linear layers of every DiT block (diffusers' names, PEFT's matching): the attention and MLP projections,
# the report's LoRA targets (post-training configs, `python -m ernie_jax.plan --lora-rank`).
BLOCK_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "gate_proj", "up_proj", "linear_fc2")


def save_lora(model: ErnieImageTransformer, path) -> list[str]:
    """Writes `model`'s LoRA adapters to the safetensors file `path` (which must not exist) in the diffusers key
    format; returns the module names written.

    Keys are `transformer.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`, float32, one pair
    per layer of a stacked adapter. Each adapter's scale (alpha / r, or alpha / sqrt(r)) is folded into
    lora_B and the metadata says alpha = r (PEFT's factor 1): the file then means the same update to every
    loader, also those that ignore the metadata and assume alpha = r (ComfyUI-style loaders, diffusers without
    metadata). The metadata (`lora_adapter_metadata`, read by diffusers' load_lora_weights as PEFT LoraConfig
    fields) lists the modules exactly, with rank_pattern/alpha_pattern where the ranks differ.
    """
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"{path}: already exists (refusing to overwrite)")
    names = diffusers_names(model.config)
    tensors, ranks = {}, {}
    for linear_path, adapter in lora_model.adapters(model):
        name = names[linear_path]
        a = np.asarray(jax.device_get(adapter.a[...]), np.float32)
        b = np.asarray(jax.device_get(adapter.b[...]), np.float32) * np.float32(adapter.scale)
        per_layer = ([(name.format(layer=i), a[i], b[i]) for i in range(a.shape[0])] if "{layer}" in name
                     else [(name, a, b)])
        for module, lora_a, lora_b in per_layer:
            tensors[f"transformer.{module}.lora_A.weight"] = np.ascontiguousarray(lora_a.T)
            tensors[f"transformer.{module}.lora_B.weight"] = np.ascontiguousarray(lora_b.T)
            ranks[module] = adapter.rank
    if not ranks:
        raise ValueError("the model has no LoRA adapters to save")
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    patterns = {f"^{re.escape(module)}": r for module, r in ranks.items() if r != rank}
    config = {"r": rank, "lora_alpha": rank, "target_modules": sorted(ranks), "use_rslora": False,
              "rank_pattern": patterns, "alpha_pattern": patterns}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                          sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_safetensors(staging, tensors, metadata)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return sorted(ranks)


def apply_lora(model: ErnieImageTransformer, path, scale: float = 1.0) -> list[str]:
    """Merges the LoRA file at `path` into `model`'s weights in place; returns the modules changed."""
    modules, config = read_lora(path)
    if config.get("use_dora"):
        raise CheckpointError(f"{path}: DoRA adapters are not supported")
    factors = lora_factors(modules, config)
    rules = _module_rules(model.config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    updates: dict[tuple, dict[int | None, np.ndarray]] = {}
    for module, (lora_a, lora_b) in modules.items():
        layer_match = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
        name = f"layers.{{layer}}.{layer_match.group(2)}" if layer_match else module
        rule = rules.get(name)
        layer = int(layer_match.group(1)) if layer_match else None
        if rule is None or (layer is not None and layer >= model.config.num_layers):
            raise CheckpointError(f"{path}: LoRA targets {module!r}, which is not a Linear layer of this transformer")
        kernel = get_path(params, rule.path)
        expected = kernel.shape[1:] if layer is not None else kernel.shape
        if (lora_a.shape[1], lora_b.shape[0]) != expected or lora_a.shape[0] != lora_b.shape[1]:
            raise CheckpointError(f"{path}: LoRA for {module!r} has A {lora_a.shape} / B {lora_b.shape}, "
                                  f"which does not fit the kernel {tuple(expected)}")
        delta = (scale * factors[module]) * (lora_b @ lora_a)  # [out, in]
        updates.setdefault(rule.path, {})[layer] = delta.T
    for param_path, deltas in updates.items():
        kernel = get_path(params, param_path)
        merged = kernel.astype(jnp.float32)
        for layer, delta in deltas.items():
            index = (layer,) if layer is not None else ()
            merged = merged.at[index].add(jnp.asarray(delta))
        set_path(params, param_path, jax.device_put(merged.astype(kernel.dtype), kernel.sharding))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return sorted(modules)
