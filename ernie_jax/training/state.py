"""The train state of one or several named trainable models, and the frozen models beside it, each created
or placed directly in its shardings.

A trainable model is a `TrainablePart`: how to build it, which of its variables the optimizer updates
(`trained`: every `nnx.Param` for full training; the adapters for LoRA), its optimizer and EMA decay. The
train state holds, per part name, the trained variables (float32 master weights), their optimizer state and
their EMA (none for a part with `ema_decay` 0, whose average would be a copy of its weights); the rest of a
part's variables (a LoRA's frozen base) and whole frozen models (a DPO reference, distillation teachers) are
`frozen` states held beside it: placed by the same rule tables, passed to the step unchanged, never
checkpointed (they are reloaded from where they came from).

Variables stay `nnx.Variable`s with their logical axis names, and the Adam moments (which optax builds with
`jax.tree.map` over the parameters) keep them too: one rule table places all of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from ernie_jax import parallel


@dataclasses.dataclass(frozen=True)
class TrainablePart:
    """A model the trainer updates.

    `build(rngs)` makes it: its `trained` variables in float32 (`param_dtype`), any other variables (a
    frozen base) in the dtype they are kept in. `trained` is an nnx filter (default: every `nnx.Param`).
    `stochastic(model, key)`, if given, puts the model into training mode with randomness from `key` (e.g.
    LoRA dropout's `models.lora.set_training`); the step calls it on every microbatch's model.
    `ema_decay` 0 keeps no EMA (at 8B that copy is 32 GB of float32): the part's averaged weights are its
    trained ones.
    """

    build: Callable[[nnx.Rngs], nnx.Module]
    optimizer: optax.GradientTransformation
    ema_decay: float = 0.999
    trained: Any = nnx.Param
    learning_rate: optax.Schedule | None = None  # only reported as a metric
    stochastic: Callable[[nnx.Module, jax.Array], Any] | None = None

    def __post_init__(self):
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")


@struct.dataclass
class TrainState:
    """step: int32 [] optimizer updates done; params: {part: nnx.State of its trained variables} (float32);
    ema_params: the same for the parts that keep an EMA (`ema_decay` > 0); opt_state: {part: its optax
    state}; rng: uint32 [2] base key (step s draws from fold_in(rng, s), so a resumed run draws the same
    numbers)."""

    step: jax.Array
    params: dict[str, nnx.State]
    opt_state: dict[str, Any]
    ema_params: dict[str, nnx.State]
    rng: jax.Array

    def averaged_params(self) -> dict[str, nnx.State]:
        """Each part's EMA weights, or its trained weights where it keeps no EMA."""
        return {**self.params, **self.ema_params}


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def with_shardings(tree, mesh: Mesh, rules: parallel.Rules):
    """`tree` (abstract or concrete) as `jax.ShapeDtypeStruct`s with shardings: an nnx.Variable's from its
    logical names (the Variable wrapper and its metadata kept), any other leaf replicated."""
    replicated = parallel.replicated(mesh)

    def place(leaf):
        if _is_variable(leaf):
            sharding = parallel.state_shardings(leaf, mesh, rules)
            return leaf.replace(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)

    return jax.tree.map(place, tree, is_leaf=_is_variable)


def shardings_of(abstract):
    """The NamedSharding tree of an abstract tree from `with_shardings`."""
    return jax.tree.map(lambda leaf: leaf.sharding, abstract)


def split_part(model: nnx.Module, trained=nnx.Param) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trained variables, the rest) of a trainable model; `nnx.merge(graphdef, trained, rest)`
    rebuilds it. The rest may hold parameters (a frozen base) but no other kind of state (batch statistics,
    RNG counters), which the step would have to thread through."""
    graphdef, trained_state, rest = nnx.split(model, trained, ...)
    kinds = sorted({type(v).__name__ for _, v in nnx.to_flat_state(rest) if not isinstance(v, nnx.Param)})
    if kinds:
        raise ValueError(f"the model holds non-parameter state {kinds}; the trainer handles nnx.Param state only")
    if not jax.tree.leaves(trained_state):
        raise ValueError("the trained-variables filter selects nothing in the model")
    return graphdef, trained_state, rest


def abstract_parts(parts: Mapping[str, TrainablePart], *, seed: int
                   ) -> tuple[dict[str, nnx.GraphDef], dict[str, nnx.State], dict[str, nnx.State]]:
    """Per part: the graphdef, the abstract trained variables and the abstract rest (no memory used)."""
    graphdefs, trained, rest = {}, {}, {}
    for name, part in parts.items():
        graphdefs[name], trained[name], rest[name] = split_part(
            nnx.eval_shape(lambda p=part: p.build(nnx.Rngs(seed))), part.trained)
        if any(leaf.dtype != jnp.float32 for leaf in jax.tree.leaves(trained[name])):
            raise ValueError(f"part {name!r}: the trainer keeps float32 master weights: build its trained "
                             f"variables with param_dtype=float32")
    return graphdefs, trained, rest


def _fresh_state(params: dict[str, nnx.State], parts: Mapping[str, TrainablePart], seed: int) -> TrainState:
    """Step 0: each part's optimizer's initial state and, where it keeps one, the EMA at its initial
    parameters."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state={name: parts[name].optimizer.init(p) for name, p in params.items()},
                      ema_params={name: p for name, p in params.items() if parts[name].ema_decay > 0},
                      rng=jax.random.key_data(jax.random.key(seed)))


