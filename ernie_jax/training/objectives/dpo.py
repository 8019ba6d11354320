"""Preference optimisation for flow matching: Diffusion-DPO, Flow-DPO and ERNIE-Image's stabilized DPO.

Conventions are flow_matching.py's: sigma in [0, 1] is the noise level, `x_sigma = (1 - sigma) x0 + sigma eps`,
the network sees `timestep = 1000 sigma` and predicts the velocity `v* = eps - x0`. The chosen image x0^w and
the rejected image x0^l of a pair share their noise eps and their sigma. With `e^w`, `e^l` the errors of the
policy (`pol`, trained) and of the frozen reference (`ref`) on the two images, every variant minimises

    mean_b  w_b [ -log sigmoid(logit_b) + lambda_win e_pol^w + lambda_lose e_pol^l ]

(`w_b` the pair weights, 1 by default) and differs only in the logit:

- `diffusion_dpo` (Wallace et al., arXiv 2311.12908): errors in epsilon space. Since
  `eps - eps_hat = (1 - sigma)(v* - v_hat)`, each is `(1 - sigma)^2` times the velocity error, and
  `logit = -beta/2 [(e_pol^w - e_ref^w) - (e_pol^l - e_ref^l)]`.
- `flow_dpo` (VideoAlign, arXiv 2501.13918; flow_grpo's SD3 DPO): the same with velocity errors, each against
  its own image's target, and a constant beta.
- `ernie` (the ERNIE-Image report, Eqs. 1-2): velocity errors, `logit = -beta [...]` without the 1/2, so
  beta here is flow_dpo's beta / 2. The report's values: beta 0.05, lambda_win 0.35, lambda_lose 0.15.
- `article` (the blog's snippet, for comparison only): `d = err(v_pol, v_ref)` on each image and
  `logit = beta (d^l - d^w)`. It measures how far the policy has moved from the reference, not how well it
  denoises: the targets never enter it, and it is minimised by staying at the reference on chosen inputs and
  moving without bound on rejected ones.

The anchors `lambda_win e_pol^w + lambda_lose e_pol^l` are the policy's plain flow-matching (velocity) errors,
whatever the variant.

Reduction and the units of beta: an error is the mean (`reduction="mean"`) or the sum (`"sum"`) of the
squared difference over the D = C H W elements of a sample, computed in float32. beta is always in
per-element-mean units: with `"sum"` the logit uses beta / D, so the DPO term is the same for both reductions
and only the anchors (reduced like the errors, hence D times larger relative to it) and the reported errors
change. A beta quoted for summed errors is beta_sum * D here.

Pair weights (e.g. down-weighted ties) multiply each pair's whole loss; the loss is `mean_b(w_b loss_b)`,
not normalised by the weights' sum, so the mean over equal microbatches is the batch's loss (as
flow_matching's loss weights). The other metrics are plain batch means.

Shapes: B pairs, C latent channels, H/W latent height/width, T padded text length, D_t text width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.training.objectives import Metrics
from ernie_jax.training.objectives.flow_matching import SigmaSampling, VelocityFn

VARIANTS = ("diffusion_dpo", "flow_dpo", "ernie", "article")
REDUCTIONS = ("mean", "sum")
PAIR_KEYS = ("latents_chosen", "latents_rejected", "text_bth", "text_lens")


def check_options(*, beta: float, lambda_win: float, lambda_lose: float, variant: str, reduction: str) -> None:
    """Raises ValueError naming the first bad option."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta!r}")
    for name, value in (("lambda_win", lambda_win), ("lambda_lose", lambda_lose)):
        if not value >= 0:
            raise ValueError(f"{name} must be non-negative, got {value!r}")


def per_sample_error(prediction: jax.Array, target: jax.Array, reduction: str) -> jax.Array:
    """`[N]`: the squared difference of `[N, ...]` arrays, reduced over every axis but the first, in float32."""
    squared = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    axes = tuple(range(1, squared.ndim))
    return jnp.mean(squared, axis=axes) if reduction == "mean" else jnp.sum(squared, axis=axes)


def noised_pairs(latents_chosen: jax.Array, latents_rejected: jax.Array, noise: jax.Array, sigmas: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """The model inputs `x_sigma` and the velocity targets `eps - x0`, each `[2B, ...]` in float32 (the chosen
    rows, then the rejected rows), for `[B, ...]` latents sharing `noise [B, ...]` and `sigmas [B]` per pair."""
    x0 = jnp.concatenate([latents_chosen, latents_rejected]).astype(jnp.float32)
    eps = jnp.tile(noise.astype(jnp.float32), (2,) + (1,) * (noise.ndim - 1))
    sigma = jnp.tile(sigmas.astype(jnp.float32), 2).reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1 - sigma) * x0 + sigma * eps, eps - x0


