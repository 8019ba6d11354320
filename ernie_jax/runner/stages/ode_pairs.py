"""Stage `ode_pairs`: the frozen teacher's ODE pairs for the DMD regression term (`data/ode_pairs.py`), made
when the objective reads them (its module's `reads_ode_pairs(config)`: DMD with `regression_weight > 0`);
otherwise the stage does nothing, so a family of runs can list it and only the ones that need pairs pay.

For each stage side's precomputed records (the precompute stage's, or `data.precomputed`: run it after
them), the `ode_pairs.records` smallest source indices (0: every record) get a noise (seed `ode_pairs.seed`
plus the source index: the pairs do not change with the run's seed) and the output of the teacher's Euler
sampler from it: `ode_pairs.teacher` (a name in `config.frozen`; its path "init" is the model training starts
from) at `ode_pairs.num_inference_steps` steps with CFG `ode_pairs.guidance_scale` against the empty prompt,
on the components' scheduler shift (the pipeline's sampler), `ode_pairs.batch_size` pairs per program. Each
host makes its share (source index modulo the host count) with its own copy of the teacher, into
WORKDIR/ode_pairs/SIDEpx/shard-I-of-N/ (written atomically; a rerun skips folders that exist).

The train stage then reads these folders in place of the precomputed ones (`runner.data.precomputed_sources`):
the paired records only, each batched with its pair (`ode_noise`, `ode_target`). With `records` 0 those are
every record, and the draws are those of the same run without the term; with fewer, the whole objective
(not only the regression) trains on the paired records' prompts.
"""

from __future__ import annotations

from pathlib import Path

import jax

from ernie_jax.runner.config import Experiment
from ernie_jax.runner.stages import say, scheduler_shift

ODE_PAIRS_DIR = "ode_pairs"
SETTINGS = ("teacher", "records", "seed", "num_inference_steps", "guidance_scale", "batch_size")


def wanted(experiment: Experiment) -> bool:
    """Whether the experiment's objective reads ODE pairs."""
    reads = getattr(experiment.objective_module, "reads_ode_pairs", None)
    return bool(reads is not None and reads(experiment.objective))


def settings(experiment: Experiment) -> dict:
    """`config.ode_pairs`, checked; raises ValueError naming a missing or bad value."""
    config = experiment.config
    given = dict(config.get("ode_pairs", {}))
    missing = [name for name in SETTINGS if name not in given]
    if missing:
        raise ValueError(f"the objective reads teacher ODE pairs: set config.ode_pairs.{', '.join(missing)} "
                         f"(see experiments/tiny_shapes_mtdmd.py)")
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise ValueError(f"config.ode_pairs: unknown keys {unknown} (known: {', '.join(SETTINGS)})")
    if given["teacher"] not in config.frozen:
        raise ValueError(f"config.ode_pairs.teacher {given['teacher']!r} is not a frozen model (config.frozen has "
                         f"{sorted(config.frozen)})")
    for name, low in (("records", 0), ("num_inference_steps", 1), ("batch_size", 1)):
        if int(given[name]) != given[name] or given[name] < low:
            raise ValueError(f"config.ode_pairs.{name} must be an integer >= {low}, got {given[name]!r}")
    if not given["guidance_scale"] >= 1:
        raise ValueError(f"config.ode_pairs.guidance_scale must be >= 1, got {given['guidance_scale']!r}")
    return given


def _side_name(entry) -> str:
    """"SIDEpx" of a precomputed entry (a folder or a list of a side's host shards)."""
    from ernie_jax.data.precomputed import read_metadata

    metadata = read_metadata(entry if isinstance(entry, str) else entry[0])
    return f"{metadata['stage_side'] or metadata['buckets'][0][0]}px"


def folders(experiment: Experiment) -> list[list[str]]:
    """Every host's ODE-pair folders, one list per entry of `experiment.precomputed()` (what training reads)."""
    count = jax.process_count()
    entries = experiment.precomputed()
    if not entries:
        raise ValueError("the objective reads teacher ODE pairs, which are made for precomputed records: add the "
                         "'precompute' stage or set config.data.precomputed")
    return [[str(experiment.workdir / ODE_PAIRS_DIR / _side_name(entry) / f"shard-{i:05d}-of-{count:05d}")
             for i in range(count)] for entry in entries]


def run(experiment: Experiment) -> None:
    from ernie_jax.data.ode_pairs import make_ode_pairs, teacher_sampler
    from ernie_jax.runner.data import precomputed_records
    from ernie_jax.runner.stages.train import load_frozen_transformer

    if not wanted(experiment):
        say(f"ode_pairs: not needed (the objective {experiment.config.objective.name} reads none)")
        return
    config, given = experiment.config, settings(experiment)
    shard, count = jax.process_index(), jax.process_count()
    todo = [(entry, Path(host_folders[shard])) for entry, host_folders in
            zip(experiment.precomputed(), folders(experiment), strict=True)]
    for _, folder in todo:
        if folder.exists():
            say(f"ode_pairs: done ({folder})")
    todo = [(entry, folder) for entry, folder in todo if not folder.exists()]
    if todo:
        frozen = config.frozen[given["teacher"]]
        path = experiment.init_path if frozen.path == "init" else frozen.path
        if not path:
            raise ValueError(f"config.frozen.{given['teacher']}.path is empty (the ODE pairs' teacher)")
        teacher = load_frozen_transformer(experiment, path, frozen.dtype, None, None)
        shift = scheduler_shift(experiment.components_dir)
    for entry, folder in todo:
        source = precomputed_records(experiment, entry)
        sampler = teacher_sampler(teacher, source.empty_prompt, num_inference_steps=given["num_inference_steps"],
                                  guidance_scale=given["guidance_scale"], shift=shift)
        made = {"teacher": given["teacher"], "model": path, "num_inference_steps": given["num_inference_steps"],
                "guidance_scale": given["guidance_scale"], "shift": shift}
        metadata = make_ode_pairs(sampler, source, folder, seed=given["seed"], records=given["records"],
                                  batch_size=given["batch_size"], shard_index=shard, shard_count=count,
                                  settings=made, progress=shard == 0)
        say(f"ode_pairs: wrote {folder} ({metadata['records']} pairs)")
    if count > 1:
        from jax.experimental import multihost_utils

        # Training reads every host's folder (a shared workdir): wait until all are written.
        multihost_utils.sync_global_devices("ode_pairs")
