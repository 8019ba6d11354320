"""Distribution-matching distillation (DMD2) of a flow model into a few-step student, with the real score from
a routed committee of frozen teachers (ERNIE-Image's MT-DMD).

Conventions are flow_matching.py's: sigma in [0, 1] is the noise level, `x_sigma = (1 - sigma) x0 + sigma eps`,
the network sees `timestep = 1000 sigma` and predicts the velocity `v* = eps - x0`, so a velocity gives the
x0-prediction `x0 = x_sigma - sigma v` (`x0_from_velocity`).

Three kinds of model (the trainer's parts and frozen models, by name):

- the student, part `transformer` (the DiT the run exports; trained, initialised from the teacher; its update
  is named "generator"): K steps (`student_steps`, default 8) at
  cfg 1 on the sigma grid `ernie_jax.sampling.flow_match_sigmas(K, student_shift)` (the grid the pipeline and
  `ernie_jax.sampling.sample` use at K steps), whose x0-prediction at step k is its sample `x`;
- the fake score `critic` (trained; initialised from the teacher): flow matching on the student's samples
  (`flow_matching.flow_matching_loss` on `stop_gradient(x)`), so it tracks the student's distribution;
- the frozen `teachers` (`Config.teachers`, default one named "teacher"): the real score. Each example's x0
  comes from the committee `x0_real = sum_k w_k E_k` with gate weights `w [B, K]` (see "The gate").

**Backward simulation** (DMD2; `student_input="backward_simulation"`). Example b draws `k_b` uniformly in
0..K-1 and the student runs from pure noise (sigma_0 = 1) through its first k_b steps without gradient, then
once with gradient at sigma_{k_b}; `x` is that step's x0-prediction. The k_b steps are **plain Euler steps**
`x <- x + (sigma_{i+1} - sigma_i) v`, exactly what `ernie_jax.sampling` (and diffusers' Euler scheduler) does at
inference, so the inputs the student trains on are distributed as the ones it sees when it samples. (DMD2
re-noises the x0-prediction with fresh noise instead; for a flow student the Euler step is the same
re-noising with the student's own noise estimate `x + (1 - sigma) v`, and that is what the sampler does.)
Shapes are static: the rollout is a `lax.scan` of K - 1 student forwards for every example, each kept only
where `i < k_b` (a masked step), so a generator or critic update costs K - 1 gradient-free student forwards
plus one (with gradient for the generator), about twice the (K - 1) / 2 a data-dependent loop would average.
The gradient-free forwards use a copy of the student's parameters under `stop_gradient`, so no residuals
of the rollout are kept. `student_input="noised_data"` instead noises the batch's `latents` to sigma_{k_b}
(FastGen's option; it needs `latents`).

**The generator loss** (DMD2, Decoupled DMD). From `x` a term noises `stop_gradient(x)` to its own sigma
(`x_t`), and:

- `DM = x0_fake - x0_cond` (the critic's x0 at cfg 1 minus the committee's conditional x0);
- `CA = -(g - 1)(x0_cond - x0_uncond) = -(cfg(x0_uncond, x0_cond, g) - x0_cond)`, with the reference
  pipeline's guidance `cfg(u, c, g) = u + g (c - u)` (`ernie_jax.sampling.cfg_combine`; in x0 space it is the
  same formula as in velocity space, x0 being affine in v). `x0_uncond` is the teacher on the empty prompt.

`DM + CA = x0_fake - cfg(x0_uncond, x0_cond, g)`: the DMD2 direction with a CFG teacher. Then:

- `decoupled=False` (DMD2): one sigma and one noise for both terms (the DM draw), and
  `grad = (dm_weight DM + ca_weight CA) / (mean|x - x0_real| + eps)` per sample, with
  `x0_real = x0_cond(DM gate) + (g - 1)(x0_cond - x0_uncond)(CA gate)`, i.e. `cfg(u, c, g)` with one teacher:
  exactly DMD2's `(x0_fake - x0_real) / mean|x - x0_real|` at dm_weight = ca_weight = 1.
- `decoupled=True` (Decoupled DMD): DM at `dm_sigmas` and CA at `ca_sigmas`, each its own noise, each
  normalised by the mean absolute error of its own target: `grad = dm_weight DM / (mean|x - x0_cond| + eps)
  + ca_weight CA / (mean|x - cfg(x0_uncond, x0_cond, g)| + eps)` (DMD2's normaliser is the distance from x to
  the x0 the term pulls towards; each term keeps its own so neither's scale depends on the other's sigma).

The DMD term is `0.5 mean((x - stop_gradient(x - grad))^2)` over every element, whose gradient in x is
`grad / (B C H W)`: the optimizer sees the DMD direction, the loss value only the size of `grad`. The generator
loss is the DMD term, plus `gan_weight mean(softplus(-D))` with the GAN head, plus
`regression_weight mean((x_ode - ode_target)^2)` with the regression term (both below).

**The gate** (MT-DMD). `gate_table(config)` is a static table `[bins, domains + 1, 2, K]` of teacher weights
(objective 0 = DM, 1 = CA), each row the normalised product of three factors, each a row of weights over
the teachers ("route": a teacher name = one-hot, or a mapping name -> weight; an unset factor = all ones):
`sigma_routes[bin]` for the bins of `sigma_edges` (ascending interior edges; the term's own sigma picks the
bin), `domain_routes[c]` for the batch's int `category` c per example (the data's category ids, in the order of
the runner context's `category_names`; ids outside 0..len-1 use the all-ones
row), and `objective_routes["dm" / "ca"]`. A row whose product is all zero is a config error. One teacher
(or K identical teachers under any gate) is single-teacher DMD2.

What is and is not skipped: every teacher's forward (conditional, and unconditional when CA is on) runs under
`lax.cond` on "some example of this (micro)batch has a non-zero weight for it for a term that needs this
forward", so a teacher nobody is routed to costs nothing. A routed teacher runs on the whole (micro)batch
(static shapes), its output weighted 0 for the examples not routed to it: with hard sigma gates and
per-example sigma, a batch of mixed noise levels still runs every teacher whose bin some example is in.
`sigma_bin_per_batch=True` draws each term's bin once per (micro)batch (from its first example's key, with the
bin's probability under the term's sigma distribution) and every example's sigma inside that bin (inverse
CDF), so a hard sigma gate runs exactly one teacher per term per (micro)batch; the marginal sigma
distribution is unchanged, but the draw then depends on the microbatching.

**The critic update** (TTUR): the student samples `x` drawn as above (no gradient anywhere), and
`flow_matching_loss(critic, x, ...)` with `Config.critic`'s sigma draw, weighting and text dropout.

**The GAN head** (DMD2's `diffusion_gan`; `gan_weight > 0`, needs `latents`): a classifier
(`models.gan_head.GANHead`, the trainable part "discriminator") on the critic's last-block image-token features
(`ErnieImageTransformer.velocity_and_features`) at a noisy input. Generator: `+ gan_weight mean(softplus(-D))` on
the DM term's x_t, which then carries x's gradient through the (frozen) critic's features (the same critic
forward gives x0_fake). Critic update (trains critic and head): `+ gan_discriminator_weight mean(softplus(D(fake))
+ softplus(-D(real)))`, fake = the samples, real = the batch's `latents`, each noised to its own sigma from
`gan_sigmas` (two more critic forwards per critic update).

**The regression term** (DMD v1's regression loss, for ablation; `regression_weight > 0`): the batch keys
`ode_noise` and `ode_target` `[B, C, H, W]` hold a noise and the frozen teacher's deterministic ODE output from
it (its Euler sampler at N steps with its CFG: `data/ode_pairs.py`, made by the runner's `ode_pairs` stage).
The student runs from `ode_noise` as backward simulation runs from its own start noise, to the same step k_b
as the DMD term (K - 1 more gradient-free forwards and one with gradient, whatever `student_input`: the
target is a function of that noise, not of data), and its x0-prediction there, `x_ode`, is regressed onto
`ode_target`: `regression_weight mean((x_ode - ode_target)^2)`. The step-k x0-prediction rather than the
K-step sample: the student's x0-prediction at any step of its own trajectory from the noise is its estimate of
where that trajectory ends, so each should approach the ODE output from the same noise; at k = K - 1 it *is*
the K-step sample (the sampler's output), so the full rollout is the case k_b = K - 1 of this, and drawing
k_b trains every step's prediction at the cost of one more DMD-term sample (a full rollout with gradient
through its last step only would cost as much and train one step in K). Latent MSE rather than DMD v1's
LPIPS on decoded pixels: LPIPS needs a pretrained VGG/AlexNet, which the project neither has nor can load
here, and a VAE decode of every regressed sample whose full-resolution activations the generator update would
keep for the backward pass; the latents are normalised per channel, so their squared error weighs channels
alike; and the term only anchors the student to the teacher's noise-to-image map beside the DMD term, which
keeps the samples sharp (LPIPS's tolerance of small misalignments mattered for DMD v1's one-step generator,
whose regression could not fit the map exactly).

One training step is `critic_updates` (default 5) critic updates then one generator update (`updates`), each
on its own slice of the batch (the trainer's `objectives.Update`).

Metrics (float32 scalars, batch means; the trainer prefixes them `critic/` and `generator/`): generator:
`loss`, `dmd_loss` (the DMD term alone), `dm_norm` and `ca_norm` (per-sample RMS of the DM and CA directions,
before normalisation), `direction_rms` (RMS of the normalised direction; the trainer's own `grad_norm` is the
parameters' gradient), `gate/dm/NAME` and `gate/ca/NAME` (the mean gate weight of each teacher: its share of
the term's supervision), `sample_mean`, `sample_std`, `sample_abs_mean` (of the student samples x: mean drift
and oversaturation), `gan_generator` (with the head), `regression` (the unweighted mean squared error, with the
regression term);
critic: `loss`, `mse` and the same sample statistics, with the head also `flow_matching`, `gan_discriminator`,
`discriminator_accuracy`.

Not here: DMD v1's LPIPS distance for the regression term (latent MSE instead; see the regression term).

Shapes: B batch, C latent channels, H/W latent height/width, T padded text length, D text width, K teachers.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.scipy.special import ndtr, ndtri

from ernie_jax import sampling
from ernie_jax.models.gan_head import GANHead
from ernie_jax.training import objectives
from ernie_jax.training.objectives.flow_matching import (
    EmptyPrompt,
    FlowMatchingConfig,
    NoiseDraw,
    SigmaSampling,
    VelocityFn,
    draw_noise,
    drop_text,
    flow_matching_loss,
)

STUDENT_INPUTS = ("backward_simulation", "noised_data")
TERMS = ("dm", "ca")
# The batch keys of the regression term: a noise and the teacher's ODE output from it, each [B, C, H, W].
ODE_KEYS = ("ode_noise", "ode_target")
# The student is the run's "transformer" (the DiT the runner exports); the critic another copy of the DiT.
GENERATOR, CRITIC, DISCRIMINATOR = "transformer", "critic", "discriminator"


def x0_from_velocity(x_sigma: jax.Array, sigmas: jax.Array, velocity: jax.Array) -> jax.Array:
    """`x_sigma - sigma v` in float32: `x_sigma`, `velocity` `[B, C, H, W]`, `sigmas [B]`."""
    sigma = sigmas.astype(jnp.float32).reshape((-1,) + (1,) * (x_sigma.ndim - 1))
    return x_sigma.astype(jnp.float32) - sigma * velocity.astype(jnp.float32)


def noised(x0: jax.Array, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
    """`(1 - sigma) x0 + sigma eps` `[B, C, H, W]` for `sigmas [B]`."""
    sigma = sigmas.astype(jnp.float32).reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1 - sigma) * x0.astype(jnp.float32) + sigma * noise.astype(jnp.float32)


def student_grid(steps: int, shift: float) -> np.ndarray:
    """The student's sigmas `[steps + 1]` (ending in 0): the inference sampler's grid at `steps` steps."""
    return sampling.flow_match_sigmas(steps, shift)


def student_sample(student: VelocityFn, text: jax.Array, text_lens: jax.Array, noise: jax.Array, steps: jax.Array,
                   grid: jax.Array, *, rollout: VelocityFn | None = None, latents: jax.Array | None = None
                   ) -> jax.Array:
    """The student's x0-prediction `[B, C, H, W]` (float32) at step `steps[b]` of its `grid` (`[K + 1]`).

    Backward simulation (`latents` None): from `noise` (at grid[0] = 1), `steps[b]` Euler steps of `rollout`
    (a gradient-free copy of the student; by default `student` with its output stopped), as a masked scan of
    K - 1 steps; with `latents`, `noise` and `latents` mixed at sigma_{steps[b]} instead. Then one `student`
    forward at sigma_{steps[b]}, through which the gradient flows.
    """
    grid = jnp.asarray(grid, jnp.float32)
    count = noise.shape[0]
    sigmas = grid[steps]
    if latents is not None:
        x = noised(latents, noise, sigmas)
    else:
        rollout = rollout or (lambda *args: jax.lax.stop_gradient(student(*args)))

        def step(x, index):
            velocity = rollout(x, jnp.full((count,), grid[index] * 1000.0), text, text_lens).astype(jnp.float32)
            moved = x + (grid[index + 1] - grid[index]) * velocity
            return jnp.where((index < steps)[:, None, None, None], moved, x), None

        x, _ = jax.lax.scan(step, noise.astype(jnp.float32), jnp.arange(grid.shape[0] - 2))
        x = jax.lax.stop_gradient(x)
    return x0_from_velocity(x, sigmas, student(x, sigmas * 1000.0, text, text_lens))


def committee_x0(teachers: Sequence[VelocityFn], weights: Sequence[jax.Array], x_t: jax.Array, sigmas: jax.Array,
                 text: jax.Array, text_lens: jax.Array) -> list[jax.Array]:
    """For each gate `weights[j] [B, K]`: `sum_k w_jk E_k(x_t)` as x0 `[B, C, H, W]` float32 under stop_gradient.

    Teacher k runs once for all the gates, under `lax.cond`: only when some example has a non-zero weight for it
    in one of them (otherwise its forward is not executed and it contributes 0).
    """
    totals = [jnp.zeros(x_t.shape, jnp.float32) for _ in weights]
    for index, teacher in enumerate(teachers):
        routed = jnp.any(jnp.stack([w[:, index] > 0 for w in weights]))
        prediction = jax.lax.cond(
            routed, lambda teacher=teacher: x0_from_velocity(x_t, sigmas, teacher(x_t, sigmas * 1000.0, text,
                                                                                  text_lens)),
            lambda: jnp.zeros(x_t.shape, jnp.float32))
        prediction = jax.lax.stop_gradient(prediction)
        totals = [total + w[:, index, None, None, None] * prediction for total, w in zip(totals, weights, strict=True)]
    return totals


class GeneratorDraw(NamedTuple):
    """The random part of one batch's generator loss: the student's start `noise [B, C, H, W]` and step
    `steps [B]` (int, 0..K-1); each term's `*_noise [B, C, H, W]` and `*_sigmas [B]` (the CA ones unused when
    not decoupled)."""

    noise: jax.Array
    steps: jax.Array
    dm_noise: jax.Array
    dm_sigmas: jax.Array
    ca_noise: jax.Array
    ca_sigmas: jax.Array


def per_sample_mean(values: jax.Array) -> jax.Array:
    return jnp.mean(values, axis=tuple(range(1, values.ndim)))


def rms(values: jax.Array) -> jax.Array:
    """Batch mean of each sample's root mean square."""
    return jnp.mean(jnp.sqrt(per_sample_mean(jnp.square(values))))