def preference_loss(policy_velocity: jax.Array, reference_velocity: jax.Array, target: jax.Array,
                    sigmas: jax.Array, pair_weights: jax.Array | None = None, *, beta: float, lambda_win: float = 0.0,
                    lambda_lose: float = 0.0, variant: str = "ernie", reduction: str = "mean"
                    ) -> tuple[jax.Array, Metrics]:
    """The loss and metrics of a batch of pairs from its velocities (the module docstring gives the math).

    `policy_velocity`, `reference_velocity`, `target`: `[2B, ...]`, the chosen rows then the rejected rows
    (as `noised_pairs` makes them); `sigmas [B]`; `pair_weights [B]` or None (all 1). Gradients flow through
    whatever the caller did not stop: `dpo_loss` stops the reference's.
    """
    check_options(beta=beta, lambda_win=lambda_win, lambda_lose=lambda_lose, variant=variant, reduction=reduction)
    if not policy_velocity.shape == reference_velocity.shape == target.shape:
        raise ValueError(f"policy velocity {policy_velocity.shape}, reference velocity {reference_velocity.shape} "
                         f"and target {target.shape} must have one shape")
    pairs = sigmas.shape[0]
    if sigmas.ndim != 1 or target.shape[0] != 2 * pairs:
        raise ValueError(f"sigmas {sigmas.shape} must be [B] for velocities [2B, ...], got {target.shape}")
    if pair_weights is not None and pair_weights.shape != (pairs,):
        raise ValueError(f"pair_weights {pair_weights.shape} must be [{pairs}]")

    def chosen_and_rejected(values):
        return values[:pairs], values[pairs:]

    policy_error = per_sample_error(policy_velocity, target, reduction)
    reference_error = per_sample_error(reference_velocity, target, reduction)
    if variant == "article":
        compared, baseline = per_sample_error(policy_velocity, reference_velocity, reduction), 0.0
    elif variant == "diffusion_dpo":
        epsilon_scale = jnp.tile(jnp.square(1 - sigmas.astype(jnp.float32)), 2)
        compared, baseline = epsilon_scale * policy_error, epsilon_scale * reference_error
    else:
        compared, baseline = policy_error, reference_error
    chosen_gap, rejected_gap = chosen_and_rejected(compared - baseline)
    half = 0.5 if variant in ("diffusion_dpo", "flow_dpo") else 1.0
    elements = target[0].size if reduction == "sum" else 1
    logit = -half * (beta / elements) * (chosen_gap - rejected_gap)

    policy_chosen, policy_rejected = chosen_and_rejected(policy_error)
    reference_chosen, reference_rejected = chosen_and_rejected(reference_error)
    weights = jnp.ones((pairs,), jnp.float32) if pair_weights is None else pair_weights.astype(jnp.float32)
    dpo_terms = -jax.nn.log_sigmoid(logit)
    loss = jnp.mean(weights * (dpo_terms + lambda_win * policy_chosen + lambda_lose * policy_rejected))

    def norms(velocity):
        return jnp.linalg.norm(velocity.reshape(velocity.shape[0], -1), axis=1)

    return loss, {
        "loss": loss,
        "dpo_loss": jnp.mean(weights * dpo_terms),
        "implicit_accuracy": jnp.mean((logit > 0).astype(jnp.float32)),
        "reward_margin": jnp.mean(logit),
        "policy_chosen_error": jnp.mean(policy_chosen),
        "policy_rejected_error": jnp.mean(policy_rejected),
        "reference_chosen_error": jnp.mean(reference_chosen),
        "reference_rejected_error": jnp.mean(reference_rejected),
        "velocity_norm_ratio": jnp.mean(norms(policy_velocity) / norms(reference_velocity)),
    }


