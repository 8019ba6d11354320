"""The from-scratch frozen components of the shapes experiment: VAE training, latent statistics, the caption
tokenizer, random text features, and the pipeline folder they are written to."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ernie_jax.data import shapes
from ernie_jax.evaluation.shapes_detector import score_images
from ernie_jax.models.vae import encode_to_packed_latents
from ernie_jax.pipeline import ErnieImagePipeline
from ernie_jax.tokenizer import Tokenizer
from ernie_jax.training import autoencoder, components

SMALL = shapes.ShapesConfig(height=32, width=32)
STEPS, BATCH, STATS_IMAGES = 40, 8, 64
# Whole-pipeline images from the same latents, fp32, in [0, 1] units (as tests/test_pipeline.py).
IMAGE_TOLERANCE = 0.05 / 255


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    training = autoencoder.AutoencoderTrainConfig(num_steps=STEPS, learning_rate=2e-3, warmup_steps=5)
    return components.build_components(tmp_path_factory.mktemp("components") / "pipeline", shapes_config=SMALL,
                                       vae_training=training, batch_size=BATCH, stats_images=STATS_IMAGES)


def test_vae_loss_decreases(built):
    losses = {entry["step"]: entry["loss"] for entry in built.vae_history}
    assert losses[STEPS] < 0.25 * losses[1], losses


def test_latent_stats_normalise_the_fitting_sample(built):
    images = np.concatenate(list(itertools.islice(
        components.image_batches(SMALL, BATCH, start=STEPS * BATCH), STATS_IMAGES // BATCH)))
    latents = np.asarray(encode_to_packed_latents(built.vae, autoencoder.to_model_images(images)))
    assert latents.shape == (STATS_IMAGES, 128, 4, 4)
    assert np.abs(latents.mean(axis=(0, 2, 3))).max() < 0.1
    assert np.abs(latents.std(axis=(0, 2, 3)) - 1).max() < 0.1
    # Not trivially normalised: the raw latents had other statistics.
    assert np.abs(np.asarray(built.vae.bn.running_var[...]) - 1).max() > 0.1


def test_tokenizer_ids_match_transformers(tmp_path):
    from transformers import AutoTokenizer

    components.write_caption_tokenizer(tmp_path / "tokenizer", shapes.prompt_vocabulary())
    ours = Tokenizer.from_folder(tmp_path / "tokenizer")
    reference = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (components.BOS_ID, components.EOS_ID,
                                                                          components.PAD_ID)
    seen = set()
    for word in shapes.prompt_vocabulary():
        ids = ours.encode(word)
        assert ids == reference(word)["input_ids"]
        assert len(ids) == 2 and ids[0] == components.BOS_ID and ids[1] != components.UNK_ID, (word, ids)
        assert ours.decode(ids) == word
        seen.add(ids[1])
    assert len(seen) == len(shapes.prompt_vocabulary())
    caption = 'two red circles at the top left, the center and the bottom right and the word "SUN" at the top'
    ids = ours.encode(caption)
    assert ids == reference(caption)["input_ids"]
    assert len(ids) == 1 + len(shapes.caption_tokens(caption)) and components.UNK_ID not in ids
    assert ours.encode("a purple circle")[2] == components.UNK_ID


def test_random_text_features_tell_captions_apart(built):
    captions = sorted({c for c, _ in shapes.heldout_prompts(SMALL, 200)})
    features = components.encode_captions(built.text_encoder, built.tokenizer, captions)
    assert len(captions) > 100
    assert components.feature_separation(features) > 0.05


def test_folder_loads_in_ernie_jax_and_diffusers(built):
    from diffusers import ErnieImagePipeline as ReferencePipeline

    reference = ReferencePipeline.from_pretrained(built.folder, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    ours = ErnieImagePipeline.from_pretrained(built.folder, dtype="float32")
    np.testing.assert_array_equal(np.asarray(ours.vae.bn.running_var[...]),
                                  np.asarray(built.vae.bn.running_var[...]))
    prompts = ["a red circle at the top left", 'the word "CAT" at the center']
    # 4x4 latent tokens make 32x32 images with this x4 VAE (8 pixels per token, as diffusers computes it).
    latents = torch.randn(2, 128, 4, 4, generator=torch.Generator().manual_seed(0))
    kwargs = {"prompt": prompts, "num_inference_steps": 2, "guidance_scale": 2.0, "output_type": "np",
              "use_pe": False}
    expected = reference(latents=latents, height=32, width=32, **kwargs).images
    actual = ours(latents=latents.numpy(), height=32, width=32, **kwargs).images
    assert actual.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(actual - expected).max() <= IMAGE_TOLERANCE
    assert expected.std() > 0.01


def test_full_vae_stage_keeps_what_the_detector_reads(tmp_path):
    config = shapes.ShapesConfig()
    built = components.build_components(tmp_path / "pipeline", shapes_config=config)
    records = [shapes.make_example(config, "heldout", i) for i in range(200)]
    images = np.stack([r["image"] for r in records])
    scores = score_images([r["spec"] for r in records], autoencoder.reconstruct(built.vae, images))
    for metric in ("colour", "shape", "position", "count", "object"):
        assert scores[metric] >= 0.95, scores
    assert scores["text"] >= 0.95, scores