def sample_statistics(x: jax.Array) -> objectives.Metrics:
    return {"sample_mean": jnp.mean(x), "sample_std": jnp.std(x), "sample_abs_mean": jnp.mean(jnp.abs(x))}


def generator_loss(student: VelocityFn, critic: VelocityFn, teachers: Mapping[str, VelocityFn], text: jax.Array,
                   text_lens: jax.Array, draw: GeneratorDraw, dm_gate: jax.Array, ca_gate: jax.Array, *,
                   grid: jax.Array, guidance_scale: float, empty_prompt: EmptyPrompt | None, decoupled: bool = False,
                   dm_weight: float = 1.0, ca_weight: float = 1.0, eps: float = 1e-6,
                   rollout: VelocityFn | None = None, latents: jax.Array | None = None,
                   gan: GAN | None = None, regression: Regression | None = None
                   ) -> tuple[jax.Array, objectives.Metrics]:
    """The generator's DMD loss and metrics (the module docstring gives the math).

    `teachers`: name -> velocity, in the order of the gates' columns; `dm_gate`, `ca_gate` `[B, K]` (rows
    summing to 1) weight them for each term. `grid`: the student's sigmas `[K_steps + 1]`; `rollout`, `latents`:
    as `student_sample`. `empty_prompt` is needed when the CA term is on (ca_weight != 0 and g != 1). With
    `gan`, the critic runs as `gan.critic_features` on the DM term's x_t noised from x *with* its gradient, and
    `gan.weight softplus(-D(features))` joins the loss (D = `gan.head`; x0_fake is that forward's, stopped).
    With `regression`, `regression.weight mean((x_ode - regression.target)^2)` joins it, `x_ode` the student's
    x0-prediction at step `draw.steps` of backward simulation from `regression.noise`.
    """
    x = student_sample(student, text, text_lens, draw.noise, draw.steps, grid, rollout=rollout, latents=latents)
    sample = jax.lax.stop_gradient(x)
    models = list(teachers.values())
    guided = ca_weight != 0 and guidance_scale != 1
    if guided:
        if empty_prompt is None:
            raise ValueError("the CA term (ca_weight != 0 and guidance_scale != 1) needs the empty prompt's features")
        empty_text, empty_lens = drop_text(text, text_lens, jnp.ones(text_lens.shape, bool), empty_prompt)
    no_gate = jnp.zeros_like(ca_gate)

    def guidance(x_t, sigmas):
        """(CA direction, cfg(x0_uncond, x0_cond, g), x0_cond under the DM gate) at x_t."""
        x0_cond_dm, x0_cond_ca = committee_x0(models, [dm_gate if not decoupled else no_gate, ca_gate], x_t,
                                              sigmas, text, text_lens)
        (x0_uncond_ca,) = committee_x0(models, [ca_gate], x_t, sigmas, empty_text, empty_lens)
        x0_cfg = sampling.cfg_combine(x0_uncond_ca, x0_cond_ca, guidance_scale)
        return -(x0_cfg - x0_cond_ca), x0_cfg, x0_cond_dm

    x_dm = noised(sample, draw.dm_noise, draw.dm_sigmas)
    if gan is None:
        fake_velocity = critic(x_dm, draw.dm_sigmas * 1000.0, text, text_lens)
    else:
        # The same input values as x_dm, but carrying x's gradient into the critic's features.
        fake_velocity, features = gan.critic_features(noised(x, draw.dm_noise, draw.dm_sigmas),
                                                      draw.dm_sigmas * 1000.0, text, text_lens)
        gan_generator = jnp.mean(jax.nn.softplus(-gan.head(features)))
    x0_fake = jax.lax.stop_gradient(x0_from_velocity(x_dm, draw.dm_sigmas, fake_velocity))
    if not decoupled:
        if guided:
            ca, _, x0_cond = guidance(x_dm, draw.dm_sigmas)
        else:
            (x0_cond,), ca = committee_x0(models, [dm_gate], x_dm, draw.dm_sigmas, text, text_lens), None
        dm = x0_fake - x0_cond
        x0_real = x0_cond if ca is None else x0_cond - ca
        direction = dm_weight * dm + (0.0 if ca is None else ca_weight * ca)
        normalised = direction / (per_sample_mean(jnp.abs(sample - x0_real)) + eps)[:, None, None, None]
    else:
        (x0_cond,) = committee_x0(models, [dm_gate], x_dm, draw.dm_sigmas, text, text_lens)
        dm = x0_fake - x0_cond
        normalised = dm_weight * dm / (per_sample_mean(jnp.abs(sample - x0_cond)) + eps)[:, None, None, None]
        ca = None
        if guided:
            x_ca = noised(sample, draw.ca_noise, draw.ca_sigmas)
            ca, x0_cfg, _ = guidance(x_ca, draw.ca_sigmas)
            normalised = normalised + ca_weight * ca / (per_sample_mean(jnp.abs(sample - x0_cfg)) + eps)[
                :, None, None, None]
    loss = 0.5 * jnp.mean(jnp.square(x - jax.lax.stop_gradient(x - normalised)))
    metrics = {"dmd_loss": loss, "dm_norm": rms(dm), "ca_norm": jnp.float32(0.0) if ca is None else rms(ca),
               "direction_rms": rms(normalised), **sample_statistics(sample)}
    if gan is not None:
        loss = loss + gan.weight * gan_generator
        metrics["gan_generator"] = gan_generator
    if regression is not None:
        if regression.noise.shape != regression.target.shape or regression.noise.ndim != 4:
            raise ValueError(f"the regression term's ode_noise {regression.noise.shape} and ode_target "
                             f"{regression.target.shape} must be one shape [B, C, H, W]")
        x_ode = student_sample(student, text, text_lens, regression.noise, draw.steps, grid, rollout=rollout)
        regression_loss = jnp.mean(jnp.square(x_ode - regression.target.astype(jnp.float32)))
        loss = loss + regression.weight * regression_loss
        metrics["regression"] = regression_loss
    metrics["loss"] = loss
    for index, name in enumerate(teachers):
        metrics[f"gate/dm/{name}"] = jnp.mean(dm_gate[:, index])
        metrics[f"gate/ca/{name}"] = jnp.mean(ca_gate[:, index]) if guided else jnp.float32(0.0)
    return loss, metrics


