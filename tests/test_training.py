"""Training: the flow-matching objective against the reference sampler, the sigma sampler, the optimizer,
gradient accumulation, bf16 compute over fp32 master weights, the sharded step (8 emulated devices, in a
subprocess), exact resumption after SIGKILL, and the stop on a non-finite loss."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ernie_jax import parallel, sampling
from ernie_jax.models import dit, layers
from ernie_jax.training import loop, optimizer, state, step
from ernie_jax.training.checkpoints import Checkpoints
from ernie_jax.training.metrics import TensorBoardWriter, read_scalars
from ernie_jax.training.objectives import Update, example_keys, flow_matching
from tests.conftest import run_worker
from tests.workers import training_run

REPO = Path(__file__).resolve().parents[1]


class ExactVelocity(nnx.Module):
    """The exact flow-matching velocity towards one data point x0: v(x, t) = sign (x - x0) / sigma, with
    sigma = t / 1000. The sampler must carry any noise to x0 with it, and the objective must score it 0."""

    def __init__(self, x0, sign: float = 1.0):
        self.x0 = nnx.Variable(jnp.asarray(x0, jnp.float32))
        self.sign = sign
        self.dtype = jnp.float32

    def __call__(self, x, timestep, text, text_lens):
        sigma = jnp.asarray(timestep, jnp.float32).reshape(-1, 1, 1, 1) / 1000.0
        return self.sign * (x - self.x0[...]) / sigma


def _draw(batch_shape, seed=0, **config):
    keys = example_keys(jax.random.key(seed), batch_shape[0])
    return flow_matching.draw_noise(keys, batch_shape, flow_matching.FlowMatchingConfig(**config))


def test_exact_velocity_has_zero_loss_and_samples_its_data_point():
    x0 = np.random.default_rng(0).standard_normal((3, 4, 3, 3)).astype(np.float32)
    text, text_lens = np.zeros((3, 2, 8), np.float32), np.ones(3, np.int32)
    draw = _draw(x0.shape, shift=3.0)
    seen = []

    def exact(x, timestep, text, text_lens):
        seen.append(np.asarray(timestep))
        return ExactVelocity(x0)(x, timestep, text, text_lens)

    loss, _ = flow_matching.flow_matching_loss(exact, x0, text, text_lens, draw)
    target = np.asarray(draw.noise) - x0
    assert float(loss) < 1e-9 * float(np.mean(target ** 2))
    # The model is fed timestep = 1000 sigma.
    np.testing.assert_allclose(seen[0], 1000.0 * np.asarray(draw.sigmas), rtol=1e-7)
    # The opposite sign scores |2 v*|^2.
    flipped, _ = flow_matching.flow_matching_loss(ExactVelocity(x0, sign=-1.0), x0, text, text_lens, draw)
    np.testing.assert_allclose(float(flipped), 4 * np.mean(target ** 2), rtol=1e-5)

    # The reference sampler (Euler from sigma = 1 to 0) driven by the zero-loss model lands on x0.
    noise = np.random.default_rng(1).standard_normal(x0.shape).astype(np.float32)
    for sign, lands in ((1.0, True), (-1.0, False)):
        graphdef, params = nnx.split(ExactVelocity(x0, sign))
        out = sampling.denoise_loop(graphdef, params, jnp.asarray(noise), text, text_lens,
                                    jnp.asarray(sampling.flow_match_sigmas(20, 3.0)), 1.0, use_cfg=False)
        error = float(np.abs(np.asarray(out) - x0).max())
        assert (error < 1e-5) if lands else (error > 1.0), (sign, error)


def test_text_dropout_uses_the_empty_prompt():
    text = np.random.default_rng(0).standard_normal((4, 5, 8)).astype(np.float32)
    lens = np.array([5, 3, 4, 2], np.int32)
    empty = flow_matching.EmptyPrompt(np.full((1, 8), 7.0, np.float32), 1)
    drop = jnp.array([True, False, True, False])
    new_text, new_lens = flow_matching.drop_text(jnp.asarray(text), jnp.asarray(lens), drop, empty)
    np.testing.assert_array_equal(new_lens, [1, 3, 1, 2])
    np.testing.assert_array_equal(new_text[1], text[1])
    np.testing.assert_array_equal(new_text[0, 0], np.full(8, 7.0))
    np.testing.assert_array_equal(new_text[2, 1:], 0.0)
    fraction = float(jnp.mean(_draw((20000, 1, 1, 1), text_dropout=0.25).drop_text))
    assert abs(fraction - 0.25) < 0.01
    with pytest.raises(ValueError, match="empty-prompt features"):
        flow_matching.drop_text(jnp.asarray(text), jnp.asarray(lens), drop, flow_matching.EmptyPrompt(np.zeros((6, 8)), 6))


def test_sigma_sampler_moments_and_shift():
    key, n, mean, std = jax.random.key(3), 200_000, 0.5, 0.8
    sigmas = np.asarray(flow_matching.sample_sigmas(key, n, mean=mean, std=std))
    logits = np.log(sigmas / (1 - sigmas))
    assert abs(np.median(sigmas) - 1 / (1 + np.exp(-mean))) < 3e-3  # median = sigmoid(mean): mean > 0 is noisier
    assert abs(logits.mean() - mean) < 1e-2 and abs(logits.std() - std) < 1e-2
    shifted = np.asarray(flow_matching.sample_sigmas(key, n, mean=mean, std=std, shift=3.0))
    np.testing.assert_allclose(shifted, 3 * sigmas / (1 + 2 * sigmas), rtol=1e-6)
    assert shifted.mean() > sigmas.mean() + 0.1  # shift > 1 moves mass towards noise
    # The same shift as the inference scheduler's (flow_match_sigmas is checked against diffusers).
    np.testing.assert_allclose(flow_matching.shift_sigmas(sampling.flow_match_sigmas(50, 1.0)[:-1], 4.0),
                               sampling.flow_match_sigmas(50, 4.0)[:-1], rtol=1e-6)
    uniform = np.asarray(flow_matching.sample_sigmas(key, n, scheme="uniform"))
    assert abs(uniform.mean() - 0.5) < 3e-3 and uniform.min() >= 0 and uniform.max() < 1
    mode = np.asarray(flow_matching.sample_sigmas(key, n, scheme="mode"))
    assert mode.min() >= 0 and mode.max() <= 1
    with pytest.raises(ValueError, match="sigma_scheme"):
        flow_matching.FlowMatchingConfig(sigma_scheme="lognorm")


def test_loss_weightings():
    sigmas = jnp.array([0.25, 0.5])
    np.testing.assert_allclose(flow_matching.loss_weights(sigmas, "sigma_sqrt"), [16.0, 4.0])
    np.testing.assert_allclose(flow_matching.loss_weights(sigmas, "cosmap"),
                               2 / (np.pi * (1 - 2 * np.array([0.25, 0.5]) + 2 * np.array([0.25, 0.5]) ** 2)))


def test_schedule_clipping_and_weight_decay_mask():
    config = optimizer.OptimizerConfig(learning_rate=1e-2, warmup_steps=10, decay_steps=110, final_lr_fraction=0.1,
                                       weight_decay=0.5, clip_norm=1.0)
    schedule = optimizer.learning_rate_schedule(config)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110), schedule(500)],
                               [0.0, 5e-3, 1e-2, 5.5e-3, 1e-3, 1e-3], rtol=1e-5)
    tx = optimizer.make_optimizer(dataclasses.replace(config, warmup_steps=0))
    # A scanned block stacks its bias and norm scale to [L, D]: rank alone does not tell them from matrices.
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3), "blocks": {"norm": {"scale": jnp.ones((4, 3))}}}
    # Zero gradients: only the decoupled weight decay moves the parameters, and only the kernels.
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -1e-2 * 0.5 * np.ones((2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)
    np.testing.assert_array_equal(updates["blocks"]["norm"]["scale"], 0.0)
    # The DiT's nnx.State (paths end in `.value`): its 14 kernels decay; its stacked [L, D] scales do not.
    model = nnx.eval_shape(lambda: dit.ErnieImageTransformer(dit.PRESETS["tiny"], rngs=nnx.Rngs(0)))
    decayed = {jax.tree_util.keystr(path): flag for path, flag in
               jax.tree_util.tree_flatten_with_path(optimizer._kernels(nnx.state(model, nnx.Param)))[0]}
    assert sorted(path for path, flag in decayed.items() if flag) == sorted(
        path for path in decayed if path.endswith("['kernel'].value"))
    assert sum(decayed.values()) == 14
    assert not decayed["['layers']['adaLN_sa_ln']['scale'].value"]
    # Gradients of global norm 100 are clipped to norm 1 before Adam (whose first step is then lr * sign).
    clip = optax.clip_by_global_norm(1.0)
    grads = {"kernel": jnp.full((2, 3), 100.0 / np.sqrt(9)), "bias": jnp.full(3, 100.0 / np.sqrt(9))}
    clipped, _ = clip.update(grads, clip.init(params))
    np.testing.assert_allclose(float(optax.global_norm(clipped)), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="warmup_steps"):
        optimizer.OptimizerConfig(warmup_steps=10, decay_steps=10)


def test_gradient_accumulation_ema_and_bf16_over_float32_master_weights():
    mesh = parallel.make_mesh({}, devices=jax.devices()[:1])
    batch = {k: v for k, v in next(iter(training_run.dataset(1, batch=8))).items() if k != "index"}
    # Plain SGD, so that the update is the (accumulated) gradient itself; Adam's first step is about
    # lr * sign(g) and would blow up float rounding of gradients near 0.
    tx = optax.sgd(0.1)
    parts = {"transformer": state.TrainablePart(training_run.tiny_model, tx, ema_decay=0.9)}
    graphdefs, initial = state.create_train_state(parts, seed=0, mesh=mesh, rules=parallel.TRAINING_RULES)
    objective = flow_matching.FlowMatching(flow_matching.FlowMatchingConfig(shift=3.0, text_dropout=0.5),
                                           training_run.empty_prompt())
    results = {}
    for k in (1, 4):
        step_fn = step.make_train_step(parts, graphdefs, objective, microbatches=k)
        results[k] = jax.jit(step_fn)(initial, {}, batch)
    (one, one_metrics), (four, four_metrics) = results[1], results[4]
    np.testing.assert_allclose(four_metrics["loss"], one_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(four_metrics["grad_norm"], one_metrics["grad_norm"], rtol=1e-6)
    update_one = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(one.params),
                                                                  jax.tree.leaves(initial.params))])
    update_four = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(four.params),
                                                                   jax.tree.leaves(initial.params))])
    assert np.abs(update_one).max() > 1e-4  # the update did happen (measured 9.9e-4)
    # Measured 6.1e-6 relative (float32 summation order).
    assert np.abs(update_four - update_one).max() < 2e-5 * np.abs(update_one).max()
    for ema, new, old in zip(jax.tree.leaves(one.ema_params), jax.tree.leaves(one.params),
                             jax.tree.leaves(initial.params)):
        np.testing.assert_allclose(ema, 0.9 * old + 0.1 * new, rtol=1e-6, atol=1e-7)
    assert int(one.step) == 1

    # bf16 compute over the same float32 master weights: parameters, gradients (hence the SGD update) and
    # EMA stay float32; measured drift against fp32 compute: 3.1e-5 (loss), 2.0e-2 (update) relative.
    bf16_parts = {"transformer": state.TrainablePart(functools.partial(training_run.tiny_model, dtype=jnp.bfloat16),
                                                     tx, ema_decay=0.9)}
    bf16_graphdefs, _ = state.abstract_train_state(bf16_parts, seed=0, mesh=mesh, rules=parallel.TRAINING_RULES)
    bf16_step = step.make_train_step(bf16_parts, bf16_graphdefs, objective)
    bf16, bf16_metrics = jax.jit(bf16_step)(initial, {}, batch)
    assert {leaf.dtype for leaf in jax.tree.leaves((bf16.params, bf16.ema_params))} == {jnp.dtype(jnp.float32)}
    assert abs(float(bf16_metrics["loss"]) / float(one_metrics["loss"]) - 1) < 1e-3
    update_bf16 = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(bf16.params),
                                                                   jax.tree.leaves(initial.params))])
    assert 0 < np.abs(update_bf16 - update_one).max() < 5e-2 * np.abs(update_one).max()
    with pytest.raises(ValueError, match="float32 master weights"):
        linear = state.TrainablePart(lambda rngs: nnx.Linear(2, 2, param_dtype=jnp.bfloat16, rngs=rngs), tx)
        state.abstract_train_state({"linear": linear}, seed=0, mesh=mesh, rules=parallel.TRAINING_RULES)
    with pytest.raises(ValueError, match="not divisible by microbatches=3"):
        jax.jit(step.make_train_step(parts, graphdefs, objective, microbatches=3))(initial, {}, batch)
    with pytest.raises(ValueError, match="needs the empty prompt"):
        flow_matching.FlowMatching(flow_matching.FlowMatchingConfig(text_dropout=0.5))
    with pytest.raises(ValueError, match="the objective trains"):
        step.make_train_step({"other": parts["transformer"]}, graphdefs, objective)
    with pytest.raises(KeyError, match="the batch lacks"):
        step.make_train_step(parts, graphdefs, objective)(initial, {}, {"latents": batch["latents"]})


class _TakingTurns:
    """Part "critic" fits the noise of each example from the generator's output (3 runs per step), then part
    "generator" moves the critic's output towards 1."""

    batch_keys = ("x",)
    trains = ("critic", "generator")
    reads = ()

    @staticmethod
    def critic_loss(trainable, frozen, batch, keys):
        noise = jax.vmap(lambda key: jax.random.normal(key, (2,)))(keys)
        loss = jnp.mean(jnp.square(trainable["critic"](frozen["generator"](batch["x"])) - noise))
        return loss, {"loss": loss}

    @staticmethod
    def generator_loss(trainable, frozen, batch, keys):
        loss = jnp.mean(jnp.square(frozen["critic"](trainable["generator"](batch["x"])) - 1))
        return loss, {"loss": loss}

    @property
    def updates(self):
        return (Update("critic", ("critic",), self.critic_loss, repeats=3),
                Update("generator", ("generator",), self.generator_loss))


