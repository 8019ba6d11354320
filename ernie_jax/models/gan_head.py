"""The diffusion-GAN head of DMD2 (Yin et al., arXiv 2405.14867: a classifier on the fake score's features at a
noisy input): a DiT's final image-token hidden states `[B, N, D]` -> one real/fake logit per example `[B]`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.models import layers


class GANHead(nnx.Module):
    """Mean over the image tokens, LayerNorm (no affine), Linear(D, hidden), SiLU, Linear(hidden, 1).

    The norm makes the logit independent of the features' overall scale, which differs a lot between the DiT's
    noise levels; the mean over tokens makes it independent of the resolution.
    """

    def __init__(self, width: int, hidden: int = 256, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hidden = layers.linear(width, hidden, axes=("embed", "mlp"), **kw)
        self.logit = layers.linear(hidden, 1, axes=("mlp", "conv_out"), **kw)

    def __call__(self, features: jax.Array) -> jax.Array:
        """`features [B, N, D]` -> logits `[B]` float32."""
        pooled = jnp.mean(features.astype(jnp.float32), axis=1)
        return self.logit(jax.nn.silu(self.hidden(layers.layer_norm(pooled, self.eps))))[:, 0].astype(jnp.float32)
