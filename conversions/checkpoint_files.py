"""File-level helpers shared by every component's converter: configs, weight files, dtypes, Orbax."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from conversions.key_table import read_params
from conversions.safetensors_io import CheckpointError, TensorSource

CONVERTED_FORMAT_KEY = "_ernie_jax_format"
CONVERTED_DTYPE_KEY = "_ernie_jax_dtype"
CONVERTED_PARAMS_DIR = "params"


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or `CheckpointError` naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def parse_config(build, values: dict, where):
    """`build(values)` (a config class's constructor from a config.json dict), with a bad value reported
    as a `CheckpointError` naming `where`."""
    try:
        return build(values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from e


def locate_component(path, subfolder: str, kind: str) -> tuple[Path, dict]:
    """The component folder at `path` (or a pipeline folder's `subfolder/`) and its raw config.json.
    `kind` names the expected folder in errors (e.g. "diffusers VAE")."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected a {kind} folder or a converted checkpoint)")
    if (path / "model_index.json").is_file() and (path / subfolder).is_dir():
        path = path / subfolder
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not a {kind} folder or converted checkpoint)")
    return path, read_json(path / "config.json")


def open_weights(folder: Path, weights_name: str, **naming) -> TensorSource:
    """`weights_name` (e.g. `model.safetensors`) in `folder`, or its sharded `*.index.json` form.
    `naming` (strip_prefix, rename) is passed to `TensorSource`."""
    folder = Path(folder)
    if (folder / f"{weights_name}.index.json").is_file():
        return TensorSource.from_index(folder / f"{weights_name}.index.json", **naming)
    if (folder / weights_name).is_file():
        return TensorSource([folder / weights_name], **naming)
    raise CheckpointError(f"{folder}: neither {weights_name} nor {weights_name}.index.json found")


def stored_dtype(tensors: TensorSource) -> str:
    """The most common floating dtype among the tensors (what the checkpoint is 'stored in')."""
    counts: dict[str, int] = {}
    for key in tensors.keys():
        dtype = tensors.info(key).dtype
        if dtype.kind == "f" or dtype.name == "bfloat16":
            counts[dtype.name] = counts.get(dtype.name, 0) + 1
    return max(counts, key=counts.get) if counts else "float32"


@dataclasses.dataclass
class Checkpoint:
    """A located, validated component checkpoint: its config and either safetensors tensors or a
    converted Orbax folder (`converted_dtype` set)."""

    config: Any
    where: Path
    tensors: TensorSource | None = None
    converted_dtype: str | None = None

    @property
    def stored_dtype(self) -> str:
        return self.converted_dtype or stored_dtype(self.tensors)

    @classmethod
    def converted(cls, config, where: Path, raw_config: dict, **extra) -> "Checkpoint":
        return cls(config, where, converted_dtype=raw_config.get(CONVERTED_DTYPE_KEY, "float32"), **extra)


def resolve_dtype(dtype) -> jnp.dtype:
    """'float32' / 'bfloat16' / 'float16' (or the dtype itself) -> a jnp dtype; anything else is an error."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}") from e
    if resolved not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return resolved


def resolve_dtypes(dtype, param_dtype=None) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, parameter dtype); the parameters default to the compute dtype, as diffusers'
    `torch_dtype` does."""
    dtype = resolve_dtype(dtype)
    return dtype, dtype if param_dtype is None else resolve_dtype(param_dtype)


def load_module(abstract, checkpoint: Checkpoint, rules, num_layers: int, *, sharding=None, mesh=None,
                axis_rules=None):
    """Fills `abstract` (a module from `nnx.eval_shape`) from `checkpoint`: a converted folder is restored
    with Orbax, safetensors are streamed through the key table `rules`.

    Placement: with a `mesh`, each variable goes straight into the sharding its logical axes get under
    `axis_rules` (default: ernie_jax.parallel.INFERENCE_RULES), each device reading only its slice;
    otherwise every variable goes to `sharding` (default: this process's first device)."""
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(state)
    if mesh is not None:
        from ernie_jax import parallel

        shardings = nnx.to_pure_dict(parallel.state_shardings(state, mesh, axis_rules or parallel.INFERENCE_RULES))
    else:
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: sharding, target)
    if checkpoint.converted_dtype is not None:
        values = restore_params(checkpoint.where, target, shardings)
    else:
        values = read_params(checkpoint.tensors, rules, target, num_layers, shardings)
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def is_converted(config: dict) -> bool:
    return CONVERTED_FORMAT_KEY in config


def save_params(folder: Path, params: dict) -> None:
    """Writes a pure-dict parameter tree as an Orbax checkpoint at `folder/params`."""
    with ocp.StandardCheckpointer() as checkpointer:
        # Orbax refuses relative paths.
        checkpointer.save((Path(folder) / CONVERTED_PARAMS_DIR).resolve(), params)


def restore_params(folder: Path, target: dict, shardings: dict) -> dict:
    """Restores `folder/params` into `target`'s shapes and dtypes (abstract leaves), each leaf placed by the
    sharding at its path in `shardings` (any mesh, not necessarily the one it was saved from)."""
    params_dir = (Path(folder) / CONVERTED_PARAMS_DIR).resolve()
    if not params_dir.is_dir():
        raise CheckpointError(f"{folder}: converted checkpoint without its {CONVERTED_PARAMS_DIR}/ folder")
    abstract = jax.tree.map(lambda t, sharding: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding), target,
                            shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(params_dir, abstract)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{params_dir}: cannot restore the converted parameters ({e})") from e
