"""The experiment runner behind `python -m ernie_jax.main`: an experiment config (an `ml_collections`
file under `experiments/`) resolved into the library's dataclasses (`config`), the frozen encoders and data
sources (`data`), the periodic evaluators named in `config.evals` (`evaluators/<type>.py`), and the stages
named in `config.stages` (`stages/<name>.py`), each resumable.

A method adds files, not branches: an objective is `ernie_jax/training/objectives/<config.objective.name>.py`,
an evaluator `evaluators/<type>.py`, a stage `stages/<name>.py`; the runner finds each by its name.
"""