def abstract_train_state(parts: Mapping[str, TrainablePart], *, seed: int, mesh: Mesh, rules: parallel.Rules
                         ) -> tuple[dict[str, nnx.GraphDef], TrainState]:
    """The graphdefs and the train state as `jax.ShapeDtypeStruct`s carrying their target shardings (what a
    checkpoint restores into, and what `jit_train_step` compiles for)."""
    graphdefs, trained, _ = abstract_parts(parts, seed=seed)
    state = jax.eval_shape(lambda p: _fresh_state(p, parts, seed), trained)
    return graphdefs, with_shardings(state, mesh, rules)


def create_train_state(parts: Mapping[str, TrainablePart], *, seed: int, mesh: Mesh, rules: parallel.Rules,
                       initial: Mapping[str, nnx.Module] | None = None) -> tuple[dict[str, nnx.GraphDef], TrainState]:
    """The graphdefs and a fresh train state, made inside one jit whose outputs are already in their
    shardings (no full copy is ever built on one device).

    A part named in `initial` starts from that model's trained variables (e.g. a pretrained transformer's,
    in any dtype and placement: they are cast to float32 into the train state's shardings); the others are
    initialised by their `build` with `seed`.
    """
    graphdefs, abstract = abstract_train_state(parts, seed=seed, mesh=mesh, rules=rules)
    given = {name: _like(split_part(model, parts[name].trained)[1], abstract.params[name], name)
             for name, model in _checked(initial, parts).items()}

    def init(given: dict[str, nnx.State]) -> TrainState:
        params = {}
        for name, part in parts.items():
            if name in given:
                params[name] = jax.tree.map(lambda x: x.astype(jnp.float32), given[name])
            else:
                params[name] = split_part(part.build(nnx.Rngs(seed)), part.trained)[1]
        return _fresh_state(params, parts, seed)

    return graphdefs, jax.jit(init, out_shardings=shardings_of(abstract))(given)


def part_rests(parts: Mapping[str, TrainablePart], *, seed: int, mesh: Mesh, rules: parallel.Rules,
               initial: Mapping[str, nnx.Module] | None = None) -> dict[str, nnx.State]:
    """The frozen rest of each part that has one (a LoRA's base), in its shardings: taken from the part's
    `initial` model, else built by its `build` with `seed`. Parts trained whole are left out."""
    initial = _checked(initial, parts)
    _, _, abstract_rests = abstract_parts(parts, seed=seed)
    rests = {}
    for name, part in parts.items():
        if not jax.tree.leaves(abstract_rests[name]):
            continue
        if name in initial:
            rests[name] = place(split_part(initial[name], part.trained)[2], mesh, rules)
        else:
            target = shardings_of(with_shardings(abstract_rests[name], mesh, rules))
            rests[name] = jax.jit(lambda p=part: split_part(p.build(nnx.Rngs(seed)), p.trained)[2],
                                  out_shardings=target)()
    return rests


def _checked(initial: Mapping[str, nnx.Module] | None, parts: Mapping[str, TrainablePart]) -> dict:
    initial = dict(initial or {})
    unknown = sorted(set(initial) - set(parts))
    if unknown:
        raise ValueError(f"initial models for {unknown}, which are not trainable parts ({sorted(parts)})")
    return initial


def _like(weights: nnx.State, abstract: nnx.State, name: str) -> nnx.State:
    """`weights`' arrays in `abstract`'s tree (its Variables and metadata), checked path by path."""
    given = jax.tree_util.tree_flatten_with_path(weights)[0]
    expected = jax.tree_util.tree_flatten_with_path(abstract)[0]
    given_shapes = [(jax.tree_util.keystr(path), tuple(x.shape)) for path, x in given]
    expected_shapes = [(jax.tree_util.keystr(path), tuple(x.shape)) for path, x in expected]
    if given_shapes != expected_shapes:
        difference = sorted(set(given_shapes) ^ set(expected_shapes))[:4]
        raise ValueError(f"initial weights of part {name!r} do not match its trained variables (first "
                         f"differences, path and shape: {difference})")
    return jax.tree.unflatten(jax.tree.structure(abstract), [x for _, x in given])


def place(state: nnx.State, mesh: Mesh, rules: parallel.Rules, dtype=None) -> nnx.State:
    """A frozen state moved (and cast to `dtype`, if given) into the shardings its logical names give, as
    one jitted program (no copy gathered on one device); returned as it is when it already lies there in
    that dtype (no second copy of a frozen model)."""
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
    target = shardings_of(with_shardings(jax.eval_shape(lambda s: jax.tree.map(cast, s), state), mesh, rules))
    arrays, shardings = jax.tree.leaves(state), jax.tree.leaves(target)
    if all(isinstance(a, jax.Array) and a.sharding == s and (dtype is None or a.dtype == dtype)
           for a, s in zip(arrays, shardings)):
        return state
    return jax.jit(lambda s: jax.tree.map(cast, s), out_shardings=target)(state)


def ema_update(ema_params, params, decay: float):
    """`decay * ema + (1 - decay) * params`, leaf by leaf in float32."""
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)