def test_updates_take_turns_each_on_its_slice_with_its_own_optimizer():
    mesh = parallel.make_mesh({}, devices=jax.devices()[:1])
    def build(rngs):
        return layers.linear(2, 2, axes=("embed", "mlp"), use_bias=True, dtype=jnp.float32,
                             param_dtype=jnp.float32, rngs=rngs)

    parts = {name: state.TrainablePart(build, optax.adam(0.05), ema_decay=0.5) for name in ("critic", "generator")}
    graphdefs, initial = state.create_train_state(parts, seed=0, mesh=mesh, rules=parallel.TRAINING_RULES)
    batch = {"x": jax.random.normal(jax.random.key(1), (8, 2))}
    objective = _TakingTurns()
    done, metrics = jax.jit(step.make_train_step(parts, graphdefs, objective))(initial, {}, batch)
    halves, _ = jax.jit(step.make_train_step(parts, graphdefs, objective, microbatches=2))(initial, {}, batch)

    # The same turns by hand: run j reads rows j, j + 4 and their keys.
    keys = example_keys(step.step_key(initial), 8)
    params, opt_state = dict(initial.params), dict(initial.opt_state)

    def turn(name, loss, rows, other):
        def of(p):
            models = {n: nnx.merge(graphdefs[n], p if n == name else params[n]) for n in parts}
            return loss({name: models[name]}, {other: models[other]}, {"x": batch["x"][rows]}, keys[rows])[0]

        change, opt_state[name] = parts[name].optimizer.update(jax.grad(of)(params[name]), opt_state[name],
                                                               params[name])
        params[name] = optax.apply_updates(params[name], change)

    for run in range(3):
        turn("critic", objective.critic_loss, np.arange(run, 8, 4), "generator")
    turn("generator", objective.generator_loss, np.arange(3, 8, 4), "critic")
    for name in parts:
        for got, half, want in zip(jax.tree.leaves(done.params[name]), jax.tree.leaves(halves.params[name]),
                                   jax.tree.leaves(params[name])):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(half, want, rtol=1e-5, atol=1e-6)
    assert int(done.opt_state["critic"][0].count) == 3 and int(done.opt_state["generator"][0].count) == 1
    # The critic's EMA went through three updates at decay 0.5, the generator's one.
    critic_kernel = [float(p["kernel"][0, 0]) for p in (initial.params["critic"], done.params["critic"])]
    assert float(done.ema_params["critic"]["kernel"][0, 0]) != pytest.approx(np.mean(critic_kernel))
    np.testing.assert_allclose(done.ema_params["generator"]["kernel"],
                               (initial.params["generator"]["kernel"] + done.params["generator"]["kernel"]) / 2,
                               rtol=1e-6)
    assert {"critic/loss", "critic/grad_norm", "generator/loss", "generator/grad_norm"} <= set(metrics)
    with pytest.raises(ValueError, match="not divisible by microbatches=1 x 4 update run"):
        step.make_train_step(parts, graphdefs, objective)(initial, {}, {"x": batch["x"][:6]})
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        Update("critic", ("critic",), objective.critic_loss, repeats=0)


