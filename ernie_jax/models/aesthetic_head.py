"""The LAION improved aesthetic predictor's head (christophschuhmann/improved-aesthetic-predictor, the
`sac+logos+ava1-l14-linearMSE.pth` release): an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

`nn.Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
Linear(64, 16), Linear(16, 1))`: no nonlinearities, so the head is an affine map written as five matmuls; the
dropouts do nothing at inference and are not modelled. Trained with MSE on mean ratings (1-10) of SAC, LOGOS
and AVA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.models import layers
from ernie_jax.models.compiled import compiled_method

LAION_WIDTHS = (768, 1024, 128, 64, 16, 1)


class AestheticHead(nnx.Module):
    """Linear layers of `widths` (in, hidden..., 1) applied in turn: `embedding [B, widths[0]] -> score [B]`.

    The head is under a million parameters, so every weight is replicated (no logical axis names).
    """

    def __init__(self, widths: tuple[int, ...] = LAION_WIDTHS, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if len(widths) < 2 or widths[-1] != 1 or min(widths) < 1:
            raise ValueError(f"widths must be positive, at least two, and end in 1; got {widths}")
        self.widths = tuple(widths)
        self.projections = nnx.List([
            layers.linear(fan_in, fan_out, axes=(None, None), use_bias=True, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs) for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True)])

    @compiled_method
    def __call__(self, embedding) -> jax.Array:
        embedding = jnp.asarray(embedding)
        if embedding.ndim != 2 or embedding.shape[1] != self.widths[0]:
            raise ValueError(f"embedding {embedding.shape} must be [B, {self.widths[0]}]")
        for projection in self.projections:
            embedding = projection(embedding)
        return embedding[:, 0]


def l2_normalize(embedding: jax.Array) -> jax.Array:
    """`embedding / ||embedding||` over the last axis in fp32, a zero vector left as it is (the predictor's
    `normalized`)."""
    embedding = jnp.asarray(embedding, jnp.float32)
    norm = jnp.linalg.norm(embedding, axis=-1, keepdims=True)
    return embedding / jnp.where(norm == 0, 1.0, norm)
