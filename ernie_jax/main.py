"""`python -m ernie_jax.main --config experiments/NAME.py[:VARIANT] --workdir DIR [--config.KEY=VALUE ...]`:
run an experiment's stages (`config.stages`, in order), each resumable: a stage whose output is complete
is skipped, and training resumes from its newest checkpoint.

The runner lives in `ernie_jax.runner` (config resolution, frozen encoders, evaluators, one module per
stage); this is its command line. Stages and what they write under DIR:
  components  components/: the frozen VAE, text encoder and tokenizer as a pipeline folder (diffusers
              layout, placeholder transformer). `components.kind`: "shapes" trains a small VAE on the
              shapes dataset (ernie_jax.training.components), "random" writes tiny random ones
              (conversions.random_checkpoint), "pretrained" uses `components.path` as it is.
  precompute  precomputed/SIDEpx/shard-I-of-N/: the frozen VAE's latents and the text encoder's features
              of `data.source`'s records, once per curriculum stage side (each host its shard), in the
              layout of `python -m ernie_jax.data.precompute`; the train stage then reads them.
  pairs       pairs/shard-I-of-N/: preference pairs the starting model (`init.path`) makes itself, scored by
              `pairs.reward`, for DPO (ernie_jax/runner/stages/pairs.py). With `pairs.refresh_every` N > 0
              the pairs are online instead: the train stage makes pairs/round-RRRRRR/ from the policy
              every N updates (ernie_jax/runner/online_pairs.py) and this stage does nothing.
  train       the objective `objective.name` (ernie_jax/training/objectives/NAME.py) on `data.source`
              through the frozen VAE and text encoder, or precomputed latents and text features: the
              precompute stage's, or the folders `data.precomputed` names (written by
              `python -m ernie_jax.data.precompute`; one per curriculum stage side, or a list of a side's
              host shards), from random weights or `init.path`; writes
              checkpoints/ (Orbax: parameters, AdamW state, EMA, step, RNG and the data position),
              logs/ (TensorBoard: train/* metrics, data/*, and the evaluators' `evals.NAME`: NAME/loss,
              NAME images), metrics.jsonl (one line per update), NAME/step_NNNNNN.png (the sample_grid
              evaluators' grids of fixed prompts and seeds, from the EMA weights).
  export      pipeline/: the trained transformer (EMA unless `export.use_ema` is False) with the frozen
              components, in the diffusers layout: `ErnieImagePipeline.from_pretrained` and
              `python -m ernie_jax.generate --model DIR/pipeline` load it.
  evaluate    eval/: samples.png and, on the shapes dataset, scores.json (the shapes detector's scores
              of the held-out prompts next to their chance levels).

An experiment that is not made of these stages (the aesthetic scorer: a vision tower, no VAE or text encoder)
names the module that runs it in `config.runner` (`run(config, workdir)`, e.g.
`ernie_jax.aesthetics.train_scorer`); the command line is the same.

Bad flags, overrides or config values give one `error: ...` line and exit status 1.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

STAGES_RUNNER = "ernie_jax.runner.stages"


def runner_of(config):
    """The module whose `run(config, workdir)` runs `config`: `config.runner`, or the stages runner."""
    name = config.get("runner") or STAGES_RUNNER
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    if not found:
        raise ValueError(f"config.runner {name!r}: there is no such module")
    return importlib.import_module(name)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "experiment config: experiments/NAME.py[:VARIANT]",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "output folder (created if missing; a rerun resumes in it)")
    return config, workdir


def main(argv=None) -> int:
    from absl import flags, logging

    from conversions.common import run_command

    argv = list(sys.argv if argv is None else argv)
    config_flag, workdir_flag = _define_flags()
    try:
        rest = flags.FLAGS(argv)
        config = config_flag.value
        if config is not None:
            config.get("stages")  # a config file that failed to load raises here
    except (AttributeError, KeyError) as error:  # how ml_collections reports overriding a key the config lacks
        print(f"error: the config has no key {str(error).strip(chr(34) + chr(39))!r} (check the --config.* "
              f"overrides)", file=sys.stderr)
        return 1
    except (flags.Error, TypeError, ValueError, OSError) as error:
        # A config file that fails to load is reported with its traceback: its last line names the cause.
        print("error: " + [line.strip() for line in str(error).splitlines() if line.strip()][-1], file=sys.stderr)
        return 1
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
        return 1
    if workdir_flag.value is None or config is None:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 1
    logging.set_verbosity(logging.WARNING)
    return run_command(lambda _: runner_of(config).run(config, workdir_flag.value))


if __name__ == "__main__":
    sys.exit(main())
