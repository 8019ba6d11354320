"""DMD v1's regression term of the DMD objective (`regression_weight`): its value and gradient against an
independent PyTorch computation, weight 0 as no term at all, and the teacher's ODE pairs made by the runner's
`ode_pairs` stage and trained on through the runner."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ernie_jax.training.objectives import dmd, example_keys
from tests.conftest import relative_error
from tests.test_dmd import CONTEXT, GRID, SHAPE, STEPS, small_inputs, small_loss
from tests.test_dpo import SmallVelocity

REGRESSION_WEIGHT = 0.25


def torch_velocity(weights: dict):
    """`SmallVelocity` (tests/test_dpo.py) written again in torch over its weights (name -> tensor)."""

    def velocity(x, timestep, text, text_lens):
        valid = torch.arange(text.shape[1])[None, :] < text_lens[:, None]
        pooled = (text * valid[..., None]).sum(1) / text_lens.clamp(min=1)[:, None]
        time = weights["time"] * (timestep / 1000.0)[:, None, None, None]
        return weights["scale"] * torch.tanh(x) + weights["bias"] + time + (pooled @ weights["text"])[..., None, None]

    return velocity


def torch_regression(velocity, noise, target, text, text_lens, steps, grid, *, rollout_gradient=False):
    """DMD v1's regression of the student's x0-prediction at step `steps[b]` of its own Euler trajectory from
    `noise` onto `target`, `REGRESSION_WEIGHT mean((x0 - target)^2)`; the rollout without gradient (DMD2's
    backward simulation) unless `rollout_gradient`."""
    b = lambda s: s[:, None, None, None]
    x = noise
    with torch.set_grad_enabled(rollout_gradient):
        for i in range(len(grid) - 2):
            moved = x + (grid[i + 1] - grid[i]) * velocity(x, torch.full((len(x),), float(grid[i]) * 1000), text,
                                                            text_lens)
            x = torch.where(b(i < steps), moved, x)
    sigma = grid[steps]
    x0 = x - b(sigma) * velocity(x, sigma * 1000, text, text_lens)
    return REGRESSION_WEIGHT * ((x0 - target) ** 2).mean()


def regression_inputs(seed=5):
    inputs = small_inputs()
    rng = np.random.default_rng(seed)
    # Every student step, the last (K - 1: the sampler's K-step output) included.
    inputs["steps"] = jnp.asarray([0, STEPS - 1, 1, 2])
    inputs["ode_noise"] = jnp.asarray(rng.standard_normal((4, *SHAPE)), jnp.float32)
    inputs["ode_target"] = jnp.asarray(rng.standard_normal((4, *SHAPE)), jnp.float32)
    return inputs


def test_regression_value_and_gradient_match_torch():
    """With the DMD terms weighted 0 (their loss and gradient exactly 0), the generator loss is the regression
    term alone: its value, metric and gradient for every student weight equal torch's; a rollout that leaked
    gradient would give another gradient."""
    inputs = regression_inputs()
    critic, teacher = SmallVelocity(1), SmallVelocity(2)
    graphdef, params = nnx.split(SmallVelocity(0))
    regression = dmd.Regression(inputs["ode_noise"], inputs["ode_target"], REGRESSION_WEIGHT)

    def loss(p):
        student = nnx.merge(graphdef, p)
        return small_loss(student, critic, {"t": teacher}, inputs, dm_weight=0.0, ca_weight=0.0,
                          rollout=dmd.stopped(student), regression=regression)

    (value, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert float(metrics["dmd_loss"]) == 0.0

    weights = {name: torch.from_numpy(np.array(leaf[...])).requires_grad_() for name, leaf in params.items()}
    t = {k: torch.from_numpy(np.array(inputs[k])) for k in ("ode_noise", "ode_target", "text", "text_lens",
                                                                "steps")}
    grid = torch.from_numpy(np.asarray(GRID))
    args = (t["ode_noise"], t["ode_target"], t["text"], t["text_lens"], t["steps"], grid)
    expected = torch_regression(torch_velocity(weights), *args)
    expected_grad = torch.autograd.grad(expected, list(weights.values()))
    assert relative_error(value, expected.item()) <= 1e-6
    assert relative_error(metrics["regression"], expected.item() / REGRESSION_WEIGHT) <= 1e-6
    for name, expected_leaf in zip(weights, expected_grad, strict=True):
        assert np.abs(expected_leaf.numpy()).max() > 1e-3, name
        assert relative_error(grad[name][...], expected_leaf.numpy()) <= 1e-5, name
    leaked = torch.autograd.grad(torch_regression(torch_velocity(weights), *args, rollout_gradient=True),
                                 [weights["scale"]])[0]
    assert relative_error(grad["scale"][...], leaked.numpy()) > 1e-2


def objective_batch(inputs):
    return {"text": inputs["text"], "text_lens": inputs["text_lens"], "ode_noise": inputs["ode_noise"],
            "ode_target": inputs["ode_target"]}


def generator_update(weight):
    config = dmd.Config(teachers=("teacher",), latent_shape=SHAPE, student_steps=STEPS, guidance_scale=3.5,
                        regression_weight=weight)
    objective = dmd.make(config, CONTEXT)
    (update,) = [u for u in objective.updates if u.name == "generator"]
    models = {"transformer": SmallVelocity(0), "critic": SmallVelocity(1), "teacher": SmallVelocity(2)}
    frozen = {name: model for name, model in models.items() if name != "transformer"}
    return objective, jax.jit(lambda batch, keys: update.loss({"transformer": models["transformer"]}, frozen,
                                                              batch, keys))


def test_weight_zero_is_the_loss_without_the_term_and_reads_no_ode_keys():
    """Through the objective (its own draws from the keys): at weight 0 the batch keys hold no ode_* key, NaN
    pairs leave the loss finite (never read), and the loss is the DMD term that the weighted objective computes
    beside its regression; the weighted loss is that term plus weight x regression."""
    inputs = regression_inputs()
    keys = example_keys(jax.random.key(3), 4)
    off, off_loss = generator_update(0.0)
    on, on_loss = generator_update(REGRESSION_WEIGHT)
    assert off.batch_keys == ("text", "text_lens")
    assert on.batch_keys == ("text", "text_lens", "ode_noise", "ode_target")
    assert not dmd.reads_ode_pairs(off.config) and dmd.reads_ode_pairs(on.config)

    batch = objective_batch(inputs)
    poisoned = {**batch, "ode_noise": jnp.full_like(batch["ode_noise"], jnp.nan),
                "ode_target": jnp.full_like(batch["ode_target"], jnp.nan)}
    plain, plain_metrics = off_loss(poisoned, keys)
    assert np.isfinite(float(plain)) and "regression" not in plain_metrics

    weighted, metrics = on_loss(batch, keys)
    assert float(metrics["dmd_loss"]) == pytest.approx(float(plain), rel=1e-6)
    assert float(metrics["regression"]) > 0.1
    assert float(weighted) == pytest.approx(float(plain) + REGRESSION_WEIGHT * float(metrics["regression"]),
                                            rel=1e-6)
    with pytest.raises(ValueError, match=r"batch lacks \['ode_noise', 'ode_target'\]"):
        on_loss({k: batch[k] for k in off.batch_keys}, keys)
    with pytest.raises(ValueError, match="ode_noise .* and ode_target .* must be one shape"):
        on_loss({**batch, "ode_target": batch["ode_target"][:, :2]}, keys)
    with pytest.raises(ValueError, match="regression_weight must be non-negative"):
        dmd.Config(regression_weight=-0.1)


# ---- the teacher's ODE pairs, through the runner

ODE_VARIANT = "experiments/tiny_shapes_mtdmd.py:tiny_student_dmd2_ode"


@pytest.fixture(scope="module")
def ode_run(tmp_path_factory):
    """tiny_student_dmd2_ode through the runner (tiny random components, 24 records of which the 16 smallest
    source indices get pairs at 4 steps, CFG 3; 2 training steps): the run folder."""
    from tests.test_main import ok, run_main

    run = tmp_path_factory.mktemp("ode") / "run"
    ok(run_main(run, ODE_VARIANT, "--config.stages=('components','precompute','ode_pairs','train')",
                "--config.data.shapes.num_records=24"))
    return run


def test_stored_targets_are_the_teacher_sampled_alone_from_the_stored_noise(ode_run):
    """Each stored pair against its record and the teacher: the record's own latents and text, the pipeline's
    noise of seed `ode_pairs.seed + source index`, and as target what `ernie_jax.sampling` gives for that noise
    and text alone (batch 1, unpadded text) at the stage's steps, CFG and the components' shift, within 1e-5;
    without CFG it would be another output."""
    from conversions.transformer import load_transformer
    from ernie_jax import sampling
    from ernie_jax.data.ode_pairs import OdePairSource
    from ernie_jax.data.precomputed import PrecomputedSource
    from ernie_jax.runner.stages import scheduler_shift

    (folder,) = (ode_run / "ode_pairs").glob("*/shard-*")
    (records,) = (ode_run / "precomputed").glob("*/shard-*")
    pairs, precomputed = OdePairSource(folder), PrecomputedSource(records)
    assert sorted(pairs.index["source_index"].tolist()) == sorted(precomputed.index["source_index"].tolist())[:16]
    settings = json.loads((folder / "metadata.json").read_text())["ode_pairs"]
    assert (settings["num_inference_steps"], settings["guidance_scale"], settings["seed"]) == (4, 3.0, 0)
    teacher = load_transformer(ode_run / "components" / "transformer", "float32")
    shift = scheduler_shift(ode_run / "components")
    empty = pairs.empty_prompt
    for position in (0, len(pairs) - 1):
        pair = pairs[position]
        index = pair["source_index"]
        record = precomputed.record_of(index)
        np.testing.assert_array_equal(pair["latents"][0], record["latents"])
        np.testing.assert_array_equal(pair["text"], record["text"])
        noise = pair["latents"][1]
        expected_noise = jax.random.normal(jax.random.key(index), (1, *noise.shape), jnp.float32)[0]
        np.testing.assert_array_equal(noise, expected_noise)

        def alone(guidance, noise=noise, text=pair["text"]):
            return sampling.sample(teacher, noise[None], text[None], np.array([len(text)]),
                                   negative_text_bth=empty[None], negative_text_lens=np.array([len(empty)]),
                                   num_inference_steps=4, guidance_scale=guidance, shift=shift)[0]

        target = pair["latents"][2]
        assert relative_error(target, alone(3.0)) <= 1e-5, index
        assert relative_error(target, alone(1.0)) > 1e-3, index


def test_tiny_ode_ablation_trains_with_the_term_and_logs_it(ode_run):
    """Every generator update of the run logged a finite, positive `generator/regression` (its batches carried
    the pairs), and its loss is the DMD term plus 0.25 of it."""
    lines = [json.loads(line) for line in (ode_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    for line in lines:
        assert np.isfinite(line["generator/regression"]) and line["generator/regression"] > 0
        assert line["generator/loss"] == pytest.approx(line["generator/dmd_loss"] + REGRESSION_WEIGHT
                                                       * line["generator/regression"], rel=1e-5)


def test_the_ode_pairs_stage_runs_only_for_an_objective_that_reads_pairs_and_checks_its_settings(ode_run, tmp_path):
    from ernie_jax.runner.config import resolve
    from ernie_jax.runner.data import precomputed_sources
    from ernie_jax.runner.stages import ode_pairs
    from experiments import tiny_shapes_mtdmd

    def experiment(variant, **ode_settings):
        config = tiny_shapes_mtdmd.get_config(variant)
        config.ode_pairs.update(ode_settings)
        config.stages = ("ode_pairs", "train")
        config.data.precomputed = tuple(str(f) for f in (ode_run / "precomputed").glob("*/shard-*"))
        return resolve(config, tmp_path / variant)

    assert not ode_pairs.wanted(experiment("tiny_student_dmd2"))
    ablation = experiment("tiny_student_dmd2_ode")
    assert ode_pairs.wanted(ablation) and ode_pairs.settings(ablation)["records"] == 16
    with pytest.raises(ValueError, match="run the 'ode_pairs' stage"):
        precomputed_sources(ablation)
    for bad, message in ((dict(records=-1), "records must be an integer >= 0"),
                         (dict(teacher="expert"), "teacher 'expert' is not a frozen model"),
                         (dict(guidance_scale=0.5), "guidance_scale must be >= 1")):
        with pytest.raises(ValueError, match=message):
            ode_pairs.settings(experiment("tiny_student_dmd2_ode", **bad))


def test_pairs_batch_each_record_with_its_own_noise_and_output_and_a_failure_leaves_nothing(ode_run, tmp_path):
    """`make_ode_pairs` with a sampler whose output is known per row (noise + the mean of the row's valid text
    features), as two hosts' shards of the 22 smallest source indices (even and odd ones, 11 each, in batches of
    5 with the last filled up): every stored target is its own record's, the two folders read as one source; a
    sampler that fails leaves no folder."""
    from ernie_jax.data.ode_pairs import OdePairSource, make_ode_pairs
    from ernie_jax.data.precomputed import PrecomputedSource

    (records,) = (ode_run / "precomputed").glob("*/shard-*")
    source = PrecomputedSource(records)
    calls = []

    def sampler(noise, text, text_lens):
        calls.append(len(noise))
        means = text.sum(1) / text_lens[:, None]
        return noise + means.mean(1)[:, None, None, None]

    shards = [tmp_path / "pairs" / f"shard-{i}" for i in range(2)]
    for index, out in enumerate(shards):
        metadata = make_ode_pairs(sampler, source, out, seed=7, records=22, batch_size=5, shard_index=index,
                                  shard_count=2, progress=False)
        assert metadata["records"] == 11
    assert calls == [5, 5, 5] * 2
    smallest = sorted(source.index["source_index"].tolist())[:22]
    pairs = OdePairSource(shards)
    assert pairs.index["source_index"].tolist() == [i for i in smallest if i % 2 == 0] + [
        i for i in smallest if i % 2 == 1]
    for position in range(len(pairs)):
        pair = pairs[position]
        _, noise, target = pair["latents"]
        np.testing.assert_allclose(target, noise + pair["text"].mean(), rtol=1e-6, atol=1e-6)
        assert pair["origin"] == {"seed": 7 + pair["source_index"]}

    def failing(noise, text, text_lens):
        raise RuntimeError("teacher failed")

    with pytest.raises(RuntimeError, match="teacher failed"):
        make_ode_pairs(failing, source, tmp_path / "failed", seed=0, progress=False)
    assert not (tmp_path / "failed").exists() and list(tmp_path.iterdir()) == [tmp_path / "pairs"]
