"""The released 8B configuration, checked by shape only (no memory is allocated)."""

from __future__ import annotations

import jax
import numpy as np
import torch
from flax import nnx

from conversions import transformer as weights
from ernie_jax.models.dit import PRESETS, abstract_transformer

RELEASED_PARAMETERS = 8_033_490_048
# 11 tensors per block x 36 + 13 others. (The reference doc's "373" undercounts by one tensor per block;
# diffusers itself has 409, which also fits the hub index's 416 lines with no extra keys.)
RELEASED_TENSORS = 409


def test_released_config_keys_and_shapes_match_diffusers():
    from diffusers import ErnieImageTransformer2DModel

    config = PRESETS["full"]
    with torch.device("meta"):
        reference = ErnieImageTransformer2DModel(**config.to_dict())
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = weights.expected_torch_shapes(config)
    assert len(ours) == RELEASED_TENSORS
    assert ours == expected

    params = nnx.state(abstract_transformer(config), nnx.Param)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == RELEASED_PARAMETERS
