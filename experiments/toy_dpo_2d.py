"""Experiment A (reference/training_algorithms.md section 9): does (stabilized) Flow-DPO raise a reward's win
rate on a 2-D toy, do the anchors stop collapse, and does the article's variant do anything?

A base flow-matching MLP learns an 8-mode Gaussian mixture (modes on a circle); the reward is closeness to
modes 0-2; pairs are two base samples labelled by a Bradley-Terry draw on the reward (one prompt: the model is
unconditional). Each method then fine-tunes the base, which stays frozen as the reference:

- `diffusion_dpo`, `flow_dpo`, `ernie` (with the report's anchors 0.35 / 0.15), `article`: the losses of
  `ernie_jax.training.objectives.dpo` (its `noised_pairs` and `preference_loss`, the code the DiT trains with),
  each over a decade grid of beta (per-element-mean units, D = 2 here);
- `sft`: flow matching on the winners only;
- `article_perturbed`: the article's loss from 1% away from the base (at the base its gradient is exactly 0).

The base is trained with `flow_matching.flow_matching_loss` (the MLP seen as `[N, 2, 1, 1]` latents).

Metrics, each over 1000 samples per model (50 Euler steps): the win rate against the base
(P[r(policy sample) > r(base sample)] over all pairs of the two sample sets, 0.5 = no change), the mean reward,
the share of samples nearest to modes 0-2 (3/8 in the data), the energy distance (dpo_shapes_study's:
E|X - Y| - (E|X - X'| + E|Y - Y'|) / 2) to a second, independent base sample set (the `base` row gives the
distance between two base sets: the noise floor); on fixed held-out pairs, the policy's flow-matching errors
on chosen and rejected points relative to the reference's (over training and at the end), the velocity-norm
ratio ||v_policy|| / ||v_reference|| and the implicit accuracy.
Every number is the mean +- std over seeds; each seed has its own base model, pairs and draws.

    python -m experiments.toy_dpo_2d --seeds 5 [--out FILE]

`run(small=True)` is the version a test runs (~20 s on 2 CPU cores, mostly compilation): 2 seeds, smaller
sizes, beta = 1 only, methods flow_dpo, ernie and article.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ernie_jax.training.objectives import dpo, flow_matching
from experiments.dpo_shapes_study import energy_distance

MODES, RADIUS, MODE_STD = 8, 4.0, 0.4
PREFERRED = (0, 1, 2)
TIME_FREQUENCIES = 8
ANCHORS = (0.35, 0.15)  # the report's lambda_win, lambda_lose
# The article's loss has zero gradient at policy = reference; `article_perturbed` starts 1% away to show where
# it goes from there.
PERTURBATION = 0.01


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and optimisation of one run of the experiment."""

    seeds: int = 5
    hidden: int = 128
    base_steps: int = 2000
    base_batch: int = 512
    base_learning_rate: float = 2e-3
    pairs: int = 4096
    held_out_pairs: int = 512
    bt_temperature: float = 0.5
    steps: int = 1000
    batch: int = 256
    learning_rate: float = 3e-4
    log_every: int = 50
    samples: int = 1000
    sampling_steps: int = 50
    betas: tuple[float, ...] = (0.1, 1.0, 10.0)
    methods: tuple[str, ...] = ("sft", "diffusion_dpo", "flow_dpo", "ernie", "article", "article_perturbed")


SMALL = Settings(seeds=2, hidden=32, base_steps=400, base_batch=256, pairs=512, held_out_pairs=128, steps=200,
                 batch=128, learning_rate=1e-3, samples=300, sampling_steps=16, betas=(1.0,),
                 methods=("flow_dpo", "ernie", "article"))


def mode_centres() -> jax.Array:
    """`[MODES, 2]` on a circle of radius RADIUS; mode k at angle 2 pi k / MODES."""
    angles = 2 * math.pi * jnp.arange(MODES) / MODES
    return RADIUS * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)


def sample_data(key: jax.Array, count: int) -> jax.Array:
    mode_key, noise_key = jax.random.split(key)
    modes = jax.random.randint(mode_key, (count,), 0, MODES)
    return mode_centres()[modes] + MODE_STD * jax.random.normal(noise_key, (count, 2))


def reward(x: jax.Array) -> jax.Array:
    """`[N]`: minus the distance to the nearest of the preferred modes."""
    centres = mode_centres()[jnp.asarray(PREFERRED)]
    return -jnp.min(jnp.linalg.norm(x[:, None, :] - centres[None], axis=-1), axis=1)


def nearest_mode(x: jax.Array) -> jax.Array:
    return jnp.argmin(jnp.linalg.norm(x[:, None, :] - mode_centres()[None], axis=-1), axis=1)


