"""Experiments B and C (reference/training_algorithms.md section 9): does an 8-step DMD2 student match a 50-step
teacher on a 2-D toy, what do backward simulation and TTUR change, and does a committee routed by prompt domain
beat a single teacher when one member really is an expert?

Data: experiment A's 8-mode Gaussian mixture (`toy_dpo_2d`). Models: its MLP (`toy_dpo_2d.init_mlp` /
`velocity`) with a condition vector (the prompt: a one-hot domain), seen by the objective as a velocity with the
DiT's signature (points as `[N, 2, 1, 1]` latents, the condition as a one-token text `[N, 1, domains]`). Every
loss is `ernie_jax.training.objectives`' code: teachers by `flow_matching.flow_matching_loss`; the student and
the fake score by `dmd.generator_loss` and `dmd.critic_loss` (Euler backward simulation on
`dmd.student_grid`, the committee's gate from `dmd.gate_weights`), nothing reimplemented. Sampling: Euler on
`dmd.student_grid(steps, SHIFT)` (the teacher at 50 and 8 steps); the student's 8-step samples are
`dmd.student_sample` at its last step (the sampler's output, as test_dmd checks).

B (one domain, all 8 modes): a teacher trained by flow matching; the student and the critic start from it;
one distillation step = `critic_updates` critic updates (TTUR) then one generator update, each on its own
batch; cfg 1 (the teacher's conditional distribution is the target). Rows: the teacher at 50 steps with other
seeds (the floor), at 8 Euler steps, the DMD2 student at 8 steps (backward simulation, TTUR 5) and its
ablations: noised real data instead of backward simulation, TTUR 1 (same generator updates, a fifth of the
critic updates). Metrics against a teacher-50 sample set: energy distance (dpo_shapes_study's), mode coverage
(modes holding >= 2% of the samples within 3 std of their centre) and the on-mode share (samples within 3 std
of some centre).

C (two domains: modes 0-3 and 4-7; the prompt names one): a generic teacher trained on both domains and an
expert for domain A, both small (`expert_hidden`, `expert_steps`) so that capacity and data per
domain matter; the expert is the generic teacher fine-tuned on domain A alone for as many steps again (the
issue's "fine-tune the teacher on one domain"). First the teachers' 50-step samples against the data, per
domain (is the expert better on A?);
then, from the generic teacher, the single-teacher DMD student and the committee student (domain A prompts to
the expert, B to the generic teacher), same updates, per-domain energy distance to the data and to each
teacher. The floor: two data sample sets.

Every number is the mean +- std (ddof 0) over seeds; each seed has its own teachers, draws and samples.

    python -m experiments.toy_dmd_2d --seeds 5 [--out FILE]

`run(small=True)` is the version a test runs (2 seeds, small sizes, experiment B's main row and 8-step Euler
only).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ernie_jax.training.objectives import dmd, flow_matching
from experiments.dpo_shapes_study import energy_distance
from experiments.toy_dpo_2d import (
    MODE_STD,
    MODES,
    fit,
    init_mlp,
    mode_centres,
    velocity,
)

SHIFT = 1.0  # the sigma grid of every sampler here (the teacher's training sigma is unshifted logit-normal)
ALL_MODES = (tuple(range(MODES)),)
TWO_DOMAINS = ((0, 1, 2, 3), (4, 5, 6, 7))
ON_MODE = 3 * MODE_STD
COVERED = 0.02


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and optimisation of one run of the experiments."""

    seeds: int = 5
    hidden: int = 128
    teacher_steps: int = 2000
    teacher_batch: int = 512
    teacher_learning_rate: float = 2e-3
    teacher_sampling_steps: int = 50
    student_steps: int = 8
    generator_updates: int = 600
    critic_updates: int = 5
    batch: int = 256
    generator_learning_rate: float = 3e-4
    critic_learning_rate: float = 1e-3
    samples: int = 1000
    variants: tuple[str, ...] = ("dmd2", "noised_data", "ttur1")
    experiment_b: bool = True
    experiment_c: bool = True
    expert_hidden: int = 48
    expert_steps: int = 600