class GAN(NamedTuple):
    """The diffusion-GAN head's part of a loss: `critic_features` (x, timestep, text, text_lens) -> (velocity,
    image-token features `[B, N, D]`) (the critic's `velocity_and_features`), `head` features -> logits `[B]`
    (`models.gan_head.GANHead`) and the term's `weight`."""

    critic_features: Callable
    head: Callable
    weight: float


class Regression(NamedTuple):
    """The regression term's inputs: the pairs' `noise` and the teacher's ODE outputs from it, `target`
    (`[B, C, H, W]` each), and the term's `weight`."""

    noise: jax.Array
    target: jax.Array
    weight: float


class DiscriminatorDraw(NamedTuple):
    """The discriminator's inputs: the student samples' `fake_noise`, `fake_sigmas` and the data's `real_noise`,
    `real_sigmas` (`[B, C, H, W]`, `[B]`)."""

    fake_noise: jax.Array
    fake_sigmas: jax.Array
    real_noise: jax.Array
    real_sigmas: jax.Array


def critic_loss(critic: VelocityFn, student: VelocityFn, text: jax.Array, text_lens: jax.Array, noise: jax.Array,
                steps: jax.Array, draw: NoiseDraw, *, grid: jax.Array, weighting: str = "none",
                empty_prompt: EmptyPrompt | None = None, latents: jax.Array | None = None,
                gan: GAN | None = None, real: jax.Array | None = None,
                discriminator_draw: DiscriminatorDraw | None = None) -> tuple[jax.Array, objectives.Metrics]:
    """The critic's flow-matching loss on the student's samples (drawn from `noise`, `steps` as
    `student_sample`, without gradient), with `draw`'s noise, sigmas and text dropout.

    With `gan`: plus `gan.weight mean(softplus(D(fake)) + softplus(-D(real)))`, D the head on the critic's
    features of the samples and of the data `real [B, C, H, W]`, each noised by `discriminator_draw` (two more
    critic forwards, differentiated for both the critic and the head).
    """
    stopped = lambda *args: jax.lax.stop_gradient(student(*args))
    x = jax.lax.stop_gradient(student_sample(stopped, text, text_lens, noise, steps, grid, latents=latents))
    loss, metrics = flow_matching_loss(critic, x, text, text_lens, draw, weighting=weighting,
                                       empty_prompt=empty_prompt)
    metrics = {**metrics, **sample_statistics(x)}
    if gan is not None:
        if real is None or discriminator_draw is None:
            raise ValueError("the GAN head's discriminator loss needs the data latents (real) and its draw")
        d = discriminator_draw

        def logits(x0, noise_, sigmas):
            return gan.head(gan.critic_features(noised(x0, noise_, sigmas), sigmas * 1000.0, text, text_lens)[1])

        fake_logits = logits(x, d.fake_noise, d.fake_sigmas)
        real_logits = logits(real, d.real_noise, d.real_sigmas)
        discriminator = jnp.mean(jax.nn.softplus(fake_logits) + jax.nn.softplus(-real_logits))
        metrics.update(flow_matching=loss, gan_discriminator=discriminator,
                       discriminator_accuracy=0.5 * jnp.mean((fake_logits < 0).astype(jnp.float32)
                                                             + (real_logits > 0).astype(jnp.float32)))
        loss = loss + gan.weight * discriminator
        metrics["loss"] = loss
    return loss, metrics


