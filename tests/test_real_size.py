"""The released 8B configuration, checked by shape only (no memory is allocated)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
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


# The config.json numbers of the released CLIP ViT-L/14 (openai/clip-vit-large-patch14, the LAION aesthetic
# predictor's tower) and SigLIP so400m (google/siglip-so400m-patch14-384); unlisted keys take transformers'
# defaults, as they do for those files.
CLIP_VIT_L_14 = {
    "model_type": "clip", "projection_dim": 768,
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                    "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "projection_dim": 768},
}
SIGLIP_SO400M_384 = {
    "model_type": "siglip",
    "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                    "max_position_embeddings": 64, "vocab_size": 32000},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "image_size": 384},
}


@pytest.mark.parametrize("values", [CLIP_VIT_L_14, SIGLIP_SO400M_384], ids=["clip_vit_l_14", "siglip_so400m_384"])
def test_released_vision_towers_keys_and_shapes_match_transformers(values):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from conversions import vision_tower
    from ernie_jax.models.vision_tower import VisionTowerConfig, abstract_vision_tower

    config_class, model_class = (CLIPConfig, CLIPModel) if values["model_type"] == "clip" else (SiglipConfig, SiglipModel)
    with torch.device("meta"):
        reference = model_class(config_class.from_dict(values))
    # The vision tower's tensors (relative to vision_model.) and CLIP's projection; the text tower is not ours.
    expected = {key.removeprefix("vision_model."): tuple(v.shape) for key, v in reference.state_dict().items()
                if key.startswith("vision_model.") or key == "visual_projection.weight"}
    config = VisionTowerConfig.from_hf_config(values)
    assert vision_tower.expected_torch_shapes(config) == expected

    params = nnx.state(abstract_vision_tower(config), nnx.Param)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == sum(int(np.prod(s)) for s in expected.values())
