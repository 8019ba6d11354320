"""The train state (parameters, optimizer state, EMA parameters, step, RNG key) and its creation directly
in its shardings.

`params` and `ema_params` are the model's `nnx.Param` state (float32 master weights), so each variable
keeps its logical axis names, and the Adam moments (which optax builds with `jax.tree.map` over the
parameters) keep them too: one rule table places all three.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from ernie_jax import parallel


@struct.dataclass
class TrainState:
    """step: int32 [] optimizer updates done; params / ema_params: nnx.State of nnx.Param (float32);
    opt_state: the optax state; rng: uint32 [2] base key (step s draws from fold_in(rng, s), so a
    resumed run draws the same numbers)."""

    step: jax.Array
    params: nnx.State
    opt_state: Any
    ema_params: nnx.State
    rng: jax.Array


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


def _params_only(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        kinds = sorted({type(v).__name__ for _, v in nnx.to_flat_state(rest)})
        raise ValueError(f"the model holds non-parameter state {kinds}; the trainer handles nnx.Param state only")
    return graphdef, params


def create_train_state(model_fn: Callable[[nnx.Rngs], nnx.Module], optimizer: optax.GradientTransformation, *,
                       seed: int, mesh: Mesh, rules: parallel.Rules
                       ) -> tuple[nnx.GraphDef, TrainState]:
    """The model's graphdef and a fresh train state, initialised inside one jit whose outputs are already
    in their shardings (no full copy is ever built on one device). `model_fn(rngs)` builds the model with
    float32 parameters (`param_dtype`) and the compute `dtype` of choice."""
    graphdef, abstract = abstract_train_state(model_fn, optimizer, seed=seed, mesh=mesh, rules=rules)

    def init() -> TrainState:
        return _fresh_state(_params_only(model_fn(nnx.Rngs(seed)))[1], optimizer, seed)

    return graphdef, jax.jit(init, out_shardings=shardings_of(abstract))()


def abstract_train_state(model_fn: Callable[[nnx.Rngs], nnx.Module], optimizer: optax.GradientTransformation, *,
                         seed: int, mesh: Mesh, rules: parallel.Rules) -> tuple[nnx.GraphDef, TrainState]:
    """The graphdef and the train state as `jax.ShapeDtypeStruct`s carrying their target shardings (what a
    checkpoint restores into, and what `jit_train_step` compiles for)."""
    graphdef, params = _params_only(nnx.eval_shape(lambda: model_fn(nnx.Rngs(seed))))
    if any(leaf.dtype != jnp.float32 for leaf in jax.tree.leaves(params)):
        raise ValueError("the trainer keeps float32 master weights: build the model with param_dtype=float32")
    state = jax.eval_shape(lambda p: _fresh_state(p, optimizer, seed), params)
    return graphdef, with_shardings(state, mesh, rules)


def _fresh_state(params: nnx.State, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0: the optimizer's initial state and the EMA at the initial parameters."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=params, rng=jax.random.key_data(jax.random.key(seed)))


def ema_update(ema_params, params, decay: float):
    """`decay * ema + (1 - decay) * params`, leaf by leaf in float32."""
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)