SMALL = Settings(seeds=2, hidden=64, teacher_steps=600, teacher_batch=256, generator_updates=150, batch=128,
                 samples=400, variants=("dmd2", "noised_data"), experiment_c=False)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One distillation run: the critic updates per generator update, `student_input` (backward simulation or
    noised data) and the committee's domain routes (teacher names in order; () = single teacher)."""

    name: str
    critic_updates: int
    student_input: str = "backward_simulation"
    domain_routes: tuple[str, ...] = ()


def as_velocity(params) -> flow_matching.VelocityFn:
    """The conditional MLP with the DiT's signature: points as `[N, 2, 1, 1]`, the condition as text `[N, 1, D]`."""
    return lambda x, timestep, text, text_lens: velocity(params, x[:, :, 0, 0], timestep / 1000.0,
                                                         text[:, 0, :])[:, :, None, None]


def prompts(domain: jax.Array, domains: int) -> tuple[jax.Array, jax.Array]:
    """The one-token text `[N, 1, domains]` (one-hot) and lengths `[N]` of `domain [N]`."""
    return jax.nn.one_hot(domain, domains)[:, None, :], jnp.ones(domain.shape, jnp.int32)


def sample_data(key: jax.Array, domain: jax.Array, mode_sets: tuple[tuple[int, ...], ...]) -> jax.Array:
    """`[N, 2]` points of the mixture restricted to each example's domain's modes (uniform over them)."""
    mode_key, noise_key = jax.random.split(key)
    table = jnp.asarray(mode_sets)
    modes = table[domain, jax.random.randint(mode_key, domain.shape, 0, table.shape[1])]
    return mode_centres()[modes] + MODE_STD * jax.random.normal(noise_key, (domain.shape[0], 2))


def train_teacher(key: jax.Array, mode_sets, trained_domains: tuple[int, ...], hidden: int, steps: int,
                  settings: Settings, start=None):
    """A conditional flow-matching MLP (one-hot domain of `len(mode_sets)`) trained on `trained_domains` only,
    from `start` (a fine-tuning) or from a fresh `hidden`-wide initialisation."""
    init_key, loop_key = jax.random.split(key)
    params = init_mlp(init_key, hidden, condition_dim=len(mode_sets)) if start is None else start
    optimizer = optax.adam(optax.cosine_decay_schedule(settings.teacher_learning_rate, steps, 0.05))
    count = settings.teacher_batch

    def loss(params, key):
        domain_key, data_key, noise_key = jax.random.split(key, 3)
        domain = jnp.asarray(trained_domains)[jax.random.randint(domain_key, (count,), 0, len(trained_domains))]
        x0 = sample_data(data_key, domain, mode_sets)[:, :, None, None]
        draw = flow_matching.draw_noise(jax.random.split(noise_key, count), x0.shape, flow_matching.FlowMatchingConfig())
        return flow_matching.flow_matching_loss(as_velocity(params), x0, *prompts(domain, len(mode_sets)), draw)[0]

    return fit(loss, params, optimizer, jax.random.split(loop_key, steps))


def euler_samples(params, key: jax.Array, domain: jax.Array, domains: int, steps: int) -> jax.Array:
    """`[N, 2]`: Euler on `dmd.student_grid(steps, SHIFT)` from noise, with the prompts of `domain [N]`."""
    grid = jnp.asarray(dmd.student_grid(steps, SHIFT))
    text, lens = prompts(domain, domains)
    model = as_velocity(params)

    def step(x, index):
        sigma = jnp.full(domain.shape, grid[index])
        return x + (grid[index + 1] - grid[index]) * model(x, sigma * 1000.0, text, lens), None

    x, _ = jax.lax.scan(step, jax.random.normal(key, (domain.shape[0], 2, 1, 1)), jnp.arange(steps))
    return x[:, :, 0, 0]


def student_samples(params, key: jax.Array, domain: jax.Array, domains: int, steps: int) -> jax.Array:
    """`[N, 2]`: the student's sample at inference (its x0-prediction at its last step, `dmd.student_sample`)."""
    text, lens = prompts(domain, domains)
    x = dmd.student_sample(as_velocity(params), text, lens, jax.random.normal(key, (domain.shape[0], 2, 1, 1)),
                           jnp.full(domain.shape, steps - 1), dmd.student_grid(steps, SHIFT))
    return x[:, :, 0, 0]


