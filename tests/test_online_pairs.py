"""Online DPO pairs (`config.pairs.refresh_every`, ernie_jax/runner/online_pairs.py) through the runner, in
this process, on tiny random components: rounds made by the policy of their first update, trained on during
their round, one compiled step for every round, and bit-exact resumption after interrupts anywhere."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import relative_error

REWARD = "test_brightness"
STEPS, EVERY, PER_ROUND, SAMPLES, PROMPTS = 4, 2, 2, 2, 8


def brightness(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """A deterministic reward (random tiny models draw images the shapes detector cannot tell apart)."""
    return images.reshape(len(images), -1).mean(axis=1) / 255.0


class Interrupted(Exception):
    """Stands for a kill."""


def online_config(components: Path):
    from experiments.tiny_shapes_dpo import get_config

    config = get_config("tiny")
    config.stages = ("pairs", "train")  # the pairs stage leaves online pairs to the train stage
    config.components.update(kind="pretrained", path=str(components))
    config.pairs.update(reward=REWARD, prompts=f"shapes:{PROMPTS}", refresh_every=EVERY, prompts_per_round=PER_ROUND,
                        samples_per_prompt=SAMPLES)
    config.data.update(stage_steps=(STEPS,))
    # An EMA apart from the trained weights: the rounds must be the trained weights' samples ("live").
    config.train.update(checkpoint_every=1, max_to_keep=STEPS + 1, ema_decay=0.5)
    config.evals = {}
    return config


def run(config, workdir: Path, monkeypatch, reward=brightness):
    from ernie_jax.evaluation import rewards
    from ernie_jax.runner.stages import run as run_stages

    monkeypatch.setitem(rewards.REWARDS, REWARD, reward)
    return run_stages(config, workdir)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def components(random_pipeline_folder) -> Path:
    """What the tiny config's components stage writes (`write_random_pipeline(folder, "tiny", seed=0)`)."""
    return random_pipeline_folder


@pytest.fixture(scope="module")
def uninterrupted(components, tmp_path_factory):
    """An online run of STEPS updates in rounds of EVERY, with the train step's programs and every batch the
    step received recorded."""
    from ernie_jax.training import loop

    work = tmp_path_factory.mktemp("uninterrupted")
    programs, batches = [], []
    jit_train_step, to_device = loop.jit_train_step, loop._to_device

    def recording_jit(*args, **kwargs):
        programs.append(jit_train_step(*args, **kwargs))
        return programs[-1]

    def recording_to_device(batch, shardings):
        batches.append({key: np.asarray(value) for key, value in batch.items()})
        return to_device(batch, shardings)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(loop, "jit_train_step", recording_jit)
        monkeypatch.setattr(loop, "_to_device", recording_to_device)
        experiment = run(online_config(components), work, monkeypatch)
    return experiment, programs, batches


def records(folder: Path) -> list[dict]:
    from ernie_jax.data.preferences import PreferenceSource

    source = PreferenceSource(folder)
    return [source[position] for position in range(len(source))]


