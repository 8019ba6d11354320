"""ernie-jax: ERNIE-Image in JAX/Flax.

The public faces are attributes of the package, imported on first use (PEP 562), so `import ernie_jax`
costs no JAX import until one of them is touched:

- `ErnieImagePipeline` (and its output `ErnieImagePipelineOutput`): the whole text-to-image pipeline.
- `load_transformer`, `load_vae`, `load_text_encoder`, `load_prompt_enhancer`: one model from a diffusers
  folder, a single checkpoint file or a converted (Orbax) folder.
- `ErnieImageConfig`, `ErnieImageTransformer`: the DiT's config and module.
- `sampling` (sigma schedules, the Euler/CFG loop) and `parallel` (meshes, logical-axis rules).
"""

from __future__ import annotations

import importlib

# Public name -> "module:attribute" (or "module" for a submodule).
_EXPORTS = {
    "ErnieImagePipeline": "ernie_jax.pipeline:ErnieImagePipeline",
    "ErnieImagePipelineOutput": "ernie_jax.pipeline:ErnieImagePipelineOutput",
    "ErnieImageConfig": "ernie_jax.models.dit:ErnieImageConfig",
    "ErnieImageTransformer": "ernie_jax.models.dit:ErnieImageTransformer",
    "load_transformer": "conversions.transformer:load_transformer",
    "load_vae": "conversions.vae:load_vae",
    "load_text_encoder": "conversions.mistral:load_text_encoder",
    "load_prompt_enhancer": "conversions.mistral:load_prompt_enhancer",
    "sampling": "ernie_jax.sampling",
    "parallel": "ernie_jax.parallel",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ernie_jax' has no attribute {name!r}")
    module_name, _, attribute = _EXPORTS[name].partition(":")
    value = importlib.import_module(module_name)
    if attribute:
        value = getattr(value, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