def distill(key: jax.Array, teachers: dict, mode_sets, variant: Variant, settings: Settings):
    """The student after `generator_updates` DMD steps from the first teacher (student and critic both start
    there); each step is `variant.critic_updates` critic updates then one generator update, each on a fresh
    batch of prompts (uniform domains)."""
    names = tuple(teachers)
    config = dmd.Config(teachers=names, student_steps=settings.student_steps, student_shift=SHIFT,
                        student_input=variant.student_input, guidance_scale=1.0, domain_routes=variant.domain_routes)
    grid = dmd.student_grid(settings.student_steps, SHIFT)
    domains, count = len(mode_sets), settings.batch
    start = teachers[names[0]]
    generator_optimizer = optax.adam(settings.generator_learning_rate)
    critic_optimizer = optax.adam(settings.critic_learning_rate)
    models = {name: as_velocity(params) for name, params in teachers.items()}
    noised_data = variant.student_input == "noised_data"

    def batch(key):
        """Prompts, each example's start noise and student step, and (for noised data) real points."""
        domain_key, noise_key, step_key, data_key = jax.random.split(key, 4)
        domain = jax.random.randint(domain_key, (count,), 0, domains)
        noise = jax.random.normal(noise_key, (count, 2, 1, 1))
        steps = jax.random.randint(step_key, (count,), 0, settings.student_steps)
        latents = sample_data(data_key, domain, mode_sets)[:, :, None, None] if noised_data else None
        return domain, *prompts(domain, domains), noise, steps, latents

    def critic_loss(critic, student, key):
        batch_key, draw_key = jax.random.split(key)
        _, text, lens, noise, steps, latents = batch(batch_key)
        draw = flow_matching.draw_noise(jax.random.split(draw_key, count), noise.shape, config.critic)
        return dmd.critic_loss(as_velocity(critic), as_velocity(student), text, lens, noise, steps, draw, grid=grid,
                               latents=latents)[0]

    def generator_loss(student, critic, key):
        batch_key, noise_key, sigma_key = jax.random.split(key, 3)
        domain, text, lens, noise, steps, latents = batch(batch_key)
        dm_noise = jax.random.normal(noise_key, noise.shape)
        dm_sigmas = config.dm_sigmas.sample(sigma_key, count)
        draw = dmd.GeneratorDraw(noise, steps, dm_noise, dm_sigmas, dm_noise, dm_sigmas)
        gate = dmd.gate_weights(config, dm_sigmas, domain, "dm")
        rollout = as_velocity(jax.lax.stop_gradient(student))
        return dmd.generator_loss(as_velocity(student), as_velocity(critic), models, text, lens, draw, gate, gate,
                                  grid=grid, guidance_scale=1.0, empty_prompt=None, rollout=rollout,
                                  latents=latents)[0]

    def critic_step(carry, key):
        student, critic, critic_state = carry
        updates, critic_state = critic_optimizer.update(jax.grad(critic_loss)(critic, student, key), critic_state)
        return (student, optax.apply_updates(critic, updates), critic_state), None

    def step(carry, key):
        student, critic, student_state, critic_state = carry
        critic_keys, generator_key = jax.random.split(key)
        (_, critic, critic_state), _ = jax.lax.scan(critic_step, (student, critic, critic_state),
                                                    jax.random.split(critic_keys, variant.critic_updates))
        updates, student_state = generator_optimizer.update(jax.grad(generator_loss)(student, critic, generator_key),
                                                            student_state)
        return (optax.apply_updates(student, updates), critic, student_state, critic_state), None

    carry = (start, start, generator_optimizer.init(start), critic_optimizer.init(start))
    (student, *_), _ = jax.lax.scan(step, carry, jax.random.split(key, settings.generator_updates))
    return student


def point_metrics(x: np.ndarray) -> dict[str, float]:
    """Mode coverage (share of the 8 modes holding >= COVERED of the samples within ON_MODE of their centre)
    and the on-mode share."""
    distances = np.linalg.norm(x[:, None, :] - np.asarray(mode_centres())[None], axis=-1)
    near = distances < ON_MODE
    return {"mode_coverage": float(np.mean(near.mean(0) >= COVERED)), "on_mode": float(near.any(1).mean())}


