"""Declarative weight tables: reference (PyTorch state-dict) keys <-> paths in an NNX parameter tree.

A component's converter is a list of `KeyRule`s plus its config handling; everything here is shared:
shape expectations derived from `nnx.eval_shape`, validation with one-line errors, streaming reads
from memory-mapped safetensors into target shardings, and export back to a state dict.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Iterable

import jax
import numpy as np

from conversions.safetensors_io import CheckpointError, TensorSource

logger = logging.getLogger(__name__)

# name -> (reference layout -> ernie_jax layout, ernie_jax layout -> reference layout)
TRANSFORMS = {
    "linear": (lambda w: w.T, lambda k: k.T),  # [out, in] <-> [in, out]
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
    "none": (lambda w: w, lambda w: w),
}


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One reference tensor (or, with `{layer}` in the key, one per stacked layer) and its parameter path."""

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
        """Matches this rule's keys for any layer index."""
        return re.compile(re.escape(self.torch_key).replace(re.escape("{layer}"), r"\d+") + "$")


def linear_rules(torch_name: str, path: tuple[str, ...], bias: bool) -> list[KeyRule]:
    """The rules of a torch.nn.Linear stored as an nnx.Linear (`kernel`, optional `bias`)."""
    rules = [KeyRule(f"{torch_name}.weight", path + ("kernel",), "linear")]
    if bias:
        rules.append(KeyRule(f"{torch_name}.bias", path + ("bias",)))
    return rules


def get_path(tree: dict, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def expected_shapes(rules: Iterable[KeyRule], abstract_params: dict, num_layers: int) -> dict[str, tuple]:
    """`{reference key: shape}` implied by the abstract parameter tree (a pure dict of shaped leaves)."""
    shapes = {}
    for rule in rules:
        shape = get_path(abstract_params, rule.path).shape
        per_layer = shape[1:] if rule.stacked else shape
        reference_shape = TRANSFORMS[rule.transform][1](np.empty(per_layer, np.bool_)).shape
        for key in rule.torch_keys(num_layers):
            shapes[key] = tuple(reference_shape)
    return shapes


def first(items: list[str], count: int = 3) -> str:
    """The first `count` items and how many more, for one-line messages."""
    shown = ", ".join(items[:count])
    return shown + (f", ... {len(items) - count} more" if len(items) > count else "")


def check_tensors(source: TensorSource, expected: dict[str, tuple], where: str, *,
                  own_patterns: Iterable[re.Pattern] = (), ignore: Callable[[str], bool] = lambda key: False) -> None:
    """Raises `CheckpointError` naming missing and mis-shaped tensors, and extra tensors that match
    `own_patterns` (the architecture's own names: a config that disagrees with the weights). Other
    extras are logged as a warning, except those `ignore` accepts (e.g. a vision tower we never run)."""
    missing = [k for k in expected if k not in source]
    wrong = [f"{k} {source.shape(k)} (expected {expected[k]})" for k in expected
             if k in source and source.shape(k) != expected[k]]
    extra = [k for k in source.keys() if k not in expected and not ignore(k)]
    patterns = list(own_patterns)
    contradicting = [k for k in extra if any(p.match(k) for p in patterns)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors ({first(missing)})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape ({first(wrong)})")
    if contradicting:
        problems.append(f"{len(contradicting)} tensors the config does not expect ({first(contradicting)})")
    if problems:
        hint = " - the config disagrees with the weights" if wrong or contradicting else ""
        raise CheckpointError(f"{where}: {'; '.join(problems)}{hint}")
    unexpected = [k for k in extra if k not in contradicting]
    if unexpected:
        logger.warning("%s: ignoring %d unexpected tensors: %s", where, len(unexpected), ", ".join(unexpected))


def read_param(source: TensorSource, rule: KeyRule, target, num_layers: int, sharding) -> jax.Array:
    """One parameter as a jax.Array placed by `sharding`; each local device's slice is read from the memory
    map, converted to `target.dtype` and placed before the next is read, so host memory holds one slice at a
    time (`jax.make_array_from_callback` would hold every local slice, i.e. the whole parameter on one host).
    A slice replicated on several devices is read once and copied between devices."""
    to_jax = TRANSFORMS[rule.transform][0]

    def read(index):
        if not rule.stacked:
            return np.asarray(to_jax(source[rule.torch_key])[index], target.dtype)
        stacked = np.empty(tuple(len(range(size)[part]) for size, part in zip(target.shape, index, strict=True)),
                           target.dtype)
        for position, layer in enumerate(range(num_layers)[index[0]]):
            # One layer's memory map at a time, cast straight into its place in the slice.
            stacked[position] = to_jax(source[rule.torch_key.format(layer=layer)])[index[1:]]
        return stacked

    placed: dict[tuple, jax.Array] = {}  # slice bounds -> the first device array holding them
    shards = []
    for device, index in sharding.addressable_devices_indices_map(target.shape).items():
        bounds = tuple((s.start, s.stop, s.step) for s in index)
        shard = jax.device_put(placed[bounds] if bounds in placed else read(index), device)
        placed.setdefault(bounds, shard)
        shards.append(shard.block_until_ready())
    return jax.make_array_from_single_device_arrays(target.shape, sharding, shards)


def read_params(source: TensorSource, rules: Iterable[KeyRule], target: dict, num_layers: int, shardings: dict
                ) -> dict:
    """The pure-dict parameter tree for `target` (abstract leaves), read from `source`, each parameter
    placed by the sharding at its path in `shardings` (a tree shaped like `target`)."""
    values: dict = {}
    for rule in rules:
        set_path(values, rule.path, read_param(source, rule, get_path(target, rule.path), num_layers,
                                               get_path(shardings, rule.path)))
    return values


def _host_tensor(value) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(value)))


def to_state_dict(rules: Iterable[KeyRule], params: dict, num_layers: int,
                  convert: Callable = _host_tensor) -> dict:
    """The reference state dict `{key: convert(tensor)}` of a pure-dict parameter tree: each tensor in the
    reference layout, one stacked layer at a time. The default `convert` gives contiguous host arrays;
    another can keep the layout change on the parameters' device and hand the result elsewhere (e.g. to
    torch on the same GPU)."""
    state_dict = {}
    for rule in rules:
        to_torch = TRANSFORMS[rule.transform][1]
        value = get_path(params, rule.path)
        if rule.stacked:
            for i, key in enumerate(rule.torch_keys(num_layers)):
                state_dict[key] = convert(to_torch(value[i]))
        else:
            state_dict[rule.torch_key] = convert(to_torch(value))
    return state_dict
