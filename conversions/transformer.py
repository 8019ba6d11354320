"""ERNIE-Image transformer weights: the diffusers key table and loading from every released layout.

The table maps each diffusers state-dict key (`{layer}` marks the stacked block index) to a path in
the NNX parameter tree and a layout transform. Loading checks every key and shape against
`nnx.eval_shape` of the model before reading any tensor data.

Sources accepted by `load_transformer`:
- a diffusers transformer folder: `config.json` + `diffusion_pytorch_model.safetensors`, or shards with
  `diffusion_pytorch_model.safetensors.index.json`;
- a diffusers pipeline folder (its `transformer/` subfolder is used);
- a single `.safetensors` file, keys optionally under `model.diffusion_model.` (config inferred from shapes,
  or taken from a `config.json` beside it);
- a folder written by `python -m conversions.convert` (Orbax).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversions.safetensors_io import CheckpointError, TensorSource
from ernie_jax.models.dit import ErnieImageConfig, ErnieImageTransformer, abstract_transformer

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
SINGLE_FILE_PREFIX = "model.diffusion_model."
CONVERTED_FORMAT_KEY = "_ernie_jax_format"
CONVERTED_PARAMS_DIR = "params"
CONVERTED_DTYPE_KEY = "_ernie_jax_dtype"
DIFFUSERS_CLASS_NAME = "ErnieImageTransformer2DModel"

# name -> (torch layout -> ernie_jax layout, ernie_jax layout -> torch layout)
TRANSFORMS = {
    "linear": (lambda w: w.T, lambda k: k.T),  # [out, in] <-> [in, out]
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
    "none": (lambda w: w, lambda w: w),
}


@dataclasses.dataclass(frozen=True)
class KeyRule:
    torch_key: str
    path: tuple[str, ...]
    transform: str = "none"

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.torch_key

    def torch_keys(self, num_layers: int) -> list[str]:
        if self.stacked:
            return [self.torch_key.format(layer=i) for i in range(num_layers)]
        return [self.torch_key]

    def pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.torch_key).replace(re.escape("{layer}"), r"\d+") + "$")


def _linear_rules(torch_name: str, path: tuple[str, ...], bias: bool) -> list[KeyRule]:
    rules = [KeyRule(f"{torch_name}.weight", path + ("kernel",), "linear")]
    if bias:
        rules.append(KeyRule(f"{torch_name}.bias", path + ("bias",)))
    return rules


def key_table(config: ErnieImageConfig) -> list[KeyRule]:
    """Every tensor of the diffusers `ErnieImageTransformer2DModel` for `config`, in state-dict order."""
    block = "layers.{layer}"
    rules = [KeyRule("x_embedder.proj.weight", ("x_embedder", "kernel"), "conv"),
             KeyRule("x_embedder.proj.bias", ("x_embedder", "bias"))]
    if config.has_text_proj:
        rules += _linear_rules("text_proj", ("text_proj",), bias=False)
    rules += _linear_rules("time_embedding.linear_1", ("time_embedding", "linear_1"), bias=True)
    rules += _linear_rules("time_embedding.linear_2", ("time_embedding", "linear_2"), bias=True)
    rules += _linear_rules("adaLN_modulation.1", ("adaLN_modulation",), bias=True)
    rules.append(KeyRule(f"{block}.adaLN_sa_ln.weight", ("layers", "adaLN_sa_ln", "scale")))
    for name in ("to_q", "to_k", "to_v"):
        rules += _linear_rules(f"{block}.self_attention.{name}", ("layers", "self_attention", name), bias=False)
    rules += _linear_rules(f"{block}.self_attention.to_out.0", ("layers", "self_attention", "to_out"), bias=False)
    if config.qk_layernorm:
        rules += [KeyRule(f"{block}.self_attention.norm_q.weight", ("layers", "self_attention", "norm_q", "scale")),
                  KeyRule(f"{block}.self_attention.norm_k.weight", ("layers", "self_attention", "norm_k", "scale"))]
    rules.append(KeyRule(f"{block}.adaLN_mlp_ln.weight", ("layers", "adaLN_mlp_ln", "scale")))
    for name in ("gate_proj", "up_proj", "linear_fc2"):
        rules += _linear_rules(f"{block}.mlp.{name}", ("layers", "mlp", name), bias=False)
    rules += _linear_rules("final_norm.linear", ("final_norm", "linear"), bias=True)
    rules += _linear_rules("final_linear", ("final_linear",), bias=True)
    return rules


def _get(tree: dict, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def expected_torch_shapes(config: ErnieImageConfig) -> dict[str, tuple[int, ...]]:
    """`{diffusers key: shape}` for `config`, derived from `nnx.eval_shape` of the model."""
    abstract = nnx.to_pure_dict(nnx.state(abstract_transformer(config)))
    shapes = {}
    for rule in key_table(config):
        shape = _get(abstract, rule.path).shape
        per_layer = shape[1:] if rule.stacked else shape
        torch_shape = TRANSFORMS[rule.transform][1](np.empty(per_layer, np.bool_)).shape
        for key in rule.torch_keys(config.num_layers):
            shapes[key] = tuple(torch_shape)
    return shapes


def check_tensors(source: TensorSource, config: ErnieImageConfig, where: str) -> None:
    """Raises `CheckpointError` naming missing, mis-shaped or config-contradicting keys; warns on extras."""
    expected = expected_torch_shapes(config)
    missing = [k for k in expected if k not in source]
    wrong = [f"{k} {source.shape(k)} (expected {expected[k]})" for k in expected
             if k in source and source.shape(k) != expected[k]]
    extra = [k for k in source.keys() if k not in expected]
    # Keys of the architecture's own naming (any layer index, optional modules included).
    every_module = dataclasses.replace(config, text_in_dim=config.hidden_size + 1, qk_layernorm=True)
    ours = [rule.pattern() for rule in key_table(every_module)]
    contradicting = [k for k in extra if any(p.match(k) for p in ours)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors ({_first(missing)})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape ({_first(wrong)})")
    if contradicting:
        problems.append(f"{len(contradicting)} tensors the config does not expect ({_first(contradicting)})")
    if problems:
        hint = " - the config disagrees with the weights" if wrong or contradicting else ""
        raise CheckpointError(f"{where}: {'; '.join(problems)}{hint}")
    unexpected = [k for k in extra if k not in contradicting]
    if unexpected:
        logger.warning("%s: ignoring %d unexpected tensors: %s", where, len(unexpected), ", ".join(unexpected))


def _first(items: list[str], count: int = 3) -> str:
    shown = ", ".join(items[:count])
    return shown + (f", ... {len(items) - count} more" if len(items) > count else "")


def infer_config(source: TensorSource, where: str) -> ErnieImageConfig:
    """Reads a config off the tensor shapes of a checkpoint that carries none (single-file releases).

    The head dim comes from the q-norm weight; RoPE settings and eps are the released model's.
    """
    try:
        hidden, in_channels, patch, _ = source.shape("x_embedder.proj.weight")
        head_dim = source.shape("layers.0.self_attention.norm_q.weight")[0]
        out_features = source.shape("final_linear.weight")[0]
        num_layers = 1 + max(int(m.group(1)) for k in source.keys()
                             if (m := re.match(r"layers\.(\d+)\.", k)))
        ffn = source.shape("layers.0.mlp.gate_proj.weight")[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot infer the transformer config from the tensors (missing {e}); "
                              f"put a config.json beside the file") from e
    text_in_dim = source.shape("text_proj.weight")[1] if "text_proj.weight" in source else hidden
    return ErnieImageConfig(hidden_size=hidden, num_attention_heads=hidden // head_dim, num_layers=num_layers,
                            ffn_hidden_size=ffn, in_channels=in_channels,
                            out_channels=out_features // (patch * patch), patch_size=patch, text_in_dim=text_in_dim)


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _config_from_json(path: Path) -> ErnieImageConfig:
    try:
        return ErnieImageConfig.from_dict(_read_config(path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


@dataclasses.dataclass
class TransformerCheckpoint:
    """A located transformer checkpoint: its config and either safetensors tensors or an Orbax folder."""

    config: ErnieImageConfig
    where: Path
    tensors: TensorSource | None = None
    orbax_dir: Path | None = None
    converted_dtype: str | None = None

    @property
    def stored_dtype(self) -> str:
        """The dtype the parameters are stored in (for safetensors, the most common floating dtype)."""
        if self.converted_dtype:
            return self.converted_dtype
        counts: dict[str, int] = {}
        for key in self.tensors.keys():
            dtype = self.tensors.info(key).dtype
            if dtype.kind == "f" or dtype.name == "bfloat16":
                counts[dtype.name] = counts.get(dtype.name, 0) + 1
        return max(counts, key=counts.get) if counts else "float32"


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
        config = _config_from_json(config_path) if config_path.is_file() else infer_config(tensors, str(path))
        check_tensors(tensors, config, str(path))
        return TransformerCheckpoint(config, path, tensors=tensors)
    if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
        return open_checkpoint(path / "transformer")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no config.json (not a diffusers transformer folder or converted checkpoint)")
    raw_config = _read_config(config_path)
    config = _config_from_json(config_path)
    if CONVERTED_FORMAT_KEY in raw_config:
        orbax_dir = path / CONVERTED_PARAMS_DIR
        if not orbax_dir.is_dir():
            raise CheckpointError(f"{path}: converted checkpoint without its {CONVERTED_PARAMS_DIR}/ folder")
        return TransformerCheckpoint(config, path, orbax_dir=orbax_dir.resolve(),
                                     converted_dtype=raw_config.get(CONVERTED_DTYPE_KEY, "float32"))
    if (path / INDEX_NAME).is_file():
        tensors = TensorSource.from_index(path / INDEX_NAME)
    elif (path / WEIGHTS_NAME).is_file():
        tensors = TensorSource([path / WEIGHTS_NAME])
    else:
        raise CheckpointError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")
    check_tensors(tensors, config, str(path))
    return TransformerCheckpoint(config, path, tensors=tensors)


def _read_param(tensors: TensorSource, rule: KeyRule, target: jax.ShapeDtypeStruct, num_layers: int, sharding):
    """One parameter as a jax.Array placed by `sharding`, each device's slice read from the memory map."""
    to_jax = TRANSFORMS[rule.transform][0]

    def read(index):
        if not rule.stacked:
            return np.asarray(to_jax(tensors[rule.torch_key])[index], target.dtype)
        layer_ids = range(num_layers)[index[0]]
        return np.stack([np.asarray(to_jax(tensors[rule.torch_key.format(layer=i)])[index[1:]], target.dtype)
                         for i in layer_ids])

    return jax.make_array_from_callback(target.shape, sharding, read)