Route = str | Mapping[str, float]


def route_row(route: Route, teachers: tuple[str, ...], field: str) -> np.ndarray:
    """`[K]` weights of one route: a teacher name (one-hot) or a mapping name -> non-negative weight."""
    row = np.zeros(len(teachers))
    items = {route: 1.0} if isinstance(route, str) else dict(route)
    for name, weight in items.items():
        if name not in teachers:
            raise ValueError(f"{field}: unknown teacher {name!r}; the teachers are {teachers}")
        if not weight >= 0:
            raise ValueError(f"{field}: the weight of {name!r} must be non-negative, got {weight!r}")
        row[teachers.index(name)] = weight
    return row


def bin_cdf(sampling_config: SigmaSampling, sigma: jax.Array) -> jax.Array:
    """P[sigma' <= sigma] under `sampling_config` (uniform or logit-normal)."""
    shift = sampling_config.shift
    u = sigma / (shift - (shift - 1) * sigma)  # the inverse of the shift
    if sampling_config.sigma_scheme == "uniform":
        return jnp.clip(u, 0.0, 1.0)
    logit = jnp.log(u) - jnp.log1p(-u)
    return ndtr((logit - sampling_config.logit_mean) / sampling_config.logit_std)


def bin_quantile(sampling_config: SigmaSampling, probability: jax.Array) -> jax.Array:
    """The inverse of `bin_cdf`."""
    if sampling_config.sigma_scheme == "uniform":
        u = probability
    else:
        u = jax.nn.sigmoid(sampling_config.logit_mean + sampling_config.logit_std * ndtri(probability))
    shift = sampling_config.shift
    return shift * u / (1 + (shift - 1) * u)