def test_a_part_with_ema_decay_0_keeps_no_ema_and_exports_its_trained_weights(tmp_path):
    """The critic at decay 0 holds no EMA copy (at 8B, 32 GB of float32); what its averaged weights are read
    as (evaluators, export) is its trained weights, while the generator keeps its EMA."""
    mesh = parallel.make_mesh({}, devices=jax.devices()[:1])

    def build(rngs):
        return layers.linear(2, 2, axes=("embed", "mlp"), use_bias=True, dtype=jnp.float32,
                             param_dtype=jnp.float32, rngs=rngs)

    parts = {"critic": state.TrainablePart(build, optax.adam(0.05), ema_decay=0.0),
             "generator": state.TrainablePart(build, optax.adam(0.05), ema_decay=0.5)}
    graphdefs, initial = state.create_train_state(parts, seed=0, mesh=mesh, rules=parallel.TRAINING_RULES)
    assert sorted(initial.ema_params) == ["generator"]
    batch = {"x": jax.random.normal(jax.random.key(1), (8, 2))}
    done, _ = jax.jit(step.make_train_step(parts, graphdefs, _TakingTurns()))(initial, {}, batch)
    assert sorted(done.ema_params) == ["generator"]
    averaged = done.averaged_params()
    assert averaged["critic"] is done.params["critic"] and averaged["generator"] is done.ema_params["generator"]
    np.testing.assert_allclose(done.ema_params["generator"]["kernel"],
                               (initial.params["generator"]["kernel"] + done.params["generator"]["kernel"]) / 2,
                               rtol=1e-6)

    checkpoints = Checkpoints(tmp_path / "ckpt", async_save=False)
    try:
        checkpoints.save(1, done, force=True)
        _, abstract = state.abstract_train_state(parts, seed=0, mesh=mesh, rules=parallel.TRAINING_RULES)
        for ema, expected in ((True, averaged), (False, done.params)):
            restored = checkpoints.restore_weights(abstract, ema=ema)
            assert sorted(restored) == ["critic", "generator"]
            for name in parts:
                for got, want in zip(jax.tree.leaves(restored[name]), jax.tree.leaves(expected[name]), strict=True):
                    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    finally:
        checkpoints.close()
    # The EMA and the trained generator differ, so the restore above read each from its own field.
    assert np.abs(np.asarray(done.ema_params["generator"]["kernel"] - done.params["generator"]["kernel"])).max() > 1e-3


