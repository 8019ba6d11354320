"""LoRA adapters on the `layers.Linear` layers of any model (the DiT's, the text encoder's), as PEFT builds them.

An adapted layer computes `base(x) + dropout(x) @ A @ B * scale` with A `[in, r]` and B `[r, out]` (PEFT's
`lora_A.weight.T` and `lora_B.weight.T`), scale = alpha / r (rsLoRA: alpha / sqrt(r)). A starts as PEFT's
kaiming-uniform (a = sqrt(5): uniform in +-1/sqrt(in)) and B at zero, so a fresh adapter changes nothing. In a
stacked module (`layers.create_stacked`) the kernel is `[L, in, out]` and so are the adapters, A `[L, in, r]`,
B `[L, r, out]`: one adapter per layer, run by the same scan.

Adapters are `LoRAParam`s (a subclass of nnx.Param), always float32 whatever the base's dtype, with the base
kernel's logical axes on their outer dimensions (A: (in_axis, None), B: (None, out_axis), after any `layers`
axis), so a rule table places them like their base layer. The base's parameters keep their paths (`kernel`,
`bias`); the adapter sits beside them at `<linear>/lora/{a,b}`. So

    graphdef, adapters, base = nnx.split(model, LoRAParam, ...)

separates what LoRA trains from the frozen base, and `base` merges into the plain model's graphdef unchanged
(`without_adapters`): the base with the adapter switched off runs on the same arrays, with no second copy.

Dropout (on the adapter's input only, as PEFT) is active only in training mode: `set_training(model, key)`
switches it on with masks drawn from `key` (call it with a fresh key every step, inside the step: the keys are
not part of the model's state otherwise), `set_training(model, None)` switches it off. nnx's
`model.train()` / `model.eval()` flip the same `deterministic` flag, but training mode with dropout needs keys.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.models import layers


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: `nnx.split(model, LoRAParam, ...)` separates adapters from the base."""


class LoRADropoutKey(nnx.Variable):
    """The PRNG key(s) of one adapter's dropout in training mode (one per stacked layer)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which Linear layers get adapters, and their rank, scale and dropout (PEFT's LoraConfig fields).

    `target_modules` follows PEFT: a sequence of names selects every layer whose module name equals a name or
    ends with "." + name ("to_q", "self_attention.to_out.0", "layers.3.mlp.up_proj"); a single string is a
    regular expression that must match the whole module name (`re.fullmatch`, e.g. r"layers\\.\\d+\\.mlp\\..*").
    Module names are what `add_lora` is given (for the DiT, diffusers' names: conversions.lora.diffusers_names).
    `alpha` defaults to `rank` (scale 1); `use_rslora` scales by alpha / sqrt(rank) instead of alpha / rank.
    """

    rank: int
    alpha: float | None = None
    target_modules: str | tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    use_rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        targets = self.target_modules
        if not isinstance(targets, str):
            targets = tuple(targets)
            object.__setattr__(self, "target_modules", targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1], got {self.dropout!r}")
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"LoRA target_modules {targets!r} is not a valid regular expression ({e})") from e
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"LoRA target_modules must be a regular expression or a non-empty sequence of "
                             f"non-empty module names, got {self.target_modules!r}")

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def matches(self, name: str) -> bool:
        """Whether module `name` is a target (PEFT's rule, see the class docstring)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(_is_named(name, target) for target in self.target_modules)


def _is_named(name: str, target: str) -> bool:
    """PEFT's rule for one name of a target list: the module name is it or ends with "." + it."""
    return name == target or name.endswith("." + target)


class LoRA(nnx.Module):
    """The adapter of one Linear: `(x [..., in], y [..., out]) -> y + dropout(x) @ a @ b * scale`.

    `a` `[*lead, in, r]` and `b` `[*lead, r, out]` with `lead` the base kernel's leading (stacked-layer) axes.
    The update is computed in float32 and added to the base output in float32, then rounded to its dtype
    (PEFT's order for a bf16 base with fp32 adapters).
    """

    def __init__(self, kernel: nnx.Param, rank: int, scale: float, dropout: float, rngs: nnx.Rngs):
        *lead, in_features, out_features = kernel.shape
        names = tuple(kernel.get_metadata()["out_sharding"])
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) over fan_in = in_features
        self.a = LoRAParam(jax.random.uniform(rngs.params(), (*lead, in_features, rank), jnp.float32, -bound, bound),
                           out_sharding=names[:-1] + (None,), eager_sharding=False)
        self.b = LoRAParam(jnp.zeros((*lead, rank, out_features), jnp.float32),
                           out_sharding=names[:-2] + (None, names[-1]), eager_sharding=False)
        self.scale = scale
        self.dropout = dropout
        self.deterministic = True
        self.dropout_key = nnx.data(None)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.dropout > 0 and not self.deterministic:
            if self.dropout_key is None:
                raise ValueError("LoRA dropout in training mode needs keys: call lora.set_training(model, key)")
            if self.dropout == 1.0:
                x = jnp.zeros_like(x)
            else:
                keep = jax.random.bernoulli(self.dropout_key[...], 1.0 - self.dropout, x.shape)
                x = jnp.where(keep, x / (1.0 - self.dropout), 0.0)
        update = (x @ self.a[...]) @ self.b[...]
        return (y.astype(jnp.float32) + update * self.scale).astype(y.dtype)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]


