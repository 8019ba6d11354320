"""The stages of an experiment, one module each (`config.stages` names them, in order): each module's
`run(experiment)` does its work or, when its output is complete, says so and returns, so that a rerun of
the same command resumes where the last one stopped."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections

from ernie_jax.runner.config import STAGES_PACKAGE, Experiment, named_module, resolve


def say(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


def latest_step(folder: Path) -> int | None:
    from ernie_jax.training.checkpoints import Checkpoints

    if not folder.is_dir():
        return None
    checkpoints = Checkpoints(folder)
    try:
        return checkpoints.latest_step()
    finally:
        checkpoints.close()


def scheduler_shift(folder: Path) -> float:
    from ernie_jax.pipeline import scheduler_shift as shift_of

    return shift_of(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))


def run(config: ml_collections.ConfigDict, workdir) -> Experiment:
    """Runs `config.stages` in order under `workdir` (created if missing); returns the resolved experiment."""
    experiment = resolve(config, workdir)
    experiment.workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (experiment.workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    for stage in config.stages:
        named_module(STAGES_PACKAGE, stage, "config.stages entry").run(experiment)
    return experiment
