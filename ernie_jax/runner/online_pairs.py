"""Online preference pairs for DPO: with `config.pairs.refresh_every` = N > 0 the train stage runs in rounds
of N updates, and round r (updates r*N .. (r+1)*N - 1) trains on pairs that the policy of its first update
made: `pairs.prompts_per_round` prompts (deterministic from `config.seed` and r) of the pairs stage's prompt
source (`pairs.prompts`), `pairs.samples_per_prompt` samples each, scored by `pairs.reward` and paired by
`pairs.selection` and `pairs.margin`, as the offline pairs stage does (`data.generated_pairs`). N = 0 (the
default) is the offline way: one set of pairs from the starting model, made by the pairs stage.

The policy (`pairs.policy`): "live" (default) samples the trained weights themselves, so the pairs are
on-policy (what DPO's implicit reward is measured on; an EMA of decay d lags about 1/(1-d) updates, more
than a round at the usual 0.999); "ema" samples the EMA weights (what the sample grids and the export use:
smoother pairs from a lagging policy). At update 0 both are the starting model (`config.init.path`, which
online pairs need, as the pairs stage does).

Round r's pairs: prompt position q = r*P + j (P prompts a round) of an endless walk through the prompt
list, each pass over it in its own order (a permutation drawn from (seed, pass)); the samples of its prompt
j start from the noise of seeds `seed + (r*P + j) * K + k` (K samples a prompt), so no two samples of a run
share a seed. They are written as the preference folder WORKDIR/pairs/round-RRRRRR/ through a temporary name
(a half-written round is never read; a killed run's leftover is removed when the round is made again), and
its metadata.json's `round` says which update's policy made it and which prompts of the list it holds.

How training runs: the loop (`training.loop.train`, called once; its compiled step serves every round, as
every round's batches have one shape) reads `OnlinePairs.iterator()`, whose batch of update k is round
k // N's pipeline's batch k (`data.preferences.build_preference_pipeline`: a pure function of seed, k and
host); its checkpointed state is k. `OnlinePairs` is also a loop callback: after update (r+1)*N - 1 it makes
round r + 1 from the new state, before the loop checkpoints update (r+1)*N. So every checkpoint at or past
r*N was written after round r was complete, and a run killed anywhere resumes as the uninterrupted run
goes on: the same policy at every round's start (resumption is bit-exact), hence the same pairs, the same
data order and the same parameters; a round already complete when it is due (made before a kill that came
before the next checkpoint) is read, not made again.

Several processes: every process runs every program of the generation (the policy samples on the training
mesh, where its weights lie; the VAE decodes there), computes the rewards, and reads the round's folder;
only process 0 writes it (WORKDIR is a filesystem all processes share, as the checkpoints already assume),
and all wait for it at a barrier. Whether a round is complete is process 0's view, sent to all. The pairs
of a round are numbered in order (their `source_index`), so each process trains on an equal share of them
(every process count-th pair); a round needs at least one pair per process.

Logged with the data statistics (`summary`, `data/pairs/*`): the round of the update, its pairs, the share
of its prompts with a usable pair, and the mean reward of all samples, of the chosen and of the rejected
samples.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import grain
import jax
import numpy as np

from ernie_jax.runner.config import Experiment
from ernie_jax.runner.stages.pairs import PAIRS_DIR

POLICIES = ("live", "ema")


@dataclasses.dataclass(frozen=True)
class RoundSettings:
    """`config.pairs`' online fields: rounds of `refresh_every` updates, `prompts_per_round` prompts each,
    sampled by the `policy` ("live" or "ema") weights."""

    refresh_every: int
    prompts_per_round: int
    policy: str


def round_settings(config) -> RoundSettings | None:
    """The online settings of `config.pairs`, checked; None when pairs are made offline (refresh_every 0 or
    no `pairs` section)."""
    pairs = config.get("pairs")
    if pairs is None or not pairs.get("refresh_every", 0):
        return None
    settings = RoundSettings(pairs.refresh_every, pairs.get("prompts_per_round", 0), pairs.get("policy", "live"))
    if not isinstance(settings.refresh_every, int) or settings.refresh_every < 0:
        raise ValueError(f"config.pairs.refresh_every must be an integer >= 0 (0: offline), got "
                         f"{settings.refresh_every!r}")
    if not isinstance(settings.prompts_per_round, int) or settings.prompts_per_round < 1:
        raise ValueError(f"config.pairs.prompts_per_round must be >= 1 with refresh_every > 0, got "
                         f"{settings.prompts_per_round!r}")
    if settings.policy not in POLICIES:
        raise ValueError(f"config.pairs.policy {settings.policy!r} is not one of {POLICIES}")
    if config.data.get("preferences"):
        raise ValueError("config.pairs.refresh_every > 0 makes the pairs online: leave config.data.preferences "
                         "empty")
    if not config.init.path:
        raise ValueError("online pairs sample the starting model at update 0: set config.init.path")
    return settings


def round_prompts(count: int, round_index: int, per_round: int, seed: int) -> np.ndarray:
    """The positions in a list of `count` prompts of round `round_index`'s `per_round` prompts: positions
    r*P .. (r+1)*P - 1 of the walk that passes over the list again and again, pass e in the order of
    `default_rng((seed, e)).permutation(count)`. int64 [per_round]."""
    steps = np.arange(round_index * per_round, (round_index + 1) * per_round)
    passes = {e: np.random.default_rng((seed, e)).permutation(count) for e in np.unique(steps // count).tolist()}
    return np.array([passes[step // count][step % count] for step in steps.tolist()], np.int64)


def _process_zero_says(value: bool) -> bool:
    """Process 0's `value`, on every process (a collective)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class RoundIterator(grain.DatasetIterator):
    """The batches of `OnlinePairs`' rounds by update: the batch of update k is round k // N's batch k. Its
    state is k."""

    def __init__(self, rounds: OnlinePairs):
        super().__init__()
        self._rounds = rounds
        self._step = 0

    def __next__(self) -> dict:
        batch = self._rounds.data(self._step // self._rounds.settings.refresh_every).dataset[self._step]
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self._step}

    def set_state(self, state: dict) -> None:
        self._step = int(state["step"])


