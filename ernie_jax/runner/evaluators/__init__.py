"""Evaluators: callbacks of the training loop built from `config.evals`, a dict of named entries
`{"type": T, "every": N, ...}` (big_vision style). Type T is the module `ernie_jax.runner.evaluators.T`,
whose `make(name, settings, context)` returns a `loop.Callback`; it acts every N updates and after the last.

Every process runs every evaluator (their programs are collectives on the training mesh); only the first
writes files and logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flax import nnx

from ernie_jax.runner.config import EVALUATORS_PACKAGE, Experiment, named_module


@dataclasses.dataclass(frozen=True)
class Context:
    """What evaluators may use: the experiment, the frozen encoders (`data.FrozenEncoders` and the loaded
    `encoders`), the training mesh and rules, the TensorBoard writer (None outside the first process), the
    sampling shift of the components, and `transformer(state)`: the transformer the train state's EMA
    weights make (with any frozen rest, such as a LoRA's base)."""

    experiment: Experiment
    encoders: Any
    frozen: Any
    mesh: Any
    rules: tuple
    writer: Any
    shift: float
    transformer: Callable[[Any], nnx.Module]

    @property
    def workdir(self) -> Path:
        return self.experiment.workdir


def due(step: int, every: int, num_steps: int) -> bool:
    """Whether the callback of update `step` should act: every `every` updates and after the last."""
    return (step + 1) % every == 0 or step + 1 == num_steps


def build(context: Context) -> list:
    """The callbacks of `config.evals`, in the config's order."""
    return [named_module(EVALUATORS_PACKAGE, settings.type, f"config.evals.{name}.type").make(name, settings, context)
            for name, settings in context.experiment.config.evals.items()]