def test_rounds_are_made_by_the_policy_of_their_first_update_and_trained_on_in_their_round(uninterrupted):
    from ernie_jax.data.generated_pairs import shapes_prompts
    from ernie_jax.data.precompute import load_encoders
    from ernie_jax.pipeline import ErnieImagePipeline
    from ernie_jax.runner.online_pairs import round_prompts
    from ernie_jax.runner.stages import scheduler_shift
    from ernie_jax.runner.stages.export import trained_transformer
    from ernie_jax.runner.stages.train import load_frozen_transformer
    from ernie_jax.training.metrics import read_scalars

    experiment, programs, batches = uninterrupted
    work, pairs = experiment.workdir, experiment.config.pairs
    rounds = STEPS // EVERY
    assert sorted(path.name for path in (work / "pairs").iterdir()) == [f"round-{r:06d}" for r in range(rounds)]
    by_round = [records(work / "pairs" / f"round-{r:06d}") for r in range(rounds)]

    # Each round's prompts: fresh ones, in the order its metadata names, sampled from their own seeds.
    prompts = shapes_prompts(PROMPTS)
    positions = [round_prompts(PROMPTS, r, PER_ROUND, experiment.config.seed).tolist() for r in range(rounds)]
    assert len({p for round_positions in positions for p in round_positions}) == rounds * PER_ROUND
    for r, round_records in enumerate(by_round):
        metadata = json.loads((work / "pairs" / f"round-{r:06d}" / "metadata.json").read_text())
        assert metadata["round"] == {"index": r, "first_update": r * EVERY, "policy": "live",
                                     "prompt_positions": positions[r]}
        assert len(round_records) == PER_ROUND  # random images: the two samples' brightness always differs
        for record in round_records:
            j = record["origin"]["prompt_index"]
            assert record["caption"] == prompts[positions[r][j]]
            assert record["origin"]["sample_seeds"] == [(r * PER_ROUND + j) * SAMPLES + k for k in range(SAMPLES)]

    # Round r's pairs are the samples of the policy at update r * EVERY, regenerated one by one here.
    encoders = load_encoders(experiment.components_dir)
    mesh = experiment.mesh()
    policies = [load_frozen_transformer(experiment, experiment.init_path, "float32", mesh, experiment.rules),
                trained_transformer(experiment, ema=False, step=EVERY)]
    ema = trained_transformer(experiment, ema=True, step=EVERY)
    side = experiment.config.data.sides[-1]
    settings = dict(height=side, width=side, num_inference_steps=pairs.num_inference_steps,
                    guidance_scale=pairs.guidance_scale, output_type="latent", use_pe=False)

    def regenerated(policy, record, slot: int) -> np.ndarray:
        pipeline = ErnieImagePipeline(policy, encoders.vae, encoders.text_encoder, encoders.tokenizer,
                                      shift=scheduler_shift(experiment.components_dir))
        return np.asarray(pipeline(record["caption"], seed=record["origin"]["seeds"][slot], **settings).images)[0]

    for r, round_records in enumerate(by_round):
        for record in round_records:
            for slot in (0, 1):
                assert relative_error(record["latents"][slot], regenerated(policies[r], record, slot)) <= 1e-5
        # The policy moved between the rounds: the starting model draws round 1's samples otherwise, and so
        # does the EMA.
        if r:
            assert relative_error(record["latents"][0], regenerated(policies[0], record, 0)) > 1e-3
            assert relative_error(record["latents"][0], regenerated(ema, record, 0)) > 1e-4

    # During round r the step reads round r's pairs: every batch row is one of its records.
    assert len(batches) == STEPS
    for step, batch in enumerate(batches):
        own = {record["latents"][0].tobytes() for record in by_round[step // EVERY]}
        assert all(row.tobytes() in own for row in batch["latents_chosen"]), step
    # One compiled step for every round.
    assert len(programs) == 1 and programs[0].jitted._cache_size() == 1

    # Each update's log carries its round's statistics.
    scalars = read_scalars(work / "logs")
    assert scalars["data/pairs/round"] == [(step + 1, float(step // EVERY)) for step in range(STEPS)]
    for step, value in scalars["data/pairs/mean_chosen_reward"]:
        chosen = [record["origin"]["rewards"][0] for record in by_round[(step - 1) // EVERY]]
        assert value == pytest.approx(np.mean(chosen), rel=1e-6)  # stored as float32
    assert all(value == 1.0 for _, value in scalars["data/pairs/prompts_with_pair"])


def test_an_online_run_interrupted_anywhere_resumes_bit_exactly(uninterrupted, components, tmp_path, monkeypatch):
    from ernie_jax.runner.stages import latest_step
    from ernie_jax.training import checkpoints as checkpoints_lib

    expected, _, _ = uninterrupted
    work, config = tmp_path / "run", online_config(components)
    calls = []

    @functools.wraps(brightness)  # the same reward (its name is in the pairs' metadata), killed once
    def interrupted_in_round_one(images, prompts):
        calls.append(1)
        if len(calls) == PER_ROUND + 2:  # round 1's second prompt: its folder half written
            raise Interrupted
        return brightness(images, prompts)

    with pytest.raises(Interrupted):
        run(config, work, monkeypatch, interrupted_in_round_one)
    assert not (work / "pairs" / "round-000001").exists() and latest_step(work / "checkpoints") == EVERY - 1
    # What a kill (rather than an exception) leaves of a half-written round.
    leftover = work / "pairs" / ".round-000001.tmp-killed"
    leftover.mkdir()
    (leftover / "records-00000.array_record").write_bytes(b"half")

    # Killed after round 1 was written, before the checkpoint of its first update.
    save = checkpoints_lib.Checkpoints.save

    def save_until_round_one(self, step, *args, **kwargs):
        if step == EVERY:
            raise Interrupted
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoints_lib.Checkpoints, "save", save_until_round_one)
    with pytest.raises(Interrupted):
        run(config, work, monkeypatch)
    assert (work / "pairs" / "round-000001").is_dir() and not leftover.exists()
    assert latest_step(work / "checkpoints") == EVERY - 1
    monkeypatch.setattr(checkpoints_lib.Checkpoints, "save", save)

    calls.clear()
    run(config, work, monkeypatch, interrupted_in_round_one)
    assert not calls  # round 1 was read, not made again

    for r in range(STEPS // EVERY):
        name = f"round-{r:06d}"
        assert folder_bytes(work / "pairs" / name) == folder_bytes(expected.workdir / "pairs" / name)
    assert (work / "metrics.jsonl").read_text() == (expected.workdir / "metrics.jsonl").read_text()
    weights = [checkpoint_weights(folder / "checkpoints", STEPS) for folder in (work, expected.workdir)]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 0
    for name, value in weights[0].items():
        np.testing.assert_array_equal(value, weights[1][name], err_msg=name)


def checkpoint_weights(folder: Path, step: int) -> dict[str, np.ndarray]:
    """The trained parameters of checkpoint `step`, by path."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        state = checkpointer.restore(folder / str(step) / "state")
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"])}


def test_round_prompts_walk_the_list_in_a_fresh_order_each_pass():
    from ernie_jax.runner.online_pairs import round_prompts

    walk = np.concatenate([round_prompts(5, r, 3, seed=7) for r in range(5)])  # 15 prompts: three passes
    for start in (0, 5, 10):
        assert sorted(walk[start:start + 5].tolist()) == list(range(5))
    assert walk[:5].tolist() != walk[5:10].tolist()
    np.testing.assert_array_equal(round_prompts(5, 3, 3, seed=7), walk[9:12])
    assert round_prompts(5, 0, 3, seed=8).tolist() != walk[:3].tolist()


@pytest.mark.parametrize("overrides, message", [
    (dict(prompts_per_round=0), "prompts_per_round must be >= 1"),
    (dict(policy="average"), "policy 'average' is not one of"),
    (dict(refresh_every=-1), "refresh_every must be an integer >= 0"),
])
def test_bad_online_settings_are_named_before_any_stage(tmp_path, overrides, message):
    from ernie_jax.runner.config import resolve

    config = online_config(tmp_path)
    config.pairs.update(**overrides)
    with pytest.raises(ValueError, match=message):
        resolve(config, tmp_path)
    config = online_config(tmp_path)
    config.data.preferences = (str(tmp_path),)
    with pytest.raises(ValueError, match="leave config.data.preferences empty"):
        resolve(config, tmp_path)