@dataclasses.dataclass(frozen=True)
class Config:
    """The DMD / MT-DMD objective's settings (the module docstring gives the math).

    Student: `student_steps`, `student_shift` (its sigma grid; None: the pipeline's scheduler shift, from the
    runner's context), `student_input`. Teacher: `teachers` (the
    frozen models' names), `guidance_scale` (the teachers' CFG, u + g (c - u)). Terms: `decoupled`,
    `dm_weight`, `ca_weight`, `dm_sigmas`, `ca_sigmas` (`SigmaSampling`s or mappings of its fields),
    `normaliser_eps`. Gate: `sigma_edges`, `sigma_routes`, `domain_routes`, `objective_routes`,
    `sigma_bin_per_batch`. Critic: `critic` (a `FlowMatchingConfig` or mapping of its fields),
    `critic_updates` (TTUR). `latent_shape` `(C, H, W)` of the student's samples; None: read from the batch's
    `latents` (which then becomes a required batch key). GAN head (DMD2's diffusion GAN; needs `latents`):
    `gan_weight` (the generator's softplus(-D(fake)) term; 0 = no head and no "discriminator" part),
    `gan_discriminator_weight` (the discriminator loss's weight in the critic update), `gan_hidden` (the head's
    width), `gan_sigmas` (the noise levels the discriminator sees). Regression term (DMD v1):
    `regression_weight` (0 = off; above 0 the batch keys `ode_noise` and `ode_target` are read).
    """

    teachers: tuple[str, ...] = ("teacher",)
    student_steps: int = 8
    student_shift: float | None = None
    student_input: str = "backward_simulation"
    guidance_scale: float = 4.0
    decoupled: bool = False
    dm_weight: float = 1.0
    ca_weight: float = 1.0
    dm_sigmas: SigmaSampling = dataclasses.field(default_factory=lambda: SigmaSampling(sigma_scheme="uniform"))
    ca_sigmas: SigmaSampling = dataclasses.field(default_factory=lambda: SigmaSampling(sigma_scheme="uniform"))
    normaliser_eps: float = 1e-6
    sigma_edges: tuple[float, ...] = ()
    sigma_routes: tuple[Route, ...] = ()
    domain_routes: tuple[Route, ...] = ()
    objective_routes: Mapping[str, Route] = dataclasses.field(default_factory=dict)
    sigma_bin_per_batch: bool = False
    critic: FlowMatchingConfig = dataclasses.field(
        default_factory=lambda: FlowMatchingConfig(sigma_scheme="uniform"))
    critic_updates: int = 5
    latent_shape: tuple[int, int, int] | None = None
    gan_weight: float = 0.0
    gan_discriminator_weight: float = 0.01
    gan_hidden: int = 256
    gan_sigmas: SigmaSampling = dataclasses.field(default_factory=lambda: SigmaSampling(sigma_scheme="uniform"))
    regression_weight: float = 0.0

    def __post_init__(self):
        for name, kind in (("dm_sigmas", SigmaSampling), ("ca_sigmas", SigmaSampling), ("critic", FlowMatchingConfig),
                           ("gan_sigmas", SigmaSampling)):
            value = getattr(self, name)
            if not isinstance(value, kind):  # a mapping of the dataclass's fields, as configs give it
                known = {field.name for field in dataclasses.fields(kind)}
                unknown = sorted(set(value) - known)
                if unknown:
                    raise ValueError(f"unknown DMD {name} fields {unknown}")
                object.__setattr__(self, name, kind(**dict(value)))
        for name in ("teachers", "sigma_edges", "sigma_routes", "domain_routes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.latent_shape is not None:
            object.__setattr__(self, "latent_shape", tuple(self.latent_shape))
        if not self.teachers or len(set(self.teachers)) != len(self.teachers) or not all(
                isinstance(t, str) for t in self.teachers):
            raise ValueError(f"teachers must be distinct names, got {self.teachers!r}")
        if {GENERATOR, CRITIC, DISCRIMINATOR} & set(self.teachers):
            raise ValueError(f"teachers may not be named {GENERATOR!r}, {CRITIC!r} or {DISCRIMINATOR!r} (the "
                             f"trained parts)")
        if int(self.gan_hidden) != self.gan_hidden or self.gan_hidden < 1:
            raise ValueError(f"gan_hidden must be a positive integer, got {self.gan_hidden!r}")
        if int(self.student_steps) != self.student_steps or self.student_steps < 1:
            raise ValueError(f"student_steps must be a positive integer, got {self.student_steps!r}")
        if self.student_shift is not None and not self.student_shift > 0:
            raise ValueError(f"student_shift must be positive, got {self.student_shift!r}")
        if self.student_input not in STUDENT_INPUTS:
            raise ValueError(f"student_input must be one of {STUDENT_INPUTS}, got {self.student_input!r}")
        if not self.guidance_scale >= 1:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale!r}")
        for name in ("dm_weight", "ca_weight", "gan_weight", "gan_discriminator_weight", "regression_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if not self.normaliser_eps > 0:
            raise ValueError(f"normaliser_eps must be positive, got {self.normaliser_eps!r}")
        edges = self.sigma_edges
        if any(not 0 < e < 1 for e in edges) or any(a >= b for a, b in itertools.pairwise(edges)):
            raise ValueError(f"sigma_edges must be ascending, inside (0, 1), got {edges!r}")
        if self.sigma_routes and len(self.sigma_routes) != len(edges) + 1:
            raise ValueError(f"sigma_routes needs one route per bin ({len(edges) + 1} for sigma_edges {edges!r}), "
                             f"got {len(self.sigma_routes)}")
        if edges and not self.sigma_routes:
            raise ValueError("sigma_edges needs sigma_routes (one route per bin)")
        unknown = sorted(set(self.objective_routes) - set(TERMS))
        if unknown:
            raise ValueError(f"objective_routes keys must be in {TERMS}, got {unknown}")
        if self.sigma_bin_per_batch:
            for name in ("dm_sigmas", "ca_sigmas"):
                if getattr(self, name).sigma_scheme == "mode":
                    raise ValueError(f"sigma_bin_per_batch needs uniform or logit_normal {name}, got 'mode'")
        if int(self.critic_updates) != self.critic_updates or self.critic_updates < 1:
            raise ValueError(f"critic_updates must be a positive integer, got {self.critic_updates!r}")
        if self.latent_shape is not None and (len(self.latent_shape) != 3 or min(self.latent_shape) < 1):
            raise ValueError(f"latent_shape must be (C, H, W), got {self.latent_shape!r}")
        gate_table(self)


def gate_table(config: Config) -> np.ndarray:
    """`[bins, domains + 1, 2, K]` float32: the normalised teacher weights of a (sigma bin, domain, term); the
    last domain row is for ids outside `domain_routes`. Raises ValueError if a row has no weight."""
    teachers = config.teachers
    ones = np.ones(len(teachers))
    sigma_rows = [route_row(r, teachers, f"sigma_routes[{i}]") for i, r in enumerate(config.sigma_routes)] or [ones]
    domain_rows = [route_row(r, teachers, f"domain_routes[{i}]") for i, r in enumerate(config.domain_routes)] + [ones]
    term_rows = [route_row(config.objective_routes[t], teachers, f"objective_routes[{t!r}]")
                 if t in config.objective_routes else ones for t in TERMS]
    table = (np.asarray(sigma_rows)[:, None, None, :] * np.asarray(domain_rows)[None, :, None, :]
             * np.asarray(term_rows)[None, None, :, :])
    totals = table.sum(-1)
    if np.any(totals <= 0):
        b, d, t = np.argwhere(totals <= 0)[0]
        raise ValueError(f"the gate gives no teacher any weight for sigma bin {b}, domain "
                         f"{'other' if d == len(config.domain_routes) else d} and term {TERMS[t]!r}: check "
                         f"sigma_routes, domain_routes and objective_routes")
    return (table / totals[..., None]).astype(np.float32)


def gate_weights(config: Config, sigmas: jax.Array, domain: jax.Array | None, term: str) -> jax.Array:
    """`[B, K]` teacher weights of `term` ("dm" or "ca") for examples at `sigmas [B]` in `domain [B]` (or None)."""
    table = jnp.asarray(gate_table(config))
    bins = jnp.searchsorted(jnp.asarray(config.sigma_edges, jnp.float32), sigmas, side="right") if (
        config.sigma_edges) else jnp.zeros(sigmas.shape, jnp.int32)
    known = len(config.domain_routes)
    if domain is None or not known:
        rows = jnp.full(sigmas.shape, known, jnp.int32)
    else:
        rows = jnp.where((domain >= 0) & (domain < known), domain, known).astype(jnp.int32)
    return table[bins, rows, TERMS.index(term)]


def draw_sigmas(config: Config, sampling_config: SigmaSampling, keys: jax.Array) -> jax.Array:
    """`[B]` sigmas, example b's from `keys[b]`; with `sigma_bin_per_batch`, all in the bin of the sigma drawn
    from `keys[0]` (folded), each by inverse CDF inside it."""
    if not (config.sigma_bin_per_batch and config.sigma_edges):
        return jax.vmap(lambda key: sampling_config.sample(key, 1)[0])(keys)
    first = sampling_config.sample(jax.random.fold_in(keys[0], 1), 1)[0]
    edges = jnp.asarray((0.0,) + config.sigma_edges + (1.0,), jnp.float32)
    index = jnp.searchsorted(edges[1:-1], first, side="right")
    low, high = bin_cdf(sampling_config, edges[index]), bin_cdf(sampling_config, edges[index + 1])
    uniform = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)
    # Kept strictly inside the bin: the quantile of a boundary probability is the edge itself.
    tiny = 1e-6
    probability = jnp.clip(low + uniform * (high - low), low + tiny * (high - low), high - tiny * (high - low))
    return bin_quantile(sampling_config, probability)


