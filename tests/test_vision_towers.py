"""CLIP and SigLIP image towers and their preprocessing against transformers, on tiny random models.

The image processors are transformers' PIL backends (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`): the
default ("fast") processors need torchvision, which the test environment does not install.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conversions import vision_tower as weights
from conversions.safetensors_io import CheckpointError, write_safetensors
from ernie_jax.models.vision_tower import VisionTowerConfig
from tests.conftest import relative_error

FP32_TOLERANCE = 1e-5
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
# SigLIP at 36 px in patches of 8: the convolution leaves the last 4 rows and columns unread, as so400m's 384 px
# in patches of 14 do.
SIGLIP_VISION = dict(VISION, image_size=36)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
# A legacy-format CLIP preprocessor (ints for size and crop, a feature extractor's name), as
# openai/clip-vit-large-patch14 ships, scaled to the tiny tower: shortest edge 36, centre crop 32.
CLIP_PREPROCESSOR = {"feature_extractor_type": "CLIPFeatureExtractor", "size": 36, "crop_size": 32, "resample": 3,
                     "do_resize": True, "do_center_crop": True, "do_normalize": True,
                     "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711]}
SIGLIP_PREPROCESSOR = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 36, "width": 36},
                       "resample": 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                       "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def randomise(model, seed):
    """Norm weights and every bias perturbed (they start at 1 and 0), so that each is tested."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(0.2 * torch.randn_like(param))
            elif name.endswith("bias") or "in_proj_bias" in name:
                param.normal_(0.0, 0.1)
    return model.eval()


def save(model, folder, preprocessor):
    model.save_pretrained(folder)
    (folder / weights.PREPROCESSOR_NAME).write_text(json.dumps(preprocessor))
    return folder