def test_an_objective_metric_named_like_the_trainers_gradient_norm_is_refused():
    """Before, the trainer's `grad_norm` silently replaced an objective's metric of that name."""
    mesh = parallel.make_mesh({}, devices=jax.devices()[:1])

    def build(rngs):
        return layers.linear(2, 2, axes=("embed", "mlp"), use_bias=True, dtype=jnp.float32,
                             param_dtype=jnp.float32, rngs=rngs)

    class Clashing(_TakingTurns):
        @staticmethod
        def generator_loss(trainable, frozen, batch, keys):
            loss, _ = _TakingTurns.generator_loss(trainable, frozen, batch, keys)
            return loss, {"loss": loss, "grad_norm": loss}

    parts = {name: state.TrainablePart(build, optax.adam(0.05)) for name in ("critic", "generator")}
    graphdefs, initial = state.create_train_state(parts, seed=0, mesh=mesh, rules=parallel.TRAINING_RULES)
    with pytest.raises(ValueError, match=r"metrics \['grad_norm'\] have the names of the trainer's gradient norms"):
        step.make_train_step(parts, graphdefs, Clashing())(initial, {}, {"x": jnp.ones((4, 2))})


def test_sharded_train_step_equals_single_device():
    """Two updates (fp32, 2 microbatches, text dropout) on 8 emulated devices, fsdp x tensor and data x fsdp
    (the split the XLA workaround in parallel.py exists for), and fsdp x tensor made by jax.make_mesh (Explicit
    axes), against one device, in one worker process: measured 2e-7 (loss), 3.7e-6 (params, through Adam's
    first steps), 3.6e-7 (EMA), 1.3e-6 (Adam moments) relative."""
    results = run_worker("sharded_training.py", "fsdp=4,tensor=2", "data=2,fsdp=4", "fsdp=4,tensor=2,explicit")
    assert sorted(results) == ["data=2,fsdp=4", "fsdp=4,tensor=2", "fsdp=4,tensor=2,explicit"]
    for name, r in results.items():
        assert r["step"] == 2
        for part in ("loss", "params", "ema_params", "opt_state"):
            assert r[part] < 1e-5, (name, part, r[part])
        # The weights and their Adam moments are split, not replicated: [1, 256, 512] gate_proj (layers,
        # embed -> fsdp, mlp -> tensor); the batch is split over data x fsdp.
        assert r["kernel_shard"] == r["moment_shard"]
        mesh = name.removesuffix(",explicit")
        assert r["kernel_shard"] == {"fsdp=4,tensor=2": [1, 64, 256], "data=2,fsdp=4": [1, 64, 512]}[mesh]
        assert r["latents_shard"][0] == {"fsdp=4,tensor=2": 2, "data=2,fsdp=4": 1}[mesh]