def init_mlp(key: jax.Array, hidden: int, condition_dim: int = 0) -> list[tuple[jax.Array, jax.Array]]:
    """Three hidden SiLU layers over (x, sigma's Fourier features, an optional condition vector)."""
    sizes = (2 + 2 * TIME_FREQUENCIES + condition_dim, hidden, hidden, hidden, 2)
    keys = jax.random.split(key, len(sizes) - 1)
    return [(jax.random.normal(k, (fan_in, fan_out)) / math.sqrt(fan_in), jnp.zeros(fan_out))
            for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:])]


def velocity(params, x: jax.Array, sigmas: jax.Array, condition: jax.Array | None = None) -> jax.Array:
    """`x [N, 2]`, `sigmas [N]` (and `condition [N, condition_dim]` for a conditional MLP) -> the predicted
    velocity eps - x0 `[N, 2]`."""
    angles = math.pi * sigmas[:, None] * jnp.arange(1, TIME_FREQUENCIES + 1)
    h = jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)] + ([] if condition is None else [condition]), axis=1)
    for weight, bias in params[:-1]:
        h = jax.nn.silu(h @ weight + bias)
    weight, bias = params[-1]
    return h @ weight + bias


def sample(params, key: jax.Array, count: int, steps: int) -> jax.Array:
    """Euler from sigma = 1 to 0 on a uniform grid."""
    grid = jnp.linspace(1.0, 0.0, steps + 1)

    def step(x, sigma_pair):
        sigma, sigma_next = sigma_pair
        return x + (sigma_next - sigma) * velocity(params, x, jnp.full((count,), sigma)), None

    x, _ = jax.lax.scan(step, jax.random.normal(key, (count, 2)), (grid[:-1], grid[1:]))
    return x


SIGMAS = flow_matching.SigmaSampling()  # logit-normal(0, 1), unshifted: the base's draw, reused for fine-tuning


def as_latent_model(params) -> flow_matching.VelocityFn:
    """The MLP with the DiT's signature, for flow_matching's loss: points as `[N, 2, 1, 1]` latents, no text."""
    return lambda x, timestep, text, text_lens: velocity(params, x[:, :, 0, 0], timestep / 1000.0)[:, :, None, None]


def train_base(key: jax.Array, settings: Settings):
    init_key, loop_key = jax.random.split(key)
    params = init_mlp(init_key, settings.hidden)
    optimizer = optax.adam(optax.cosine_decay_schedule(settings.base_learning_rate, settings.base_steps, 0.05))

    def loss(params, key):
        data_key, noise_key = jax.random.split(key)
        x0 = sample_data(data_key, settings.base_batch)[:, :, None, None]
        draw = flow_matching.draw_noise(jax.random.split(noise_key, settings.base_batch), x0.shape,
                                        flow_matching.FlowMatchingConfig())
        no_text = jnp.zeros((settings.base_batch, 0, 1)), jnp.zeros((settings.base_batch,), jnp.int32)
        return flow_matching.flow_matching_loss(as_latent_model(params), x0, *no_text, draw)[0]

    return fit(loss, params, optimizer, jax.random.split(loop_key, settings.base_steps))


def fit(loss, params, optimizer: optax.GradientTransformation, keys: jax.Array):
    """`params` after one `optimizer` update on `loss(params, key)` for each key of `keys`, as one scan."""
    def step(carry, key):
        params, state = carry
        updates, state = optimizer.update(jax.grad(loss)(params, key), state)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    return params


