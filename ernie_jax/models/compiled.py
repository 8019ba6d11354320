"""Plain calls of model methods, compiled once per input signature.

Outside any JAX transformation, `model(x, ...)` would run op by op: hundreds of small dispatches (the
2-layer, 256-wide DiT at 288 tokens took ~400 ms that way on 2 CPU cores, ~11 ms jitted). A method decorated
with `compiled_method` instead runs, when called with concrete arrays, as one jitted function of (graph
structure, trace context, static arguments; variables, array arguments):

- jax.jit's cache compiles it once per graph structure (the module's settings, e.g. config, dtype, remat,
  scan_layers, attention_impl, live there), per trace context, per static argument values, and per
  shapes / dtypes / shardings of the variables and arguments. A second call with the same signature reuses
  the program; the variables are arguments, so a parameter updated (`nnx.update`), merged into (LoRA) or
  replaced is what the next call computes with.
- The trace context is the value of every contextvar the models read while they are traced
  (`TRACE_CONTEXT`): a program traced inside `parallel.activation_sharding` is never reused outside it,
  nor under another one (each entry of that context makes new functions, so it compiles anew).
- Called while tracing (any variable or argument is a tracer: inside jax.jit, jax.grad, jax.vmap, nnx.jit,
  nnx.grad, jax.eval_shape, ...), the method runs its plain math in the caller's trace, so the caller's
  transformation sees the operations themselves and nothing is cached.

A compiled method must not change its module's variables: the compiled copy's changes would be lost, so
that is an error at trace time.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import jax
from flax import nnx

from ernie_jax.models import layers

# The contextvars that change what the models trace; a compiled program belongs to the values they held.
TRACE_CONTEXT = (layers.ACTIVATION_CONSTRAINT, layers.ATTENTION_SHARDING)


def compiled_method(method: Callable | None = None, *, static_argnames: Sequence[str] = ()):
    """Decorates an `nnx.Module` method so that plain calls run compiled (see the module docstring).

    `static_argnames` names the method's parameters that select the computation itself (Python numbers
    or None such as a tile size), which are part of the cache key; every other argument is a pytree of
    arrays (or Python scalars, traced as weakly typed values). Use as `@compiled_method` or
    `@compiled_method(static_argnames=(...))`.
    """
    if method is None:
        return functools.partial(compiled_method, static_argnames=static_argnames)
    signature = inspect.signature(method)
    unknown = sorted(set(static_argnames) - set(signature.parameters))
    variadic = [p.name for p in signature.parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if unknown or variadic:
        raise ValueError(f"compiled_method needs {method.__qualname__}'s static_argnames among its parameters "
                         f"and no *args/**kwargs; got unknown {unknown}, variadic {variadic}")

    def run_merged(graphdef, trace_context, static_arguments, state, arguments):
        # trace_context only keys the cache: the method reads the same contextvars while this is traced.
        del trace_context
        values = jax.tree.leaves(state)  # before the call: merge may hand the method state's own variables
        module = nnx.merge(graphdef, state)
        out = method(module, **dict(static_arguments), **arguments)
        after_graphdef, after_state = nnx.split(module)
        if after_graphdef != graphdef or any(
                after is not before for after, before in zip(jax.tree.leaves(after_state), values, strict=True)):
            raise ValueError(f"{method.__qualname__} changes its module's variables, which its compiled plain "
                             f"call cannot keep; call it inside your own nnx.jit instead")
        return out

    compiled = jax.jit(run_merged, static_argnums=(0, 1, 2))

    @functools.wraps(method)
    def call(module, *args, **kwargs):
        graphdef, state = nnx.split(module)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((state, args, kwargs))):
            return method(module, *args, **kwargs)
        bound = signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments[next(iter(signature.parameters))]  # the module itself
        static_arguments = tuple((name, arguments.pop(name)) for name in static_argnames)
        trace_context = tuple(var.get() for var in TRACE_CONTEXT)
        return compiled(graphdef, trace_context, static_arguments, state, arguments)

    return call