def _read_log(path):
    with open(path) as f:
        return {row["step"]: row for row in map(json.loads, f)}


def _newest_checkpoint(folder) -> int | None:
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps, default=None)


def _logged_steps(path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def test_sigkill_mid_run_resumes_with_exactly_the_same_losses_and_log(tmp_path):
    steps, every, keep = 12, 3, 2
    training_run.run(tmp_path / "uninterrupted", tmp_path / "uninterrupted.jsonl", num_steps=steps,
                     checkpoint_every=every, max_to_keep=keep)
    expected = (tmp_path / "uninterrupted.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in expected] == list(range(steps))

    checkpoints, log = tmp_path / "killed", tmp_path / "log.jsonl"
    command = [sys.executable, str(REPO / "tests" / "workers" / "training_run.py"), str(checkpoints), str(log),
               "--num-steps", str(steps), "--checkpoint-every", str(every), "--max-to-keep", str(keep)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(command + ["--step-delay", "0.3"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    # Killed once it has logged an update after its newest checkpoint: the resumed run redoes that update.
    while (newest := _newest_checkpoint(checkpoints)) is None or max(_logged_steps(log), default=-1) < newest:
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(_logged_steps(log))
    assert killed_at < steps - 1, "the run finished before it was killed"

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    # The log reads as the uninterrupted run's: every update once, in order, the same losses bit for bit
    # and the same data (the batch's first example index, 4 * step: the data position was restored).
    resumed = (log.read_text()).splitlines()
    assert [json.loads(line)["step"] for line in resumed] == list(range(steps)), (killed_at, newest)
    for got, want in zip(map(json.loads, resumed), map(json.loads, expected)):
        assert got["loss"] == want["loss"] and got["first_index"] == want["first_index"] == 4 * got["step"]
    # Only the newest `keep` checkpoints remain.
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [steps - every, steps]


def test_tensorboard_logs_of_a_resumed_run_hide_the_killed_runs_repeated_steps(tmp_path):
    first = TensorBoardWriter(tmp_path)
    for update in range(1, 6):
        first.scalars(update, {"train/loss": float(update)})
    first.close()
    time.sleep(1.1)  # event files are named by the second they are opened
    resumed = TensorBoardWriter(tmp_path, purge_step=4)
    for update in range(4, 7):
        resumed.scalars(update, {"train/loss": 10.0 * update})
    resumed.close()
    assert read_scalars(tmp_path)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteLossError, match="at step 3;.* is step 3"):
        training_run.run(tmp_path / "ckpt", tmp_path / "log.jsonl", num_steps=6, checkpoint_every=1, max_to_keep=2,
                         nan_at_step=3)
    assert sorted(_read_log(tmp_path / "log.jsonl")) == [0, 1, 2]
    checkpoints = Checkpoints(tmp_path / "ckpt")
    try:
        assert checkpoints.all_steps() == [2, 3]
        _, abstract = state.abstract_train_state(training_run.parts(), seed=0, mesh=parallel.make_mesh({"fsdp": -1}),
                                                 rules=parallel.TRAINING_RULES)
        restored = checkpoints.restore(abstract)
    finally:
        checkpoints.close()
    assert int(restored.step) == 3
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(restored))