def images(seed=0):
    """A landscape RGB image, a portrait RGBA one (transparency composited onto white) and a grayscale one."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (45, 33, 4), dtype=np.uint8), mode="RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), mode="L")
    return [rgb, rgba, gray]


@pytest.fixture(scope="module")
def clip_reference():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)
    return randomise(CLIPModel(config), 100)


@pytest.fixture(scope="module")
def siglip_reference():
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(1)
    return randomise(SiglipModel(SiglipConfig(vision_config=SIGLIP_VISION, text_config=TEXT)), 101)


@pytest.fixture(scope="module")
def clip_folder(clip_reference, tmp_path_factory):
    return save(clip_reference, tmp_path_factory.mktemp("clip"), CLIP_PREPROCESSOR)


@pytest.fixture(scope="module")
def siglip_folder(siglip_reference, tmp_path_factory):
    return save(siglip_reference, tmp_path_factory.mktemp("siglip"), SIGLIP_PREPROCESSOR)


def reference_pixels(processor_class, folder):
    processor = processor_class.from_pretrained(folder)
    return processor(images=images(), return_tensors="np")["pixel_values"]


def vision_outputs(model, pixels):
    with torch.no_grad():
        return model.vision_model(pixel_values=torch.from_numpy(pixels))


def test_clip_preprocessing_matches_processor(clip_folder):
    from transformers import CLIPImageProcessorPil

    expected = reference_pixels(CLIPImageProcessorPil, clip_folder)
    ours = weights.load_image_preprocessor(clip_folder)(images())
    assert ours.shape == expected.shape == (3, 3, 32, 32) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


def test_siglip_preprocessing_matches_processor(siglip_folder):
    from transformers import SiglipImageProcessorPil

    expected = reference_pixels(SiglipImageProcessorPil, siglip_folder)
    ours = weights.load_image_preprocessor(siglip_folder)(images())
    assert ours.shape == expected.shape == (3, 3, 36, 36)
    np.testing.assert_array_equal(ours, expected)


def test_clip_tower_matches_transformers(clip_reference, clip_folder):
    from transformers import CLIPImageProcessorPil

    pixels = reference_pixels(CLIPImageProcessorPil, clip_folder)
    with torch.no_grad():
        expected_embeds = clip_reference.get_image_features(pixel_values=torch.from_numpy(pixels))
    expected = vision_outputs(clip_reference, pixels)
    model = weights.load_vision_tower(clip_folder)
    assert model.config.projection_dim == 16
    out = model(weights.load_image_preprocessor(clip_folder)(images()))
    assert relative_error(out.last_hidden_state, expected.last_hidden_state.numpy()) <= FP32_TOLERANCE
    assert relative_error(out.pooler_output, expected.pooler_output.numpy()) <= FP32_TOLERANCE
    expected_embeds = getattr(expected_embeds, "pooler_output", expected_embeds)  # an output object in some versions
    assert relative_error(out.image_embeds, expected_embeds.numpy()) <= FP32_TOLERANCE


def test_siglip_tower_matches_transformers(siglip_reference, siglip_folder):
    from transformers import SiglipImageProcessorPil

    pixels = reference_pixels(SiglipImageProcessorPil, siglip_folder)
    expected = vision_outputs(siglip_reference, pixels)
    model = weights.load_vision_tower(siglip_folder)
    out = model(weights.load_image_preprocessor(siglip_folder)(images()))
    assert relative_error(out.last_hidden_state, expected.last_hidden_state.numpy()) <= FP32_TOLERANCE
    assert relative_error(out.pooler_output, expected.pooler_output.numpy()) <= FP32_TOLERANCE
    np.testing.assert_array_equal(out.image_embeds, out.pooler_output)


def test_vision_only_layouts_load_the_same_weights(clip_reference, siglip_reference, tmp_path):
    """CLIPVisionModelWithProjection (`vision_model.` + projection), CLIPVisionModel and SiglipVisionModel
    (transformers 5: top-level keys) folders give the outputs of the full models they were cut from."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    pixels = np.random.default_rng(3).normal(size=(2, 3, 32, 32)).astype(np.float32)
    siglip_pixels = np.random.default_rng(3).normal(size=(2, 3, 36, 36)).astype(np.float32)
    with_projection = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION, projection_dim=16))
    with_projection.load_state_dict({**{f"vision_model.{k}": v for k, v in clip_reference.vision_model.state_dict().items()},
                                     "visual_projection.weight": clip_reference.visual_projection.weight})
    folders = {"clip_projection": save(with_projection, tmp_path / "a", CLIP_PREPROCESSOR),
               "clip_plain": save(clip_reference.vision_model, tmp_path / "b", CLIP_PREPROCESSOR),
               "siglip_plain": save(siglip_reference.vision_model, tmp_path / "c", SIGLIP_PREPROCESSOR)}
    assert "visual_projection.weight" not in json.dumps(sorted(clip_reference.vision_model.state_dict()))
    with torch.no_grad():
        clip_embeds = with_projection(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
    clip_expected = vision_outputs(clip_reference, pixels)
    siglip_expected = vision_outputs(siglip_reference, siglip_pixels)

    out = weights.load_vision_tower(folders["clip_projection"])(pixels)
    assert relative_error(out.image_embeds, clip_embeds) <= FP32_TOLERANCE
    out = weights.load_vision_tower(folders["clip_plain"])(pixels)
    assert out.image_embeds is None
    assert relative_error(out.pooler_output, clip_expected.pooler_output.numpy()) <= FP32_TOLERANCE
    out = weights.load_vision_tower(folders["siglip_plain"])(siglip_pixels)
    assert relative_error(out.pooler_output, siglip_expected.pooler_output.numpy()) <= FP32_TOLERANCE


def test_unrolled_layers_equal_scanned(clip_folder):
    pixels = np.random.default_rng(4).normal(size=(1, 3, 32, 32)).astype(np.float32)
    scanned = weights.load_vision_tower(clip_folder)(pixels)
    unrolled = weights.load_vision_tower(clip_folder, scan_layers=False)(pixels)
    assert relative_error(unrolled.last_hidden_state, scanned.last_hidden_state) <= 1e-6


def test_config_disagreeing_with_weights_is_named(clip_folder, tmp_path):
    folder = tmp_path / "one_layer"
    folder.mkdir()
    config = json.loads((clip_folder / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(clip_folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensors the config does not expect .*encoder.layers.1"):
        weights.open_vision_tower(folder)


def test_bad_folders_are_named(tmp_path):
    folder = tmp_path / "not_a_tower"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    write_safetensors(folder / "model.safetensors", {"something.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="not a CLIP or SigLIP vision checkpoint"):
        weights.open_vision_tower(folder)
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        weights.load_image_preprocessor(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ViTImageProcessor"}))
    with pytest.raises(CheckpointError, match="ViTImageProcessor.*not supported"):
        weights.load_image_preprocessor(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type must be one of"):
        weights.open_vision_tower(folder)


def test_wrong_image_size_is_refused(siglip_folder):
    model = weights.load_vision_tower(siglip_folder)
    with pytest.raises(ValueError, match=r"must be \[B, 3, 36, 36\]"):
        model(np.zeros((1, 3, 40, 40), np.float32))


def test_config_from_legacy_clip_json():
    """openai/clip-vit-large-patch14's config.json carries the vision numbers in `vision_config_dict` too."""
    config = VisionTowerConfig.from_hf_config({
        "model_type": "clip", "projection_dim": 768, "vision_config": {"hidden_size": 768},
        "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                               "num_hidden_layers": 24, "patch_size": 14}})
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.projection_dim) == (1024, 24, 14, 768)
    assert (config.hidden_act, config.layer_norm_eps, config.image_size) == ("quick_gelu", 1e-5, 224)