def make_pairs(key: jax.Array, params, count: int, settings: Settings) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) `[count, 2]` each: two base samples, the first chosen with probability
    sigmoid((r(a) - r(b)) / temperature) (Bradley-Terry)."""
    sample_key, label_key = jax.random.split(key)
    x = sample(params, sample_key, 2 * count, settings.sampling_steps)
    a, b = x[:count], x[count:]
    first_wins = jax.random.bernoulli(label_key, jax.nn.sigmoid((reward(a) - reward(b)) / settings.bt_temperature))
    return jnp.where(first_wins[:, None], a, b), jnp.where(first_wins[:, None], b, a)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    variant: str | None  # None: SFT on the winners
    beta: float = 0.0
    lambda_win: float = 0.0
    lambda_lose: float = 0.0
    start_noise: float = 0.0  # the policy starts from the base plus this fraction of each tensor's spread

    @property
    def label(self) -> str:
        return self.name if self.variant is None else f"{self.name} beta={self.beta:g}"


def methods(settings: Settings) -> list[Method]:
    found = []
    for name in settings.methods:
        if name == "sft":
            found.append(Method("sft", None))
        elif name == "article_perturbed":
            found += [Method(name, "article", beta, start_noise=PERTURBATION) for beta in settings.betas]
        else:
            anchors = ANCHORS if name == "ernie" else (0.0, 0.0)
            found += [Method(name, name, beta, *anchors) for beta in settings.betas]
    return found


def pair_loss(params, reference, chosen, rejected, noise, sigmas, method: Method):
    """The method's loss and `preference_loss`'s metrics on a batch of pairs (noise and sigma shared per pair)."""
    x_sigma, target = dpo.noised_pairs(chosen, rejected, noise, sigmas)
    both = jnp.tile(sigmas, 2)
    policy_velocity = velocity(params, x_sigma, both)
    reference_velocity = jax.lax.stop_gradient(velocity(reference, x_sigma, both))
    if method.variant is None:  # SFT: the winners' flow-matching error, with the metrics flow_dpo reports
        _, metrics = dpo.preference_loss(policy_velocity, reference_velocity, target, sigmas, beta=1.0,
                                         variant="flow_dpo")
        return metrics["policy_chosen_error"], metrics
    return dpo.preference_loss(policy_velocity, reference_velocity, target, sigmas, beta=method.beta,
                               lambda_win=method.lambda_win, lambda_lose=method.lambda_lose, variant=method.variant)


def draw_noise(key: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """`count` pairs' noise `[count, 2]` and sigmas `[count]`, each pair's from its own key (as the DPO
    objective draws them)."""
    return jax.vmap(lambda pair_key: dpo.draw_example(pair_key, (2,), SIGMAS))(jax.random.split(key, count))


def fine_tune(key: jax.Array, base, pairs, held_out, method: Method, settings: Settings):
    """The policy after `settings.steps` Adam steps from the base, and the held-out metrics every `log_every`
    steps (`{name: [logs]}`, the first at step 0)."""
    chosen, rejected = pairs
    held_out_key, loop_key, start_key = jax.random.split(key, 3)
    held_out_noise = draw_noise(held_out_key, held_out[0].shape[0])
    optimizer = optax.adam(settings.learning_rate)

    def held_out_metrics(params):
        return pair_loss(params, base, *held_out, *held_out_noise, method)[1]

    def step(carry, key):
        params, state = carry
        index_key, noise_key = jax.random.split(key)
        rows = jax.random.randint(index_key, (settings.batch,), 0, chosen.shape[0])
        grads, _ = jax.grad(pair_loss, has_aux=True)(params, base, chosen[rows], rejected[rows],
                                                     *draw_noise(noise_key, settings.batch), method)
        updates, state = optimizer.update(grads, state)
        return (optax.apply_updates(params, updates), state), None

    def logged_segment(carry, keys):
        carry, _ = jax.lax.scan(step, carry, keys)
        return carry, held_out_metrics(carry[0])

    segments = settings.steps // settings.log_every
    keys = jax.random.split(loop_key, segments * settings.log_every)
    leaves, treedef = jax.tree.flatten(base)
    start = treedef.unflatten([leaf + method.start_noise * jnp.std(leaf) * jax.random.normal(k, leaf.shape)
                               for leaf, k in zip(leaves, jax.random.split(start_key, len(leaves)))])
    (params, _), logs = jax.lax.scan(logged_segment, (start, optimizer.init(start)),
                                     keys.reshape(segments, settings.log_every))
    first = held_out_metrics(start)
    return params, jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, logs)


def sample_metrics(params, key: jax.Array, base_samples: jax.Array, settings: Settings):
    """The model's samples, and their win rate against `base_samples`, mean reward and preferred-mode share."""
    x = sample(params, key, settings.samples, settings.sampling_steps)
    r, r_base = reward(x), reward(base_samples)
    wins = jnp.mean((r[:, None] > r_base[None]) + 0.5 * (r[:, None] == r_base[None]))
    preferred = jnp.mean(jnp.isin(nearest_mode(x), jnp.asarray(PREFERRED)))
    return dict(samples=x, win_rate=wins, mean_reward=jnp.mean(r), preferred_share=preferred)