class OnlinePairs:
    """The rounds of an online DPO run (module docstring): `make(r, transformer)` writes round r's pairs,
    `data(r)` reads them as a training pipeline, `iterator()` is the loop's data iterator, and the object is
    the loop callback that makes each next round from the policy of `policy_of(state)`.

    `encoders`: the frozen components' pipeline (VAE, text encoder, tokenizer; `precompute.load_encoders`),
    which makes the prompts' text features as the pairs stage's would be made; `mesh`, `rules`: where the
    policy's weights lie (its samples run there); `shift`: the sampler's shift."""

    def __init__(self, experiment: Experiment, encoders, mesh, rules, shift: float,
                 policy_of: Callable[[object], object]):
        from flax import nnx

        from ernie_jax.data.precompute import model_fingerprint
        from ernie_jax.evaluation.rewards import load_reward
        from ernie_jax.pipeline import ErnieImagePipeline
        from ernie_jax.runner.stages.pairs import prompts_of

        self.experiment, self.encoders = experiment, encoders
        self.policy_of = policy_of
        self.settings = round_settings(experiment.config)
        self.reward = load_reward(experiment.config.pairs.reward)
        self.prompts = prompts_of(experiment.config.pairs.prompts)
        self.fingerprint = model_fingerprint(experiment.components_dir)
        # One sampling pipeline for every round (its compiled VAE decoder too), the round's policy put in it.
        # It places its VAE on the mesh: a copy, so the encoders' stays where it is.
        self.pipeline = ErnieImagePipeline(None, nnx.clone(encoders.vae), None, None, shift=shift, mesh=mesh,
                                           rules={"transformer": rules})
        self._loaded: tuple[int, object, dict] | None = None

    def folder(self, round_index: int) -> Path:
        return self.experiment.workdir / PAIRS_DIR / f"round-{round_index:06d}"

    def make(self, round_index: int, transformer) -> None:
        """Round `round_index`'s pairs from the policy `transformer` (an nnx DiT whose weights lie on the
        mesh), unless its folder is complete. Every process calls it."""
        from ernie_jax import parallel
        from ernie_jax.data.generated_pairs import generate_pairs
        from ernie_jax.runner.stages import say

        folder = self.folder(round_index)
        if _process_zero_says(folder.is_dir()):
            return
        config, p, s = self.experiment.config, self.experiment.config.pairs, self.settings
        writer = jax.process_index() == 0
        if writer:  # a killed run's half-written round
            for leftover in folder.parent.glob(f".{folder.name}.tmp-*"):
                shutil.rmtree(leftover)
        positions = round_prompts(len(self.prompts), round_index, s.prompts_per_round, config.seed)
        first_update = round_index * s.refresh_every
        pipeline = self.pipeline
        pipeline.transformer = parallel.shard_model(transformer, pipeline.mesh, pipeline.rules["transformer"])
        side = config.data.sides[-1]
        try:
            generate_pairs(
                pipeline, [self.prompts[i] for i in positions.tolist()], self.reward, folder if writer else None,
                encoders=self.encoders, samples_per_prompt=p.samples_per_prompt, selection=p.selection,
                margin=p.margin, height=side, width=side, num_inference_steps=p.num_inference_steps,
                guidance_scale=p.guidance_scale,
                seed=config.seed + round_index * s.prompts_per_round * p.samples_per_prompt,
                max_text_len=config.data.max_text_len, dtype=config.train.encoder_dtype,
                model=f"the {s.policy} policy at update {first_update}", model_fingerprint=self.fingerprint,
                numbered_in_order=True,
                extra_metadata={"round": {"index": round_index, "first_update": first_update, "policy": s.policy,
                                          "prompt_positions": positions.tolist()}},
                progress=False)
        finally:
            pipeline.transformer = None  # the policy's weights are the train state's, which the next update replaces
        _barrier(f"pairs round {round_index}")
        say(f"pairs: wrote {folder} (the {s.policy} policy at update {first_update})")

    def data(self, round_index: int):
        """Round `round_index`'s training pipeline (`TrainingData`), built when first asked for (every process
        at the same update: the pipeline's construction is a collective)."""
        if self._loaded is None or self._loaded[0] != round_index:
            from ernie_jax.data.precomputed import METADATA_FILE
            from ernie_jax.data.preferences import PreferenceSource, build_preference_pipeline
            from ernie_jax.runner.data import checked_sources

            folder = self.folder(round_index)
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: round {round_index}'s pairs are missing (they are made before "
                                        f"its first update, {round_index * self.settings.refresh_every})")
            (source,) = checked_sources(self.experiment, [str(folder)], PreferenceSource)
            if len(source) < jax.process_count():
                raise ValueError(f"{folder}: {len(source)} pairs for {jax.process_count()} processes, which read one "
                                 f"share each: raise config.pairs.prompts_per_round")
            data = build_preference_pipeline([source], self.experiment.pipeline)
            self._loaded = (round_index, data, json.loads((folder / METADATA_FILE).read_text()))
        return self._loaded[1]

    def iterator(self) -> RoundIterator:
        return RoundIterator(self)

    def __call__(self, step: int, metrics: dict, state) -> None:
        """After update `step`: when the next update starts a round, makes it from the new state's policy."""
        every, next_update = self.settings.refresh_every, step + 1
        if next_update % every == 0 and next_update < self.experiment.train.num_steps:
            self.make(next_update // every, self.policy_of(state))

    def summary(self) -> dict[str, float]:
        """The data statistics of the round being trained (its pipeline's, `data/*`) and of its pairs
        (`data/pairs/*`); empty before the first batch."""
        if self._loaded is None:
            return {}
        round_index, data, metadata = self._loaded
        pairs = metadata["pairs"]
        counts = {f"data/category/{name}": float(n) for name, n in data.stats.category_summary().items()}
        return {**data.stats.summary(), **counts, "data/pairs/round": float(round_index),
                "data/pairs/pairs": float(metadata["records"]),
                "data/pairs/prompts_with_pair": 1.0 - pairs["prompts_without_pair"] / pairs["prompts"],
                "data/pairs/mean_sample_reward": pairs["mean_sample_reward"],
                "data/pairs/mean_chosen_reward": pairs["mean_chosen_reward"],
                "data/pairs/mean_rejected_reward": pairs["mean_rejected_reward"]}
