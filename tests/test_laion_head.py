"""The LAION aesthetic predictor's head and the composed scorer against torch on tiny random models.

The torch head is the released `nn.Sequential` built here; the scorer's reference is transformers' CLIP
(`CLIPImageProcessorPil`, `CLIPModel.get_image_features`), the predictor's normalisation in numpy, then that head.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from conversions import laion_aesthetic
from conversions.safetensors_io import CheckpointError
from ernie_jax.aesthetics.laion import LaionAestheticScorer
from ernie_jax.data.image_preprocess import ImagePreprocessor
from ernie_jax.models.aesthetic_head import AestheticHead
from ernie_jax.models.vision_tower import VisionTowerConfig, abstract_vision_tower
from tests.conftest import relative_error
from tests.test_vision_towers import CLIP_PREPROCESSOR, TEXT, VISION, images, randomise, save

FP32_TOLERANCE = 1e-5


def torch_head(seed=0):
    """The released predictor's MLP (its `layers` attribute, so the state-dict keys are `layers.N.*`)."""

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(seed)
    return MLP().eval()


def predictor_normalized(a):
    """The predictor's `normalized(a, axis=-1, order=2)` (zero vectors left as they are)."""
    norm = np.atleast_1d(np.linalg.norm(a, 2, -1))
    norm[norm == 0] = 1
    return a / np.expand_dims(norm, -1)


@pytest.fixture(scope="module")
def head_reference():
    return torch_head()


@pytest.fixture(scope="module")
def head_pth(head_reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head_reference.state_dict(), path)
    return path


def reference_scores(head, embeddings):
    with torch.no_grad():
        return head(torch.from_numpy(np.asarray(embeddings, np.float32)))[:, 0].numpy()


def test_state_dict_keys_are_the_released_ones(head_reference):
    assert laion_aesthetic.expected_torch_shapes() == {k: tuple(v.shape) for k, v in head_reference.state_dict().items()}


def test_head_matches_torch(head_reference, head_pth):
    embeddings = predictor_normalized(np.random.default_rng(0).normal(size=(5, 768))).astype(np.float32)
    head = laion_aesthetic.load_laion_head(head_pth)
    scores = np.asarray(head(embeddings))
    assert scores.shape == (5,)
    assert relative_error(scores, reference_scores(head_reference, embeddings)) <= FP32_TOLERANCE


def test_safetensors_copy_loads_the_same_head(head_pth, tmp_path):
    destination = tmp_path / "head.safetensors"
    laion_aesthetic.main([str(head_pth), str(destination)])
    embeddings = np.random.default_rng(1).normal(size=(3, 768)).astype(np.float32)
    from_pth = np.asarray(laion_aesthetic.load_laion_head(head_pth)(embeddings))
    np.testing.assert_array_equal(np.asarray(laion_aesthetic.load_laion_head(destination)(embeddings)), from_pth)
    with pytest.raises(CheckpointError, match="already exists"):
        laion_aesthetic.main([str(head_pth), str(destination)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.safetensors"]  # no staging file left


def test_scorer_matches_clip_and_torch_head(head_reference, head_pth, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(2)
    clip = randomise(CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=768)), 102)
    folder = save(clip, tmp_path / "clip", CLIP_PREPROCESSOR)
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = clip.get_image_features(pixel_values=pixels)
    features = getattr(features, "pooler_output", features).numpy()  # an output object in some versions
    expected = reference_scores(head_reference, predictor_normalized(features))

    scorer = LaionAestheticScorer.from_pretrained(folder, head_pth, batch_size=2)  # 3 images: the last batch padded
    embeddings = scorer.embed(images())
    assert relative_error(embeddings, predictor_normalized(features)) <= FP32_TOLERANCE
    scores = scorer(images(), prompts=["unused"] * 3)
    assert scores.shape == (3,) and scores.dtype == np.float64
    assert relative_error(scores, expected) <= FP32_TOLERANCE
    # The random head's biases dominate its output; the images' scores must still differ well beyond the error.
    assert np.ptp(expected) > 100 * FP32_TOLERANCE * np.abs(expected).max()
    arrays = np.stack([np.asarray(image.convert("RGB").resize((32, 32))) for image in images()])
    assert scorer(arrays).shape == (3,)  # one uint8 [N, H, W, 3] array works as well as a list


def test_bad_head_files_are_named(head_reference, tmp_path):
    wrong = {k: v[:, :512] if k == "layers.0.weight" else v for k, v in head_reference.state_dict().items()}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"layers.0.weight \(1024, 512\) \(expected \(1024, 768\)\)"):
        laion_aesthetic.load_laion_head(tmp_path / "wrong.pth")
    torch.save({"layers.0.weight": [1, 2]}, tmp_path / "lists.pth")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        laion_aesthetic.load_laion_head(tmp_path / "lists.pth")
    (tmp_path / "head.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="expected a .pth, .pt or .safetensors"):
        laion_aesthetic.load_laion_head(tmp_path / "head.bin")


def test_scorer_refuses_a_tower_of_another_width():
    # Shapes only: the check reads the configs, no weights.
    tower = abstract_vision_tower(VisionTowerConfig(family="clip", hidden_act="quick_gelu", layer_norm_eps=1e-5,
                                                    projection_dim=16, **VISION))
    head = nnx.eval_shape(lambda: AestheticHead(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="reads 768-d embeddings but the tower projects to 16"):
        LaionAestheticScorer(tower, head, ImagePreprocessor.from_config(CLIP_PREPROCESSOR))