def summarise(samples: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """Per seed: energy distance of `samples [seeds, N, 2]` to `reference [seeds, N, 2]`, and point metrics."""
    rows = [dict(energy_distance=energy_distance(x, y), **point_metrics(x)) for x, y in zip(samples, reference)]
    return {key: np.array([row[key] for row in rows]) for key in rows[0]}


def experiment_b(seed_keys: jax.Array, settings: Settings, log) -> dict:
    start = time.time()
    keys = jax.vmap(lambda key: jax.random.split(key, 6))(seed_keys)
    teacher_keys, reference_keys, floor_keys, sample_keys, distill_keys = (keys[:, i] for i in range(5))
    one = jnp.zeros(settings.samples, jnp.int32)

    @jax.jit
    @jax.vmap
    def prepare(teacher_key, reference_key, floor_key, sample_key):
        teacher = train_teacher(teacher_key, ALL_MODES, (0,), settings.hidden, settings.teacher_steps, settings)
        steps = settings.teacher_sampling_steps
        return (teacher, euler_samples(teacher, reference_key, one, 1, steps),
                euler_samples(teacher, floor_key, one, 1, steps),
                euler_samples(teacher, sample_key, one, 1, settings.student_steps))

    teacher, reference, floor, euler8 = prepare(teacher_keys, reference_keys, floor_keys, sample_keys)
    reference = np.asarray(reference)
    log(f"B: teachers and their samples: {time.time() - start:.0f} s")
    results = {f"teacher, {settings.teacher_sampling_steps} steps (other seeds: the floor)":
               summarise(np.asarray(floor), reference),
               f"teacher, {settings.student_steps} Euler steps": summarise(np.asarray(euler8), reference)}
    ttur = settings.critic_updates
    variants = {"dmd2": Variant(f"DMD2 student, {settings.student_steps} steps (backward simulation, TTUR {ttur})",
                                critic_updates=ttur),
                "noised_data": Variant("student, noised real data instead of backward simulation",
                                       critic_updates=ttur, student_input="noised_data"),
                "ttur1": Variant("student, TTUR 1 (one critic update per generator update)", critic_updates=1)}
    for name in settings.variants:
        variant = variants[name]

        @jax.jit
        @jax.vmap
        def train_and_sample(teacher, distill_key, sample_key, variant=variant):
            student = distill(distill_key, {"teacher": teacher}, ALL_MODES, variant, settings)
            return student_samples(student, sample_key, one, 1, settings.student_steps)

        results[variant.name] = summarise(np.asarray(train_and_sample(teacher, distill_keys, sample_keys)), reference)
        log(f"B: {variant.name}: energy distance {results[variant.name]['energy_distance'].mean():.4f} "
            f"({time.time() - start:.0f} s)")
    return results


def experiment_c(seed_keys: jax.Array, settings: Settings, log) -> dict:
    """`{row: {metric per domain: [per seed]}}`."""
    start = time.time()
    keys = jax.vmap(lambda key: jax.random.split(key, 7))(jax.vmap(lambda k: jax.random.fold_in(k, 3))(seed_keys))
    generic_keys, expert_keys, data_keys, floor_keys, sample_keys, distill_keys = (keys[:, i] for i in range(6))
    half = settings.samples
    domain_rows = {name: jnp.full(half, index, jnp.int32) for index, name in enumerate("AB")}
    small = dataclasses.replace(settings, hidden=settings.expert_hidden)

    @jax.jit
    @jax.vmap
    def prepare(generic_key, expert_key, data_key, floor_key):
        generic = train_teacher(generic_key, TWO_DOMAINS, (0, 1), small.hidden, settings.expert_steps, settings)
        # The expert: the generic teacher fine-tuned on domain A alone, as many steps again.
        expert = train_teacher(expert_key, TWO_DOMAINS, (0,), small.hidden, settings.expert_steps, settings,
                               start=generic)
        data = {name: sample_data(jax.random.fold_in(data_key, i), d, TWO_DOMAINS)
                for i, (name, d) in enumerate(domain_rows.items())}
        floor = {name: sample_data(jax.random.fold_in(floor_key, i), d, TWO_DOMAINS)
                 for i, (name, d) in enumerate(domain_rows.items())}
        return generic, expert, data, floor

    generic, expert, data, floor = prepare(generic_keys, expert_keys, data_keys, floor_keys)
    data = {name: np.asarray(x) for name, x in data.items()}
    log(f"C: teachers: {time.time() - start:.0f} s")

    def per_domain(params, sampler) -> dict:
        """`{"METRIC A": [per seed], "METRIC B": ...}` of `sampler(params, key, domain) -> [N, 2]`."""
        row = {}
        for name, domain in domain_rows.items():
            samples = jax.jit(jax.vmap(lambda p, k, domain=domain: sampler(p, k, domain)))(params, sample_keys)
            for metric, values in summarise(np.asarray(samples), data[name]).items():
                row[f"{metric} {name}"] = values
        return row

    teacher_50 = lambda p, k, d: euler_samples(p, k, d, 2, settings.teacher_sampling_steps)
    student_8 = lambda p, k, d: student_samples(p, k, d, 2, settings.student_steps)
    results = {"data (other draw: the floor)": {
        f"{metric} {name}": values for name in "AB"
        for metric, values in summarise(np.asarray(floor[name]), data[name]).items()}}
    results[f"generic teacher, {settings.teacher_sampling_steps} steps"] = per_domain(generic, teacher_50)
    results[f"expert A, {settings.teacher_sampling_steps} steps"] = per_domain(expert, teacher_50)
    for label, teachers, routes in (("single-teacher DMD (generic), 8 steps", ("generic",), ()),
                                    ("committee DMD (A -> expert, B -> generic), 8 steps", ("generic", "expert"),
                                     ("expert", "generic"))):
        variant = Variant(label, critic_updates=settings.critic_updates, domain_routes=routes)

        @jax.jit
        @jax.vmap
        def train(generic, expert, key, teachers=teachers, variant=variant):
            members = {"generic": generic, "expert": expert}
            return distill(key, {name: members[name] for name in teachers}, TWO_DOMAINS, variant, settings)

        results[label] = per_domain(train(generic, expert, distill_keys), student_8)
        log(f"C: {label}: {time.time() - start:.0f} s")
    # The two students share each seed's teachers, draws and sample noise: their per-seed difference is far less
    # noisy than either's spread over seeds.
    single, committee = (results[label] for label in list(results)[-2:])
    results["committee - single-teacher, paired per seed"] = {k: committee[k] - single[k] for k in single}
    return results


def run(seeds: int | None = None, small: bool = False, settings: Settings | None = None, log=print) -> dict:
    """`{"B": {row: {metric: [per seed]}}, "C": ...}`; with `small`, SMALL's sizes."""
    settings = settings or (SMALL if small else Settings())
    if seeds is not None:
        settings = dataclasses.replace(settings, seeds=seeds)
    seed_keys = jax.random.split(jax.random.key(0), settings.seeds)
    results = {"B": experiment_b(seed_keys, settings, log)} if settings.experiment_b else {}
    if settings.experiment_c:
        results["C"] = experiment_c(seed_keys, settings, log)
    return results


def table(rows: dict) -> str:
    columns = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[c].mean():.4f} +- {row[c].std():.4f}" for c in columns)
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, help=f"(default {Settings.seeds}, {SMALL.seeds} with --small)")
    parser.add_argument("--small", action="store_true", help="the test's version")
    parser.add_argument("--only", choices=("B", "C"), help="run one experiment only")
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    settings = SMALL if args.small else Settings()
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=args.seeds)
    if args.only:
        settings = dataclasses.replace(settings, experiment_b=args.only == "B", experiment_c=args.only == "C")
    started = time.time()
    results = run(settings=settings, log=lambda line: print(line, file=sys.stderr))
    text = ""
    if "B" in results:
        text += "Experiment B (distances to the teacher's 50-step samples):\n\n" + table(results["B"])
    if "C" in results:
        text += ("\n\n" if text else "") + "Experiment C (distances to the data of each domain):\n\n" + table(results["C"])
    text += f"\n\n({time.time() - started:.0f} s, {settings})\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
