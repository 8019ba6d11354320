"""The flow-matching objective, parameterised as the reference sampler reads it.

Conventions (diffusers `FlowMatchEulerDiscreteScheduler`, reference doc section 0): sigma in [0, 1] is
the noise level (0 = data, 1 = pure noise), `x_sigma = (1 - sigma) x0 + sigma eps`, the network sees
`timestep = 1000 sigma` and predicts the velocity `v* = eps - x0`, which the Euler sampler integrates
from sigma = 1 down to 0 (`x <- x + (sigma_next - sigma) v`).

Shapes: B batch, C latent channels, H/W latent height/width, T padded text length, D text width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

SIGMA_SCHEMES = ("logit_normal", "mode", "uniform")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")

# (x_sigma [B, C, H, W], timestep [B] on 0..1000, text [B, T, D], text_lens [B]) -> velocity [B, C, H, W]
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SigmaSampling:
    """How the training noise levels are drawn (`sample_sigmas`); shared by every objective that noises data.

    `shift` is the scheduler's shift (4.0 in the released scheduler config); 1.0 leaves sigma unshifted.
    """

    sigma_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0

    def __post_init__(self):
        if self.sigma_scheme not in SIGMA_SCHEMES:
            raise ValueError(f"sigma_scheme must be one of {SIGMA_SCHEMES}, got {self.sigma_scheme!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be positive, got {self.logit_std!r}")

    def sample(self, rng: jax.Array, batch: int) -> jax.Array:
        """`[batch]` float32 noise levels in (0, 1)."""
        return sample_sigmas(rng, batch, scheme=self.sigma_scheme, mean=self.logit_mean, std=self.logit_std,
                             mode_scale=self.mode_scale, shift=self.shift)


@dataclasses.dataclass(frozen=True)
class FlowMatchingConfig(SigmaSampling):
    """How sigma (`SigmaSampling`'s fields), the noise and the text dropout are drawn, and how the per-sample
    errors are weighted.

    `text_dropout` is the probability of replacing a sample's prompt by the empty prompt (for CFG).
    """

    weighting: str = "none"
    text_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError(f"text_dropout must be in [0, 1], got {self.text_dropout!r}")


class NoiseDraw(NamedTuple):
    """The random part of one batch's loss: `noise [B, C, H, W]`, `sigmas [B]`, `drop_text [B]` (bool)."""

    noise: jax.Array
    sigmas: jax.Array
    drop_text: jax.Array


class EmptyPrompt(NamedTuple):
    """The frozen text encoder's features of the empty prompt: `features [T_e, D]`, `length` (int, <= T_e)."""

    features: jax.Array
    length: int


def shift_sigmas(sigmas: jax.Array, shift: float) -> jax.Array:
    """The scheduler's shift `s sigma / (1 + (s - 1) sigma)`: s > 1 moves mass towards noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(rng: jax.Array, batch: int, *, scheme: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                  mode_scale: float = 1.29, shift: float = 1.0) -> jax.Array:
    """Training noise levels `[B]` float32 in (0, 1).

    `u` is drawn as in diffusers' `compute_density_for_timestep_sampling` and read directly as the
    unshifted sigma: with `logit_normal`, `sigma = shift(sigmoid(N(mean, std)))`, so a positive `mean`
    means more noise. (The SD3 scripts index the descending timestep table with u, which reads u as
    1 - sigma; the two agree for mean = 0 only.)
    """
    if scheme == "logit_normal":
        u = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,), jnp.float32))
    elif scheme == "mode":
        u0 = jax.random.uniform(rng, (batch,), jnp.float32)
        u = 1 - u0 - mode_scale * (jnp.cos(math.pi * u0 / 2) ** 2 - 1 + u0)
    elif scheme == "uniform":
        u = jax.random.uniform(rng, (batch,), jnp.float32)
    else:
        raise ValueError(f"unknown sigma scheme {scheme!r}; expected one of {SIGMA_SCHEMES}")
    return shift_sigmas(u, shift)


def draw_noise(keys: jax.Array, latent_shape: tuple[int, ...], config: FlowMatchingConfig) -> NoiseDraw:
    """Everything random about one batch's loss, for latents of shape `[B, C, H, W]`: example i's noise,
    sigma and text dropout from its own key `keys[i]` (`keys [B]`)."""
    if keys.shape != latent_shape[:1]:
        raise ValueError(f"draw_noise: {keys.shape[0] if keys.ndim else 'no'} keys for a batch of {latent_shape[0]}")

    def one(key):
        noise_key, sigma_key, drop_key = jax.random.split(key, 3)
        return (jax.random.normal(noise_key, latent_shape[1:], jnp.float32), config.sample(sigma_key, 1)[0],
                jax.random.bernoulli(drop_key, config.text_dropout))

    return NoiseDraw(*jax.vmap(one)(keys))


def loss_weights(sigmas: jax.Array, weighting: str) -> jax.Array:
    """Per-sample weights `[B]` (diffusers `compute_loss_weighting_for_sd3`)."""
    if weighting == "none":
        return jnp.ones_like(sigmas)
    if weighting == "sigma_sqrt":
        return sigmas ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")


def drop_text(text: jax.Array, text_lens: jax.Array, drop: jax.Array, empty: EmptyPrompt
              ) -> tuple[jax.Array, jax.Array]:
    """`text [B, T, D]`, `text_lens [B]` with the samples where `drop [B]` is set replaced by the empty prompt
    (zero-padded to T)."""
    features = jnp.asarray(empty.features)
    if features.ndim != 2 or features.shape[1] != text.shape[2] or features.shape[0] > text.shape[1]:
        raise ValueError(f"empty-prompt features {features.shape} must be [T_e <= {text.shape[1]}, {text.shape[2]}]")
    padded = jnp.zeros(text.shape[1:], text.dtype).at[: features.shape[0]].set(features.astype(text.dtype))
    text = jnp.where(drop[:, None, None], padded[None], text)
    text_lens = jnp.where(drop, jnp.asarray(empty.length, text_lens.dtype), text_lens)
    return text, text_lens


def flow_matching_loss(predict_velocity: VelocityFn, latents: jax.Array, text: jax.Array, text_lens: jax.Array,
                       draw: NoiseDraw, *, weighting: str = "none", empty_prompt: EmptyPrompt | None = None
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`mean_b w(sigma_b) mean_chw (v_pred - (eps - x0))^2` and metrics, for clean `latents` x0 `[B, C, H, W]`.

    The error is computed in float32 whatever the model's compute dtype. Samples with `draw.drop_text`
    set see `empty_prompt` instead of their text (it must be given when any may be dropped).
    """
    x0 = latents.astype(jnp.float32)
    sigmas = draw.sigmas.astype(jnp.float32)
    sigma_b = sigmas[:, None, None, None]
    x_sigma = (1 - sigma_b) * x0 + sigma_b * draw.noise
    target = draw.noise - x0
    if empty_prompt is not None:
        text, text_lens = drop_text(text, text_lens, draw.drop_text, empty_prompt)
    prediction = predict_velocity(x_sigma, sigmas * 1000.0, text, text_lens).astype(jnp.float32)
    per_sample = jnp.mean(jnp.square(prediction - target), axis=tuple(range(1, x0.ndim)))
    loss = jnp.mean(loss_weights(sigmas, weighting) * per_sample)
    return loss, {"loss": loss, "mse": jnp.mean(per_sample)}


@dataclasses.dataclass(frozen=True)
class FlowMatching:
    """The flow-matching objective (`objectives.Objective`) of the model named `model`: batches of clean
    `latents [B, C, H, W]`, text features `text [B, T, D]` and `text_lens [B]`. `empty_prompt` (the frozen
    encoder's features of "") is required when `config.text_dropout > 0`."""

    config: FlowMatchingConfig = dataclasses.field(default_factory=FlowMatchingConfig)
    empty_prompt: EmptyPrompt | None = None
    model: str = "transformer"

    batch_keys = ("latents", "text", "text_lens")
    reads = ()

    def __post_init__(self):
        if self.config.text_dropout > 0 and self.empty_prompt is None:
            raise ValueError("text_dropout > 0 needs the empty prompt's features (empty_prompt)")

    @property
    def trains(self) -> tuple[str, ...]:
        return (self.model,)

    def loss(self, trainable: Mapping, frozen: Mapping, batch: Mapping, keys: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        draw = draw_noise(keys, batch["latents"].shape, self.config)
        return flow_matching_loss(trainable[self.model], batch["latents"], batch["text"], batch["text_lens"], draw,
                                  weighting=self.config.weighting, empty_prompt=self.empty_prompt)


# The runner builds an objective from `config.objective` as `make(Config(**settings), context)`.
Config = FlowMatchingConfig


def make(config: FlowMatchingConfig, context) -> FlowMatching:
    """The objective of `config`, with the empty prompt of `context` when text is dropped."""
    return FlowMatching(config, context.empty_prompt if config.text_dropout > 0 else None)