def _linears(model: nnx.Module) -> list[tuple[tuple[str, ...], layers.Linear]]:
    return [(tuple(map(str, path)), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, layers.Linear)]


def adapters(model: nnx.Module) -> list[tuple[tuple[str, ...], LoRA]]:
    """`(path of the Linear, its adapter)` for every adapted layer of `model`, in graph order."""
    return [(path, linear.lora) for path, linear in _linears(model) if linear.lora is not None]


def default_names(model: nnx.Module) -> dict[tuple[str, ...], str]:
    """Every Linear's path joined by "." (a stacked layer's name covers all its layers)."""
    return {path: ".".join(path) for path, _ in _linears(model)}


def add_lora(model: nnx.Module, config: LoRAConfig, rngs: nnx.Rngs,
             module_names: Mapping[tuple[str, ...], str] | None = None) -> nnx.Module:
    """Attaches a fresh adapter (in place) to every Linear of `model` whose module name `config` targets, and
    returns `model`.

    `module_names` maps each Linear's path in `model` to the name the patterns are matched against; a name
    with `{layer}` stands for each layer of a stacked Linear (e.g. "layers.{layer}.self_attention.to_q"), and
    the targets must then select all of its layers or none (a stacked adapter covers every layer). Default:
    `default_names`. A Linear that already has an adapter, a target name that selects nothing and a config
    that selects nothing are errors.
    """
    names = default_names(model) if module_names is None else dict(module_names)
    linears = _linears(model)
    selected = []
    matched_names: list[str] = []
    for path, linear in linears:
        if path not in names:
            raise ValueError(f"no module name for the Linear at {'/'.join(path)}")
        name = names[path]
        if "{layer}" in name:
            expanded = [name.format(layer=i) for i in range(linear.kernel.shape[0])]
        else:
            expanded = [name]
        hits = [n for n in expanded if config.matches(n)]
        if hits and len(hits) != len(expanded):
            raise ValueError(f"LoRA target_modules {config.target_modules!r} select {len(hits)} of the "
                             f"{len(expanded)} stacked layers of {name} ({hits[0]}, ...); adapters on stacked "
                             f"layers cover all of them")
        if hits:
            if linear.lora is not None:
                raise ValueError(f"{name} already has a LoRA adapter")
            selected.append(linear)
            matched_names += hits
    if not isinstance(config.target_modules, str):
        unmatched = [t for t in config.target_modules if not any(_is_named(n, t) for n in matched_names)]
        if unmatched:
            raise ValueError(f"LoRA target_modules {unmatched} match no Linear layer; module names are like "
                             f"{_examples(names)}")
    if not selected:
        raise ValueError(f"LoRA target_modules {config.target_modules!r} match no Linear layer; module names are "
                         f"like {_examples(names)}")
    for linear in selected:
        linear.lora = LoRA(linear.kernel, config.rank, config.scale, config.dropout, rngs)
    return model


def _examples(names: Mapping[tuple[str, ...], str], count: int = 4) -> str:
    shown = sorted(set(names.values()))
    return ", ".join(shown[:count]) + (", ..." if len(shown) > count else "")


def set_training(model: nnx.Module, key: jax.Array | None) -> nnx.Module:
    """Training mode (adapter dropout on, masks drawn from `key`, one key per adapter and stacked layer) or,
    with `key=None`, inference mode (dropout off). In place; returns `model`."""
    found = adapters(model)
    keys = None if key is None else jax.random.split(key, max(len(found), 1))
    for i, (_, adapter) in enumerate(found):
        adapter.deterministic = key is None
        if key is None or adapter.dropout == 0:
            adapter.dropout_key = nnx.data(None)
            continue
        lead = adapter.a.shape[:-2]
        layer_keys = jax.random.split(keys[i], lead) if lead else keys[i]
        adapter.dropout_key = LoRADropoutKey(layer_keys, out_sharding=adapter.a.get_metadata()["out_sharding"][:-2],
                                             eager_sharding=False)
    return model


def without_adapters(model: nnx.Module) -> nnx.Module:
    """The base model with every adapter switched off: a plain model sharing `model`'s base arrays (no copy).

    Its graphdef is the plain model's, so `nnx.merge(nnx.graphdef(without_adapters(model)), base)` with `base`
    the non-LoRAParam state of `model` runs the base inside a pure function."""
    plain = nnx.clone(model)
    for _, linear in _linears(plain):
        linear.lora = nnx.data(None)
    return plain


def merged_kernel(kernel: jax.Array, adapter: LoRA) -> jax.Array:
    """`kernel + scale * a @ b` (per stacked layer), computed in float32 and rounded to the kernel's dtype."""
    update = jnp.einsum("...ir,...ro->...io", adapter.a[...], adapter.b[...]) * adapter.scale
    return (kernel.astype(jnp.float32) + update).astype(kernel.dtype)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A plain model whose kernels are `W + scale * A @ B`, adapters removed (`model` is left as it is)."""
    merged = nnx.clone(model)
    for _, linear in _linears(merged):
        if linear.lora is not None:
            linear.kernel[...] = merged_kernel(linear.kernel[...], linear.lora)
            linear.lora = nnx.data(None)
    return merged

