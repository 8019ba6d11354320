"""An aesthetic scorer as the DPO pair maker's reward (`evaluation.rewards.AestheticReward`, chosen in a config
as `pairs.reward = "aesthetic:laion:CLIP_FOLDER,HEAD_FILE"`), on a tiny random CLIP and a random head saved to
files. The reference scores are transformers' CLIP image features, L2-normalised in numpy, through the torch
head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ernie_jax.evaluation.rewards import AestheticReward, load_reward
from tests.test_laion_head import predictor_normalized, torch_head
from tests.test_vision_towers import CLIP_PREPROCESSOR, TEXT, VISION, randomise, save

FP32_TOLERANCE = 1e-5


def write_tiny_scorer(folder):
    """A tiny random CLIP folder and a LAION head .pth under `folder`: (CLIP folder, head file, the reference
    scorer of uint8 images [N, H, W, 3])."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(3)
    clip = randomise(CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=768)), 103)
    clip_folder = save(clip, folder / "clip", CLIP_PREPROCESSOR)
    head = torch_head(seed=4)
    with torch.no_grad():
        # Without biases the random head's output is the embedding's projection alone, so images' scores differ
        # by as much as the scores themselves and a ranking is far above float error.
        for layer in head.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.bias.zero_()
    torch.save(head.state_dict(), folder / "head.pth")
    processor = CLIPImageProcessorPil.from_pretrained(clip_folder)

    def reference(images):
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = clip.get_image_features(pixel_values=pixels)
            features = getattr(features, "pooler_output", features).numpy()
            embeddings = torch.from_numpy(predictor_normalized(features).astype(np.float32))
            return head(embeddings)[:, 0].numpy().astype(np.float64)

    return clip_folder, folder / "head.pth", reference


@pytest.fixture(scope="module")
def scorer_files(tmp_path_factory):
    return write_tiny_scorer(tmp_path_factory.mktemp("scorer"))


def test_the_reward_is_the_scorers_score(scorer_files):
    clip_folder, head_file, reference = scorer_files
    reward = load_reward(f"aesthetic:laion:{clip_folder},{head_file}")
    assert isinstance(reward, AestheticReward)
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    stripes = np.zeros((40, 40, 3), np.uint8)
    stripes[::4] = (250, 30, 30)
    images = np.stack([noise, stripes, np.full((40, 40, 3), 200, np.uint8)])
    rewards = reward(images, ["a", "b", "c"])
    expected = reference(images)
    assert rewards.shape == (3,) and rewards.dtype == np.float64
    np.testing.assert_allclose(rewards, expected, rtol=0, atol=FP32_TOLERANCE * np.abs(expected).max())
    assert np.ptp(expected) > 1000 * FP32_TOLERANCE * np.abs(expected).max()
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        reward(images, ["a", "b"])
    with pytest.raises(ValueError, match="CLIP folder .*missing does not exist"):
        load_reward(f"aesthetic:laion:{clip_folder}-missing,{head_file}")
    with pytest.raises(ValueError, match="expected KIND:ARGUMENT with KIND one of"):
        load_reward("aesthetic:other:folder")


def test_the_pairs_stage_ranks_samples_by_the_scorer(scorer_files, random_pipeline_folder, tmp_path):
    from experiments.tiny_shapes_dpo import get_config
    from ernie_jax.data.preferences import PreferenceSource
    from ernie_jax.pipeline import ErnieImagePipeline
    from ernie_jax.runner.stages import run as run_stages
    from ernie_jax.runner.stages.pairs import folders

    clip_folder, head_file, reference = scorer_files
    config = get_config("tiny")
    config.stages = ("pairs",)
    config.components.update(kind="pretrained", path=str(random_pipeline_folder))
    config.pairs.update(reward=f"aesthetic:laion:{clip_folder},{head_file}", samples_per_prompt=3)
    experiment = run_stages(config, tmp_path / "work")
    source = PreferenceSource(folders(experiment)[0])
    pipeline = ErnieImagePipeline.from_pretrained(random_pipeline_folder, dtype="float32")
    assert len(source) == 2
    for position in range(len(source)):
        record = source[position]
        origin = record["origin"]
        sample_rewards = np.array(origin["sample_rewards"])
        assert origin["chosen"] == int(np.argmax(sample_rewards))
        assert origin["rejected"] == int(np.argmin(sample_rewards))
        # The stored chosen and rejected images, decoded as the pair maker decodes them, scored by the reference.
        images = (np.asarray(pipeline.decode_latents(record["latents"])) * 255).round().astype(np.uint8)
        expected = reference(images)
        np.testing.assert_allclose(origin["rewards"], expected, rtol=0, atol=1e-4 * np.abs(expected).max())
        assert expected[0] > expected[1]
        assert sample_rewards.max() - sample_rewards.min() > 0.01 * np.abs(sample_rewards).max()
