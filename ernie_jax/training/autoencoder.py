"""Training a FLUX.2-architecture VAE (`AutoencoderKLFlux2`) from scratch on image batches, and fitting its
BatchNorm latent statistics: the first stage of an experiment that has no released VAE at its scale.

Loss per batch of images `x` in [-1, 1] (`[B, 3, H, W]`), with `(mean, logvar) = encode(x)`,
`z = mean + exp(logvar / 2) * noise` and d(.) the per-pixel distance (squared error for "l2", absolute
error for "l1"), averaged over pixels and channels:
    mean d(decode(z) - x)                                    (reconstruction)
  + edge_weight * mean d(grad decode(z) - grad x)            (horizontal and vertical differences)
  + kl_weight * mean 0.5 (mean^2 + exp(logvar) - 1 - logvar) (KL to N(0, 1), per latent element)
The edge term weights the thin strokes of rendered text more than their pixel count would; the small KL
keeps the latent scale bounded, as in the released VAE, without forcing channels into the prior. On
scenes that are mostly background, "l2" learns the object colours much sooner than "l1": its gradient
grows with the error, so the few wrong object pixels outweigh the many nearly right background ones.

After training, `fit_latent_stats` sets the BatchNorm running mean/var from the packed posterior means
of a sample of images, so that `encode_to_packed_latents` gives latents of mean 0 and variance 1 per
channel on that sample (what the released VAE's statistics do for the DiT).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ernie_jax.models.vae import AutoencoderKLFlux2, patchify_latents
from ernie_jax.training.optimizer import (
    OptimizerConfig,
    learning_rate_schedule,
    make_optimizer,
)

PIXEL_DISTANCES = {"l1": jnp.abs, "l2": jnp.square}


@dataclasses.dataclass(frozen=True)
class AutoencoderTrainConfig:
    """num_steps optimizer steps on batches of the given images; AdamW at `learning_rate` with
    `warmup_steps` of linear warm-up then a cosine decay to `final_lr_fraction` of it at the last step."""

    num_steps: int = 400
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.05
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    reconstruction: str = "l2"
    kl_weight: float = 1e-6
    edge_weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"AutoencoderTrainConfig: num_steps must be >= 1, got {self.num_steps}")
        if self.reconstruction not in PIXEL_DISTANCES:
            raise ValueError(f"AutoencoderTrainConfig: reconstruction must be one of {sorted(PIXEL_DISTANCES)}, "
                             f"got {self.reconstruction!r}")
        if self.kl_weight < 0 or self.edge_weight < 0:
            raise ValueError(f"AutoencoderTrainConfig: kl_weight and edge_weight must be >= 0, got "
                             f"{self.kl_weight}, {self.edge_weight}")

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(learning_rate=self.learning_rate,
                               warmup_steps=min(self.warmup_steps, self.num_steps - 1), decay_steps=self.num_steps, final_lr_fraction=self.final_lr_fraction,
                               weight_decay=self.weight_decay, clip_norm=self.clip_norm)


def to_model_images(images) -> jax.Array:
    """uint8 `[B, H, W, 3]` -> float32 `[B, 3, H, W]` in [-1, 1] (the VAE's input layout and range)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
    return jnp.asarray(images.transpose(0, 3, 1, 2), jnp.float32) / 127.5 - 1.0


def to_uint8_images(images: jax.Array) -> np.ndarray:
    """float `[B, 3, H, W]` in about [-1, 1] -> uint8 `[B, H, W, 3]`, rounded as the pipeline's "np"/"pil"."""
    unit = np.clip((np.asarray(images, np.float32).transpose(0, 2, 3, 1) + 1.0) / 2.0, 0.0, 1.0)
    return np.round(unit * 255.0).astype(np.uint8)


def _differences(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def autoencoder_loss(vae: AutoencoderKLFlux2, images: jax.Array, key: jax.Array, *, reconstruction: str,
                     kl_weight: float, edge_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The module docstring's loss for `images [B, 3, H, W]` in [-1, 1]; returns (loss, its terms)."""
    distance = PIXEL_DISTANCES[reconstruction]
    mean, logvar = vae.encode(images)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    decoded = vae.decode(z).astype(jnp.float32)
    pixel = distance(decoded - images).mean()
    edge = sum(distance(d - t).mean() for d, t in zip(_differences(decoded), _differences(images))) / 2
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar).astype(jnp.float32).mean()
    loss = pixel + edge_weight * edge + kl_weight * kl
    return loss, {"loss": loss, "reconstruction": pixel, "edge": edge, "kl": kl}


def _train_step(graphdef, optimizer: optax.GradientTransformation, config: AutoencoderTrainConfig):
    def step(params, rest, opt_state, images, key):
        def loss_fn(p):
            return autoencoder_loss(nnx.merge(graphdef, p, rest), images, key, reconstruction=config.reconstruction,
                                    kl_weight=config.kl_weight, edge_weight=config.edge_weight)

        grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 2))