def stopped(module: nnx.Module) -> nnx.Module:
    """The module with every variable under stop_gradient: the gradient-free rollout's copy of the student."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


# Fold-in constants naming each random stream of an example's key.
(_STEPS, _START, _DM_NOISE, _DM_SIGMA, _CA_NOISE, _CA_SIGMA, _CRITIC, _FAKE_NOISE, _FAKE_SIGMA, _REAL_NOISE,
 _REAL_SIGMA) = range(11)


class DMD:
    """The DMD / MT-DMD objective for the trainer (`objectives.Objective` with `updates`): trains `generator`
    and `critic` against the frozen `config.teachers`."""

    def __init__(self, config: Config, empty_prompt: EmptyPrompt | None = None):
        guided = config.ca_weight != 0 and config.guidance_scale != 1
        if guided and empty_prompt is None:
            raise ValueError("the CA term (ca_weight != 0 and guidance_scale != 1) needs the empty prompt's features")
        if config.critic.text_dropout > 0 and empty_prompt is None:
            raise ValueError("critic.text_dropout > 0 needs the empty prompt's features")
        if config.student_shift is None:
            raise ValueError("student_shift is None: make(config, context) sets it to the context's scheduler shift")
        self.config = config
        self.empty_prompt = empty_prompt
        self.grid = student_grid(config.student_steps, config.student_shift)
        self.gan = config.gan_weight > 0
        needs_latents = config.latent_shape is None or config.student_input == "noised_data" or self.gan
        self.batch_keys = ("text", "text_lens") + (("latents",) if needs_latents else ()) + (
            ("category",) if config.domain_routes else ()) + (ODE_KEYS if reads_ode_pairs(config) else ())
        self.optional_batch_keys = ()
        critic_parts = critic_update_parts(config)
        self.trains = trains(config)
        self.reads = config.teachers
        self.updates = (objectives.Update(CRITIC, critic_parts, self.critic_loss, repeats=config.critic_updates),
                        objectives.Update("generator", (GENERATOR,), self.generator_loss))

    def _gan(self, critic: nnx.Module, head: nnx.Module, weight: float) -> GAN | None:
        return GAN(critic.velocity_and_features, head, weight) if self.gan else None

    def _check(self, batch: Mapping) -> None:
        missing = [key for key in self.batch_keys if key not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing}; this DMD objective reads {self.batch_keys}")

    def _start(self, batch: Mapping, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each example's start noise `[B, C, H, W]` and student step `[B]`."""
        shape = self.config.latent_shape or tuple(batch["latents"].shape[1:])
        noise = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, _START), shape, jnp.float32))(keys)
        steps = jax.vmap(lambda key: jax.random.randint(jax.random.fold_in(key, _STEPS), (), 0,
                                                        self.config.student_steps))(keys)
        return noise, steps

    def _latents(self, batch: Mapping) -> jax.Array | None:
        return batch["latents"] if self.config.student_input == "noised_data" else None

    def generator_loss(self, trainable: Mapping[str, nnx.Module], frozen: Mapping[str, nnx.Module],
                       batch: Mapping[str, jax.Array], keys: jax.Array) -> tuple[jax.Array, objectives.Metrics]:
        config = self.config
        self._check(batch)
        noise, steps = self._start(batch, keys)

        def term_draw(noise_stream, sigma_stream, sigmas_config):
            sigmas = draw_sigmas(config, sigmas_config, jax.vmap(lambda k: jax.random.fold_in(k, sigma_stream))(keys))
            term_noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, noise_stream), noise.shape[1:],
                                                              jnp.float32))(keys)
            return term_noise, sigmas

        dm_noise, dm_sigmas = term_draw(_DM_NOISE, _DM_SIGMA, config.dm_sigmas)
        ca_noise, ca_sigmas = term_draw(_CA_NOISE, _CA_SIGMA, config.ca_sigmas) if config.decoupled else (
            dm_noise, dm_sigmas)
        domain = batch.get("category") if config.domain_routes else None
        draw = GeneratorDraw(noise, steps, dm_noise, dm_sigmas, ca_noise, ca_sigmas)
        student = trainable[GENERATOR]
        return generator_loss(student, frozen[CRITIC], {name: frozen[name] for name in config.teachers},
                              batch["text"], batch["text_lens"], draw, gate_weights(config, dm_sigmas, domain, "dm"),
                              gate_weights(config, ca_sigmas, domain, "ca"), grid=self.grid,
                              guidance_scale=config.guidance_scale, empty_prompt=self.empty_prompt,
                              decoupled=config.decoupled, dm_weight=config.dm_weight, ca_weight=config.ca_weight,
                              eps=config.normaliser_eps, rollout=stopped(student), latents=self._latents(batch),
                              gan=self._gan(frozen[CRITIC], frozen.get(DISCRIMINATOR), config.gan_weight),
                              regression=Regression(batch["ode_noise"], batch["ode_target"], config.regression_weight)
                              if reads_ode_pairs(config) else None)

    def critic_loss(self, trainable: Mapping[str, nnx.Module], frozen: Mapping[str, nnx.Module],
                    batch: Mapping[str, jax.Array], keys: jax.Array) -> tuple[jax.Array, objectives.Metrics]:
        config = self.config
        self._check(batch)
        noise, steps = self._start(batch, keys)
        draw = draw_noise(jax.vmap(lambda k: jax.random.fold_in(k, _CRITIC))(keys), noise.shape, config.critic)
        discriminator_draw = None
        if self.gan:
            def normal(stream):
                return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), noise.shape[1:]))(keys)

            def sigmas(stream):
                return jax.vmap(lambda k: config.gan_sigmas.sample(jax.random.fold_in(k, stream), 1)[0])(keys)

            discriminator_draw = DiscriminatorDraw(normal(_FAKE_NOISE), sigmas(_FAKE_SIGMA), normal(_REAL_NOISE),
                                                   sigmas(_REAL_SIGMA))
        return critic_loss(trainable[CRITIC], frozen[GENERATOR], batch["text"], batch["text_lens"], noise, steps,
                           draw, grid=self.grid, weighting=config.critic.weighting,
                           empty_prompt=self.empty_prompt if config.critic.text_dropout > 0 else None,
                           latents=self._latents(batch),
                           gan=self._gan(trainable[CRITIC], trainable.get(DISCRIMINATOR),
                                         config.gan_discriminator_weight),
                           real=batch.get("latents") if self.gan else None, discriminator_draw=discriminator_draw)