def dpo_loss(policy: VelocityFn, reference: VelocityFn, batch: Mapping[str, jax.Array], noise: jax.Array,
             sigmas: jax.Array, *, beta: float, lambda_win: float = 0.0, lambda_lose: float = 0.0,
             variant: str = "ernie", reduction: str = "mean") -> tuple[jax.Array, Metrics]:
    """The DPO loss of `policy` against the frozen `reference` (the module docstring gives the math).

    `policy`, `reference`: DiT modules or any `(x [N, C, H, W], timestep [N], text_bth [N, T, D_t],
    text_lens [N]) -> velocity [N, C, H, W]`; each runs once on the 2B chosen-then-rejected inputs, and the
    reference's output is under stop_gradient. `batch`: `latents_chosen`, `latents_rejected` `[B, C, H, W]`,
    `text_bth [B, T, D_t]`, `text_lens [B]`, optionally `pair_weights [B]`. `noise [B, C, H, W]` and
    `sigmas [B]` are each pair's, shared by its two images.

    Returns the float32 loss and the metrics: `loss`, `dpo_loss` (the weighted DPO term alone),
    `implicit_accuracy` (mean(logit > 0)), `reward_margin` (mean logit), `policy_chosen_error`,
    `policy_rejected_error`, `reference_chosen_error`, `reference_rejected_error` (velocity errors in the
    chosen reduction) and `velocity_norm_ratio` (mean over the 2B samples of ||v_pol|| / ||v_ref||, which
    grows when the policy collapses).
    """
    check_options(beta=beta, lambda_win=lambda_win, lambda_lose=lambda_lose, variant=variant, reduction=reduction)
    missing = [key for key in PAIR_KEYS if key not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; DPO needs {PAIR_KEYS}")
    chosen, rejected = jnp.asarray(batch["latents_chosen"]), jnp.asarray(batch["latents_rejected"])
    text_bth, text_lens = jnp.asarray(batch["text_bth"]), jnp.asarray(batch["text_lens"])
    noise, sigmas = jnp.asarray(noise), jnp.asarray(sigmas)
    pairs = chosen.shape[0]
    if chosen.ndim != 4 or rejected.shape != chosen.shape or noise.shape != chosen.shape:
        raise ValueError(f"latents_chosen {chosen.shape}, latents_rejected {rejected.shape} and noise {noise.shape} "
                         f"must be one [B, C, H, W] shape")
    if sigmas.shape != (pairs,) or text_lens.shape != (pairs,) or text_bth.ndim != 3 or text_bth.shape[0] != pairs:
        raise ValueError(f"sigmas {sigmas.shape}, text_lens {text_lens.shape} and text_bth {text_bth.shape} must "
                         f"be [{pairs}], [{pairs}] and [{pairs}, T, D] for {pairs} pairs")
    pair_weights = batch.get("pair_weights")

    x_sigma, target = noised_pairs(chosen, rejected, noise, sigmas)
    timestep = jnp.tile(sigmas.astype(jnp.float32), 2) * 1000.0
    inputs = (x_sigma, timestep, jnp.concatenate([text_bth, text_bth]), jnp.concatenate([text_lens, text_lens]))
    policy_velocity = policy(*inputs).astype(jnp.float32)
    reference_velocity = jax.lax.stop_gradient(reference(*inputs)).astype(jnp.float32)
    return preference_loss(policy_velocity, reference_velocity, target, sigmas,
                           None if pair_weights is None else jnp.asarray(pair_weights), beta=beta,
                           lambda_win=lambda_win, lambda_lose=lambda_lose, variant=variant, reduction=reduction)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """The DPO objective's settings: `dpo_loss`'s options, the sigma draw, and whether the batch carries
    `pair_weights` (a data choice, so it decides the batch keys the trainer reads rather than being guessed
    from each batch)."""

    beta: float
    lambda_win: float = 0.0
    lambda_lose: float = 0.0
    variant: str = "ernie"
    reduction: str = "mean"
    weighted_pairs: bool = False
    sigmas: SigmaSampling = dataclasses.field(default_factory=SigmaSampling)

    def __post_init__(self):
        check_options(beta=self.beta, lambda_win=self.lambda_win, lambda_lose=self.lambda_lose,
                      variant=self.variant, reduction=self.reduction)
        if not isinstance(self.sigmas, SigmaSampling):  # a mapping of SigmaSampling's fields, as configs give it
            known = {field.name for field in dataclasses.fields(SigmaSampling)}
            unknown = sorted(set(self.sigmas) - known)
            if unknown:
                raise ValueError(f"unknown DPO sigmas fields {unknown}")
            object.__setattr__(self, "sigmas", SigmaSampling(**{key: self.sigmas[key] for key in self.sigmas}))


def draw_example(key: jax.Array, latent_shape: tuple[int, ...], sigmas: SigmaSampling) -> tuple[jax.Array, jax.Array]:
    """One pair's noise `[C, H, W]` and sigma `[]`, from its own key."""
    noise_key, sigma_key = jax.random.split(key)
    return jax.random.normal(noise_key, latent_shape, jnp.float32), sigmas.sample(sigma_key, 1)[0]


class DPO:
    """The DPO objective for the trainer (`objectives.Objective`): trains `transformer` against the frozen
    `reference`; each pair's noise and sigma come from its own key."""

    trains = ("transformer",)
    reads = ("reference",)

    def __init__(self, config: DPOConfig):
        self.config = config
        self.batch_keys = PAIR_KEYS + (("pair_weights",) if config.weighted_pairs else ())

    def loss(self, trainable: Mapping[str, nnx.Module], frozen: Mapping[str, nnx.Module],
             batch: Mapping[str, jax.Array], keys: jax.Array) -> tuple[jax.Array, Metrics]:
        config = self.config
        missing = [key for key in self.batch_keys if key not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing}; this DPO objective reads {self.batch_keys}")
        latent_shape = tuple(batch["latents_chosen"].shape[1:])
        noise, sigmas = jax.vmap(lambda key: draw_example(key, latent_shape, config.sigmas))(keys)
        return dpo_loss(trainable["transformer"], frozen["reference"], {k: batch[k] for k in self.batch_keys},
                        noise, sigmas, beta=config.beta, lambda_win=config.lambda_win,
                        lambda_lose=config.lambda_lose, variant=config.variant, reduction=config.reduction)


# The runner builds an objective from `config.objective` as `make(Config(**settings), context)`.
Config = DPOConfig


def make(config: DPOConfig, context=None) -> DPO:
    """The objective of `config` (it needs nothing from the runner's context)."""
    return DPO(config)