def run(seeds: int | None = None, small: bool = False, settings: Settings | None = None, log=print) -> dict:
    """`{label: {metric: [per seed]}}` for the base and every method; with `small`, SMALL's sizes."""
    settings = settings or (SMALL if small else Settings())
    if seeds is not None:
        settings = dataclasses.replace(settings, seeds=seeds)
    seed_keys = jax.random.split(jax.random.key(0), settings.seeds)
    start = time.time()

    # Per seed: base model, training pairs, held-out pairs, the base samples a policy is compared with, a second
    # base sample set for the distances, the policies' samples (the same key for every method), fine-tuning.
    keys = jax.vmap(lambda key: jax.random.split(key, 7))(seed_keys)
    base_keys, pair_keys, held_out_keys, base_sample_keys, distance_keys, sample_keys, tune_keys = keys.T

    @jax.jit
    @jax.vmap
    def prepare(base_key, pair_key, held_out_key, base_sample_key, distance_key):
        base = train_base(base_key, settings)
        pairs = make_pairs(pair_key, base, settings.pairs, settings)
        held_out = make_pairs(held_out_key, base, settings.held_out_pairs, settings)
        base_samples = sample(base, base_sample_key, settings.samples, settings.sampling_steps)
        base_reference = sample(base, distance_key, settings.samples, settings.sampling_steps)
        return base, pairs, held_out, base_samples, base_reference

    base, pairs, held_out, base_samples, base_reference = prepare(base_keys, pair_keys, held_out_keys,
                                                                  base_sample_keys, distance_keys)
    log(f"base models and pairs: {time.time() - start:.0f} s")
    metrics = jax.jit(jax.vmap(functools.partial(sample_metrics, settings=settings)))

    def evaluate(params) -> dict:
        row = dict(jax.tree.map(np.asarray, metrics(params, sample_keys, base_samples)))
        samples = row.pop("samples")
        row["energy_distance"] = np.array([energy_distance(x, y) for x, y in zip(samples, np.asarray(base_reference))])
        return row

    results = {"base": evaluate(base)}
    for method in methods(settings):
        tune = jax.jit(jax.vmap(functools.partial(fine_tune, method=method, settings=settings)))
        params, logs = tune(tune_keys, base, pairs, held_out)
        row = evaluate(params)
        logs = jax.tree.map(np.asarray, logs)  # [seeds, logs]
        for side in ("chosen", "rejected"):
            relative = logs[f"policy_{side}_error"] / logs[f"reference_{side}_error"]
            row[f"{side}_error_ratio"] = relative[:, -1]
            row[f"{side}_error_ratio_max"] = relative.max(axis=1)
        row["velocity_norm_ratio"] = logs["velocity_norm_ratio"][:, -1]
        row["implicit_accuracy"] = logs["implicit_accuracy"][:, -1]
        row["win_gain"] = row["win_rate"] - results["base"]["win_rate"]
        row["log"] = logs
        results[method.label] = row
        log(f"{method.label}: win rate {row['win_rate'].mean():.3f} +- {row['win_rate'].std():.3f} "
            f"({time.time() - start:.0f} s)")
    return results


COLUMNS = (("win_rate", "win rate", 3), ("win_gain", "win rate - base row", 3), ("mean_reward", "mean reward", 2),
           ("preferred_share", "modes 0-2 share", 3), ("energy_distance", "energy dist. to base", 3),
           ("chosen_error_ratio", "l_w / l_w,ref", 3), ("chosen_error_ratio_max", "max over training", 3),
           ("rejected_error_ratio", "l_l / l_l,ref", 3), ("velocity_norm_ratio", "norm ratio", 3),
           ("implicit_accuracy", "implicit acc.", 2))


def table(results: dict) -> str:
    lines = ["| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for label, row in results.items():
        cells = [f"{row[key].mean():.{digits}f} +- {row[key].std():.{digits}f}" if key in row else ""
                 for key, _, digits in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trajectory_table(results: dict, settings: Settings, points: int = 5) -> str:
    """The held-out error ratios l_w / l_w,ref and l_l / l_l,ref (seed means) at `points` steps of training."""
    logged = settings.steps // settings.log_every + 1
    indices = np.unique(np.linspace(0, logged - 1, points).round().astype(int))
    lines = ["| method | " + " | ".join(f"step {i * settings.log_every}" for i in indices) + " |",
             "|---|" + "---|" * len(indices)]
    for label, row in results.items():
        if "log" not in row:
            continue
        ratios = [(row["log"][f"policy_{side}_error"] / row["log"][f"reference_{side}_error"]).mean(axis=0)
                  for side in ("chosen", "rejected")]
        lines.append(f"| {label} | " + " | ".join(f"{ratios[0][i]:.2f} / {ratios[1][i]:.2f}" for i in indices) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, help=f"(default {Settings.seeds}, {SMALL.seeds} with --small)")
    parser.add_argument("--steps", type=int, help=f"fine-tuning steps per method (default {Settings.steps}, "
                                                  f"{SMALL.steps} with --small)")
    parser.add_argument("--small", action="store_true", help="the seconds-long test version")
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    settings = SMALL if args.small else Settings()
    overrides = {name: value for name, value in (("seeds", args.seeds), ("steps", args.steps)) if value is not None}
    settings = dataclasses.replace(settings, **overrides)
    results = run(settings=settings, log=lambda line: print(line, file=sys.stderr))
    text = (table(results) + "\n\nl_w / l_w,ref and l_l / l_l,ref over training:\n\n"
            + trajectory_table(results, settings))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