def reads_ode_pairs(config: Config) -> bool:
    """Whether the objective reads the teacher's ODE pairs (the batch keys `ODE_KEYS`, which the runner's
    `ode_pairs` stage makes): with the regression term on."""
    return config.regression_weight > 0


def critic_update_parts(config: Config) -> tuple[str, ...]:
    return (CRITIC, DISCRIMINATOR) if config.gan_weight > 0 else (CRITIC,)


def trains(config: Config) -> tuple[str, ...]:
    """The trainable parts (the runner's `part_names`): the student "transformer", the "critic" (another copy of
    the DiT, starting where the student does) and, with the GAN head, its "discriminator"."""
    return critic_update_parts(config) + (GENERATOR,)


def part_models(config: Config) -> dict:
    """{part: builder(transformer_config) -> (rngs -> module)} of the parts that are not the DiT: the GAN head
    (float32, width the DiT's hidden size) when `gan_weight > 0`."""
    if not config.gan_weight > 0:
        return {}

    def discriminator(transformer_config):
        return lambda rngs: GANHead(transformer_config.hidden_size, config.gan_hidden, rngs=rngs)

    return {DISCRIMINATOR: discriminator}


def make(config: Config, context) -> DMD:
    """The objective of `config`, with the empty prompt of `context` (the teachers' unconditional branch) and,
    when `config.student_shift` is None, its `scheduler_shift` (the pipeline's) for the student's grid."""
    if config.student_shift is None:
        config = dataclasses.replace(config, student_shift=context.scheduler_shift)
    return DMD(config, context.empty_prompt)