def train_autoencoder(vae: AutoencoderKLFlux2, batches: Iterable[np.ndarray], config: AutoencoderTrainConfig,
                      *, progress: Callable[[int, dict[str, float]], None] | None = None,
                      log_every: int = 50) -> list[dict[str, float]]:
    """Trains `vae` in place for `config.num_steps` steps, one uint8 `[B, H, W, 3]` batch from `batches`
    per step; returns the history: at step 1, every `log_every` steps and at the last, the step's loss
    terms, the learning rate, and the wall-clock and process CPU seconds since the start (step 1's include
    compilation). `progress(step, entry)` is called with each entry.

    The BatchNorm statistics are not touched: call `fit_latent_stats` afterwards."""
    optimizer = make_optimizer(config.optimizer())
    schedule = learning_rate_schedule(config.optimizer())
    graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
    opt_state = optimizer.init(params)
    step_fn = _train_step(graphdef, optimizer, config)
    key = jax.random.key(config.seed)
    history, start, start_cpu = [], time.perf_counter(), time.process_time()
    batches = iter(batches)
    for step in range(1, config.num_steps + 1):
        try:
            images = to_model_images(next(batches))
        except StopIteration:
            raise ValueError(f"train_autoencoder: the batches ran out after {step - 1} of {config.num_steps} "
                             "steps") from None
        params, opt_state, metrics = step_fn(params, rest, opt_state, images, jax.random.fold_in(key, step))
        if step % log_every == 0 or step == config.num_steps or step == 1:
            entry = {"step": step, **{k: float(v) for k, v in metrics.items()},
                     "learning_rate": float(schedule(step - 1)), "seconds": time.perf_counter() - start,
                     "cpu_seconds": time.process_time() - start_cpu}
            history.append(entry)
            if progress is not None:
                progress(step, entry)
    nnx.update(vae, params)
    return history


def _packed_means(vae: AutoencoderKLFlux2):
    @jax.jit
    def packed(graphdef_state, images):
        model = nnx.merge(*graphdef_state)
        mean, _ = model.encode(images)
        return patchify_latents(mean, model.config.patch_size)

    return packed


def fit_latent_stats(vae: AutoencoderKLFlux2, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sets `vae.bn.running_mean/var` (`[packed_channels]`) to the per-channel mean and (biased) variance of
    the packed posterior means of the uint8 `[B, H, W, 3]` image batches; returns them as float64."""
    encode = _packed_means(vae)
    state = nnx.split(vae)
    count, total, total_sq = 0, 0.0, 0.0
    for batch in batches:
        packed = np.asarray(encode(state, to_model_images(batch)), np.float64)  # [B, C, h, w]
        count += packed.shape[0] * packed.shape[2] * packed.shape[3]
        total = total + packed.sum(axis=(0, 2, 3))
        total_sq = total_sq + np.square(packed).sum(axis=(0, 2, 3))
    if count == 0:
        raise ValueError("fit_latent_stats: no images")
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    dtype = vae.bn.running_mean[...].dtype
    vae.bn.running_mean[...] = jnp.asarray(mean, dtype)
    vae.bn.running_var[...] = jnp.asarray(var, dtype)
    return mean, var


def reconstruct(vae: AutoencoderKLFlux2, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """uint8 `[N, H, W, 3]` -> their uint8 reconstructions decode(posterior mean), `[N, H, W, 3]`."""

    @jax.jit
    def round_trip(graphdef_state, x):
        model = nnx.merge(*graphdef_state)
        return model.decode(model.encode(x)[0])

    state = nnx.split(vae)
    return np.concatenate([to_uint8_images(round_trip(state, to_model_images(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])


def psnr(originals: np.ndarray, reconstructions: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 images, over the whole set."""
    mse = np.mean(np.square(originals.astype(np.float64) - reconstructions.astype(np.float64)))
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))