def resolve_dtype(dtype) -> jnp.dtype:
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}") from e
    if resolved not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return resolved


def load_transformer(path, dtype="float32", *, param_dtype=None, attention_impl: str = "xla", remat: str = "none",
                     scan_layers: bool = True, sharding=None) -> ErnieImageTransformer:
    """Loads the ERNIE-Image transformer from any layout `open_checkpoint` accepts.

    `dtype` is the compute dtype; parameters are stored in `param_dtype` (default: `dtype`, as diffusers'
    `torch_dtype` does). `sharding` places every parameter (default: the first device).
    """
    return load_checkpoint(open_checkpoint(path), dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                           remat=remat, scan_layers=scan_layers, sharding=sharding)


def load_checkpoint(checkpoint: TransformerCheckpoint, dtype="float32", *, param_dtype=None,
                    attention_impl: str = "xla", remat: str = "none", scan_layers: bool = True,
                    sharding=None) -> ErnieImageTransformer:
    """`load_transformer` for an already opened checkpoint."""
    dtype = resolve_dtype(dtype)
    param_dtype = dtype if param_dtype is None else resolve_dtype(param_dtype)
    config = checkpoint.config
    abstract = abstract_transformer(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                    remat=remat, scan_layers=scan_layers)
    graphdef, abstract_state = nnx.split(abstract)
    target = nnx.to_pure_dict(abstract_state)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if checkpoint.orbax_dir is not None:
        values = restore_params(checkpoint.orbax_dir, target, sharding)
    else:
        values = {}
        for rule in key_table(config):
            _set(values, rule.path, _read_param(checkpoint.tensors, rule, _get(target, rule.path),
                                                config.num_layers, sharding))
    nnx.replace_by_pure_dict(abstract_state, values)
    return nnx.merge(graphdef, abstract_state)


def restore_params(orbax_dir: Path, target: dict, sharding) -> dict:
    """Restores an Orbax parameter tree into `target`'s shapes and dtypes, placed by `sharding`."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding), target)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(orbax_dir, abstract)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{orbax_dir}: cannot restore the converted parameters ({e})") from e


def transformer_state_dict(model: ErnieImageTransformer) -> dict[str, np.ndarray]:
    """The diffusers state dict `{key: np.ndarray}` of `model`, in its parameter dtype."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state_dict = {}
    for rule in key_table(model.config):
        to_torch = TRANSFORMS[rule.transform][1]
        value = np.asarray(jax.device_get(_get(params, rule.path)))
        if rule.stacked:
            for i, key in enumerate(rule.torch_keys(model.config.num_layers)):
                state_dict[key] = np.ascontiguousarray(to_torch(value[i]))
        else:
            state_dict[rule.torch_key] = np.ascontiguousarray(to_torch(value))
    return state_dict


def diffusers_config(config: ErnieImageConfig) -> dict:
    """The `config.json` diffusers writes for this transformer."""
    return {"_class_name": DIFFUSERS_CLASS_NAME, "_diffusers_version": "0.42.1", **config.to_dict()}
