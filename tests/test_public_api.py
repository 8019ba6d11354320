"""The package top exports the public faces the README and DESIGN.md use, without importing JAX early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_public_names_are_the_implementations():
    import conversions.mistral
    import conversions.transformer
    import conversions.vae
    import ernie_jax
    from ernie_jax import models, parallel, pipeline, sampling

    assert ernie_jax.ErnieImagePipeline is pipeline.ErnieImagePipeline
    assert ernie_jax.ErnieImagePipelineOutput is pipeline.ErnieImagePipelineOutput
    assert ernie_jax.ErnieImageTransformer is models.dit.ErnieImageTransformer
    assert ernie_jax.ErnieImageConfig is models.dit.ErnieImageConfig
    assert ernie_jax.load_transformer is conversions.transformer.load_transformer
    assert ernie_jax.load_vae is conversions.vae.load_vae
    assert ernie_jax.load_text_encoder is conversions.mistral.load_text_encoder
    assert ernie_jax.load_prompt_enhancer is conversions.mistral.load_prompt_enhancer
    assert ernie_jax.sampling is sampling and ernie_jax.parallel is parallel
    assert set(ernie_jax.__all__) <= set(dir(ernie_jax))
    with pytest.raises(AttributeError, match="no attribute 'ErnieImagePipe'"):
        ernie_jax.ErnieImagePipe  # noqa: B018


def test_import_is_cheap_until_a_name_is_used():
    code = ("import sys, ernie_jax; heavy = [m for m in ('jax', 'flax', 'torch') if m in sys.modules]; "
            "assert not heavy, heavy; ernie_jax.ErnieImagePipeline; assert 'jax' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
