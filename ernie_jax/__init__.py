"""ernie-jax: ERNIE-Image in JAX/Flax."""

from ernie_jax import sampling
from ernie_jax.models.dit import ErnieImageConfig, ErnieImageTransformer


def load_transformer(path, dtype="float32", **kwargs) -> ErnieImageTransformer:
    """Loads the ERNIE-Image transformer from a diffusers folder, a single safetensors file or a converted
    checkpoint; see `conversions.transformer.load_transformer` for the options."""
    from conversions.transformer import load_transformer as load

    return load(path, dtype, **kwargs)


__all__ = ["ErnieImageConfig", "ErnieImageTransformer", "load_transformer", "sampling"]
