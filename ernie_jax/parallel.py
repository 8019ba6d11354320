"""Device meshes, logical-axis rule tables and sharding helpers.

One mesh with axes ("data", "fsdp", "context", "tensor"). Models name their parameter and activation
axes logically (`embed`, `heads`, `mlp`, `layers`, ... / `batch`, `length`, `act_embed`); a rule table
maps each logical name to mesh axes (or None = replicated). A parameter whose logical name has no rule
is an error, not silently replicated.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from ernie_jax.models import layers

MESH_AXES = ("data", "fsdp", "context", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Logical names that are never split (small vectors, spatial kernel dims, the stacked-layer axis).
_REPLICATED = (("layers", None), ("norm", None), ("head_dim", None), ("patch", None), ("conv_in", None),
               ("conv_out", None))
# The batch is split over fsdp and data, fsdp first. Not ("data", "fsdp"): XLA's SPMD partitioner (jax 0.10.2,
# Shardy and GSPMD alike) returns wrong values for a dot whose batch is split over (p, q), contraction over r
# and the weight's output dimension over q, e.g. to_out under data x fsdp x tensor (rows of the shards
# (data 0, fsdp 1) and (data 1, fsdp 0) swapped; docs/upstream/xla_batch_two_axes_repro.py). So no weight axis
# may come second here.
_BATCH_AXES = ("fsdp", "data")
# Training default: weights split over fsdp (embed) and tensor (heads/mlp), batch over fsdp and data,
# sequence over context.
TRAINING_RULES: Rules = (
    ("batch", _BATCH_AXES), ("length", "context"), ("act_embed", None), ("act_heads", "tensor"),
    ("embed", "fsdp"), ("embed_in", None), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
    ("vocab", "tensor"),
) + _REPLICATED
# Inference default: the same table, so that the mesh alone says how the weights are placed. A mesh whose
# fsdp axis has size 1 (data=8, say) leaves every weight whole on every device: data parallel, no weight
# gathers (`logical_to_spec` drops size-1 axes). A mesh that asks for fsdp > 1 splits the weights over it
# as in training: the 8B DiT's 16 GB of bf16 weights do not fit a 16 GB v5e chip whole, and fsdp=8 makes them
# 2 GB per chip.
INFERENCE_RULES: Rules = TRAINING_RULES
# The VAE (84M parameters) in every mode: weights replicated, the batch split over every mesh axis.
VAE_RULES: Rules = (
    ("batch", MESH_AXES), ("length", None), ("act_embed", None), ("act_heads", None), ("embed", None),
    ("embed_in", None), ("heads", None), ("kv_heads", None), ("mlp", None), ("vocab", None),
) + _REPLICATED
# Each pipeline component's default rule table per mode. The text encoder (and PE) are frozen in training,
# where their weights are split like the transformer's to leave it the memory; in inference too.
COMPONENT_RULES: dict[str, dict[str, Rules]] = {
    "training": {"transformer": TRAINING_RULES, "text_encoder": TRAINING_RULES, "pe": TRAINING_RULES,
                 "vae": VAE_RULES},
    "inference": {"transformer": INFERENCE_RULES, "text_encoder": INFERENCE_RULES, "pe": INFERENCE_RULES,
                  "vae": VAE_RULES},
}


def make_mesh(ici: Mapping[str, int], dcn: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh over all devices (of every process) from per-slice (`ici`) and across-slice (`dcn`) sizes.

    Axes missing from `ici` have size 1; one axis may be -1 (the rest of the devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(ici) - set(MESH_AXES)) + sorted(set(dcn or {}) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {MESH_AXES}")
    dcn_shape = [int((dcn or {}).get(axis, 1)) for axis in MESH_AXES]
    per_slice = len(devices) // math.prod(dcn_shape)
    shape = [int(ici.get(axis, 1)) for axis in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(ici)}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if per_slice % known:
            raise ValueError(f"mesh {dict(ici)} does not divide {per_slice} devices per slice")
        shape[shape.index(-1)] = per_slice // known
    if math.prod(shape) * math.prod(dcn_shape) != len(devices):
        raise ValueError(f"mesh ici {dict(ici)} x dcn {dict(dcn or {})} needs "
                         f"{math.prod(shape) * math.prod(dcn_shape)} devices, have {len(devices)}")
    if math.prod(dcn_shape) > 1:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(shape, dcn_shape, devices)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def normalize_mesh(mesh: Mesh | AbstractMesh) -> Mesh | AbstractMesh:
    """`mesh` as every program of this project runs on it: the same devices with every axis Auto.

    Any mesh with the axes MESH_AXES (in any order, size 1 where unused) is accepted, however it was made
    (`make_mesh`, `jax.make_mesh`, `Mesh(devices, names)`). Our programs place arrays by the shardings they
    give jit and by `with_sharding_constraint`, and leave the rest to XLA's propagation: that needs Auto
    axes. Under Explicit axes (jax.make_mesh's default) every dot would have to name its output sharding, and
    one contracting a split dimension is refused (ShardingTypeError).
    """
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if sorted(mesh.axis_names) != sorted(MESH_AXES):
        raise ValueError(f"mesh axes {tuple(mesh.axis_names)}: ernie_jax needs exactly the axes {MESH_AXES} (any "
                         f"order, size 1 where unused), e.g. jax.make_mesh((1, 8, 1, 1), {MESH_AXES})")
    if mesh.are_all_axes_auto:
        return mesh
    return mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=4,tensor=2' -> {'fsdp': 4, 'tensor': 2} (command-line form)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if not value:
            raise ValueError(f"bad mesh entry {part!r}; expected axis=size")
        sizes[name.strip()] = int(value)
    return sizes


def logical_to_spec(names: Sequence[str | None], rules: Rules, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """The PartitionSpec for logical axis `names` under `rules`.

    Unknown names are an error. A mesh axis is used at most once per array (the first dimension asking
    for it gets it), and a dimension not divisible by its mesh axes stays unsplit (given shape and mesh).
    """
    if mesh is not None:
        mesh = normalize_mesh(mesh)
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"no sharding rule for logical axis {name!r}")
        axes = table[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        if shape is not None and mesh is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _variable_names(variable) -> tuple:
    names = variable.get_metadata().get("out_sharding")
    if names is None:
        raise ValueError(f"variable of shape {variable.shape} carries no logical axis names")
    return tuple(names)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules):
    """NamedShardings for every variable of an (abstract or concrete) nnx state, from its logical names."""
    mesh = normalize_mesh(mesh)
    return jax.tree.map(
        lambda v: NamedSharding(mesh, logical_to_spec(_variable_names(v), rules, v.shape, mesh)),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Places every variable of `model` by its logical names (in place) and returns the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.tree.map(_place, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return model


def put_array(value, sharding: NamedSharding) -> jax.Array:
    """`jax.device_put`, except for a process-local value (host array, or one on this process's devices)
    going to a sharding over other processes' devices too (device_put refuses a committed one): then each
    process builds its own shards from the host value, which must be the same in every process."""
    if sharding.is_fully_addressable or (isinstance(value, jax.Array) and not value.is_fully_addressable):
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _place(variable: nnx.Variable, sharding: NamedSharding) -> nnx.Variable:
    return variable.replace(put_array(variable[...], sharding))


def put(tree, shardings):
    """Every array (or nnx variable) of `tree` placed by `put_array` in its sharding; `shardings` is a prefix
    of `tree`, as jit's in_shardings are (jit refuses an argument committed to another sharding)."""
    return jax.tree.map(lambda sharding, x: _place(x, sharding) if isinstance(x, nnx.Variable)
                        else put_array(x, sharding), shardings, tree)


def replicated_parameters(model_or_state, mesh: Mesh, rules: Rules, threshold_bytes: int = 1 << 20
                          ) -> list[tuple[str, int]]:
    """(path, bytes) of every variable left fully replicated by `rules` and larger than `threshold_bytes`."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    report = []
    for path, variable in nnx.to_flat_state(state):
        spec = logical_to_spec(_variable_names(variable), rules, variable.shape, mesh)
        size = int(np.prod(variable.shape)) * np.dtype(variable.dtype).itemsize
        if all(axis is None for axis in spec) and size > threshold_bytes:
            report.append(("/".join(map(str, path)), size))
    return sorted(report, key=lambda item: -item[1])


def sharded_attention(mesh: Mesh, rules: Rules):
    """The `layers.ATTENTION_SHARDING` hook: runs an attention kernel per shard in `shard_map` on `mesh`.

    Query `[B, T, H, D]` and key/value `[B, S, K, D]` are split by their logical axes under `rules`; heads
    only where both H and K divide (grouped heads stay together). When the key sequence is split (context
    parallelism), each shard keeps its queries and all-gathers the keys and values over those mesh axes, so
    every query sees every key at its global position and the result is exact. key_lengths `[B]` follows
    the batch; a mask `[B, 1, T, S]` follows the batch and the query sequence. A length that the context
    axis does not divide stays whole (as `logical_to_spec` leaves it), and attention is then repeated on
    every context shard.
    """
    mesh = normalize_mesh(mesh)

    def run(local_attention, axes, query, key, value, key_lengths, mask):
        q_spec = logical_to_spec(axes, rules, query.shape, mesh)
        kv_spec = logical_to_spec(axes, rules, key.shape, mesh)
        heads = q_spec[2] if q_spec[2] == kv_spec[2] else None
        q_spec = PartitionSpec(q_spec[0], q_spec[1], heads, None)
        kv_spec = PartitionSpec(kv_spec[0], kv_spec[1], heads, None)
        sequence_axes = kv_spec[1]

        def per_shard(q, k, v, lengths, m):
            if sequence_axes is not None:
                k = jax.lax.all_gather(k, sequence_axes, axis=1, tiled=True)
                v = jax.lax.all_gather(v, sequence_axes, axis=1, tiled=True)
            return local_attention(q, k, v, lengths, m)

        lengths_spec = None if key_lengths is None else PartitionSpec(q_spec[0])
        mask_spec = None if mask is None else PartitionSpec(
            q_spec[0] if mask.shape[0] == query.shape[0] else None, None,
            q_spec[1] if mask.shape[2] == query.shape[1] else None, None)
        # check_vma=False: Pallas kernels (splash) do not declare which mesh axes their outputs vary over.
        return jax.shard_map(per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, lengths_spec, mask_spec),
                             out_specs=q_spec, check_vma=False)(query, key, value, key_lengths, mask)

    return run


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
    """Within the block (while tracing), `layers.constrain` pins activations to `rules` on `mesh` and
    `layers.attention` runs in `shard_map` (`sharded_attention`)."""
    mesh = normalize_mesh(mesh)

    def constrain(x, names):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules, x.shape, mesh)))

    token = layers.ACTIVATION_CONSTRAINT.set(constrain)
    attention_token = layers.ATTENTION_SHARDING.set(sharded_attention(mesh, rules))
    try:
        yield
    finally:
        layers.ATTENTION_SHARDING.reset(attention_token)
        layers.ACTIVATION_CONSTRAINT.reset(token)


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of `mesh` (any mesh with the four axes; see `normalize_mesh`)."""
    return NamedSharding(normalize_mesh(mesh), PartitionSpec())


def data_sharding(mesh: Mesh, rules: Rules, names: Iterable[str | None], shape: Sequence[int]) -> NamedSharding:
    """The sharding of an input/output array with logical axis `names`."""
    mesh = normalize_mesh(mesh)
    return NamedSharding(mesh, logical_to_spec(tuple(names), rules, shape, mesh))


def batch_sharding(mesh: Mesh, rules: Rules, shape: Sequence[int]) -> NamedSharding:
    """An array whose leading axis is the batch and whose other axes are whole."""
    return data_sharding(mesh, rules, ("batch",) + (None,) * (len(shape) - 1), shape)


def batch_shard_count(mesh: Mesh, rules: Rules) -> int:
    """Into how many pieces `rules` split a batch axis on `mesh` (a batch they divide; others stay whole)."""
    axes = logical_to_spec(("batch",), rules, mesh=mesh)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def component_rules(mode: str, overrides: Mapping[str, Rules] | None = None) -> dict[str, Rules]:
    """Each pipeline component's rule table: the `mode` ("training" | "inference") defaults of
    COMPONENT_RULES, with the tables of `overrides` (component -> rules) in place of some."""
    if mode not in COMPONENT_RULES:
        raise ValueError(f"mode must be one of {sorted(COMPONENT_RULES)}, got {mode!r}")
    unknown = sorted(set(overrides or {}) - set(COMPONENT_RULES[mode]))
    if unknown:
        raise ValueError(f"rules for unknown components {unknown}; the components are {sorted(COMPONENT_RULES[mode])}")
    return {**COMPONENT_RULES[mode], **(overrides or {})}


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of `x` as a host array, gathered from every process when it spans several."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def jit_sharded(fn, mesh: Mesh, rules: Rules, in_shardings, out_shardings, static_argnums=(), donate_argnums=()):
    """`jax.jit(fn)` with explicit shardings, traced under `activation_sharding(mesh, rules)` so that the
    models' `layers.constrain` calls pin activations to the same rules; called, traced and lowered with `mesh`
    as the context mesh (`ProgramOnMesh`)."""
    mesh = normalize_mesh(mesh)

    def traced(*args):
        with activation_sharding(mesh, rules):
            return fn(*args)

    return ProgramOnMesh(jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                                 static_argnums=static_argnums, donate_argnums=donate_argnums), mesh)


class ProgramOnMesh:
    """`jitted` (a `jax.jit` function whose shardings are on `mesh`) called, traced and lowered with `mesh` (Auto
    axes) as the context mesh. Called under a user's `jax.set_mesh` of a mesh with Explicit axes, jit would
    otherwise type the arguments with that mesh's axis types, which our programs do not use."""

    def __init__(self, jitted, mesh: Mesh):
        self.jitted = jitted
        self.abstract_mesh = normalize_mesh(mesh).abstract_mesh

    def __call__(self, *args, **kwargs):
        with jax.sharding.use_abstract_mesh(self.abstract_mesh):
            return self.jitted(*args, **kwargs)

    def trace(self, *args, **kwargs):
        with jax.sharding.use_abstract_mesh(self.abstract_mesh):
            return self.jitted.trace(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.sharding.use_abstract_mesh(self.abstract_mesh):
            return self.jitted.lower(*args, **kwargs)


def sharded_forward(model: nnx.Module, mesh: Mesh, rules: Rules):
    """The DiT forward `(hidden_states, timestep, text_bth, text_lens) -> velocity`, compiled with the
    parameters placed by `rules` and the batch split over the batch axes (compiled once per shape)."""
    graphdef, state = nnx.split(model)
    state_spec = state_shardings(state, mesh, rules)
    compiled = {}

    def forward(*inputs):
        inputs = tuple(jax.numpy.asarray(x) for x in inputs)
        shapes = tuple(x.shape for x in inputs)
        if shapes not in compiled:
            batch = [batch_sharding(mesh, rules, s) for s in shapes]
            compiled[shapes] = jit_sharded(lambda st, *a: nnx.merge(graphdef, st)(*a), mesh, rules,
                                           (state_spec, *batch), batch[0]), tuple(batch)
        program, batch = compiled[shapes]
        return program(state, *put(inputs, batch))

    return forward
