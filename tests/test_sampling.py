"""The sampler against diffusers' FlowMatchEulerDiscreteScheduler and ErnieImagePipeline's loop."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import ernie_jax
from ernie_jax import sampling
from tests.conftest import TINY, pad_text, relative_error

LOOP_TOLERANCE = 1e-4  # max abs difference of the final latents, fp32 (measured: ~1e-6)
# bf16 8-step loop vs the reference's bf16 loop, relative. Measured 5.4e-3 to 6.5e-3 over four seeds on
# the tiny model, whose own bf16 vs fp32 gap is 2.7e-2 to 3.0e-2 (50 steps with CFG: 0.9e-2 to 1.1e-2).
BF16_LOOP_TOLERANCE = 1.2e-2


def reference_scheduler(shift=4.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@pytest.mark.parametrize("shift", [4.0, 3.0, 1.0])
def test_sigmas_match_scheduler_bit_for_bit(shift):
    scheduler = reference_scheduler(shift)
    for steps in list(range(1, 101)) + [128, 250, 1000]:
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1])
        np.testing.assert_array_equal(sampling.flow_match_sigmas(steps, shift), scheduler.sigmas.numpy(),
                                      err_msg=f"steps={steps}")


def test_sigmas_reject_bad_values():
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampling.flow_match_sigmas(0)
    with pytest.raises(ValueError, match="shift"):
        sampling.flow_match_sigmas(8, shift=0.0)


def reference_pipeline(reference):
    from diffusers import ErnieImagePipeline

    return ErnieImagePipeline(transformer=reference, vae=None, text_encoder=None, tokenizer=None,
                              scheduler=reference_scheduler())


def embeddings(seed, lengths, width=TINY["text_in_dim"]):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, width, generator=generator) for n in lengths]


def run_both(reference, model, latents, positive, negative, steps, guidance, dtype=torch.float32):
    pipe = reference_pipeline(reference.to(dtype))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, latents=latents.to(dtype),
                    height=16 * latents.shape[2], width=16 * latents.shape[3], num_inference_steps=steps,
                    guidance_scale=guidance, output_type="latent", use_pe=False).images.float().numpy()
    text, text_lens = pad_text([p.numpy() for p in positive])
    negative_text, negative_lens = pad_text([n.numpy() for n in negative])
    actual = sampling.sample(model, latents.float().numpy(), text, text_lens, negative_text_bth=negative_text,
                             negative_text_lens=negative_lens, num_inference_steps=steps, guidance_scale=guidance)
    return np.asarray(actual, np.float32), expected


def test_50_step_cfg_loop_matches_pipeline(tiny_reference, tiny_folder):
    latents = torch.randn(2, 128, 4, 6, generator=torch.Generator().manual_seed(0))
    actual, expected = run_both(tiny_reference, ernie_jax.load_transformer(tiny_folder), latents,
                                embeddings(1, [5, 9]), embeddings(2, [1, 2]), steps=50, guidance=4.0)
    assert np.abs(actual - expected).max() <= LOOP_TOLERANCE
    # CFG really happened: the same loop without guidance ends elsewhere.
    unguided, _ = run_both(tiny_reference, ernie_jax.load_transformer(tiny_folder), latents,
                           embeddings(1, [5, 9]), embeddings(2, [1, 2]), steps=50, guidance=1.0)
    assert np.abs(unguided - expected).max() > 100 * LOOP_TOLERANCE


def test_8_step_turbo_loop_matches_pipeline(tiny_reference, tiny_folder):
    latents = torch.randn(1, 128, 5, 3, generator=torch.Generator().manual_seed(3))
    actual, expected = run_both(tiny_reference, ernie_jax.load_transformer(tiny_folder), latents,
                                embeddings(4, [6]), embeddings(5, [1]), steps=8, guidance=1.0)
    assert np.abs(actual - expected).max() <= LOOP_TOLERANCE


def test_8_step_loop_bf16_drift(tiny_folder):
    from tests.conftest import reference_transformer

    latents = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(6))
    actual, expected = run_both(reference_transformer(), ernie_jax.load_transformer(tiny_folder, "bfloat16"),
                                latents, embeddings(7, [6]), embeddings(8, [1]), steps=8, guidance=1.0,
                                dtype=torch.bfloat16)
    assert relative_error(actual, expected) <= BF16_LOOP_TOLERANCE


def test_compiled_once_per_shape_and_step_count(tiny_folder):
    jax.clear_caches()  # another test file on this pytest worker may have compiled the 4-step program
    model = ernie_jax.load_transformer(tiny_folder)
    rng = np.random.default_rng(0)
    text, text_lens = pad_text([rng.standard_normal((4, TINY["text_in_dim"]), np.float32)])
    negative, negative_lens = pad_text([rng.standard_normal((1, TINY["text_in_dim"]), np.float32)])

    def run(seed, guidance, steps=3, size=(3, 3)):
        latents = np.random.default_rng(seed).standard_normal((1, 128, *size), np.float32)
        return sampling.sample(model, latents, text, text_lens, negative_text_bth=negative,
                               negative_text_lens=negative_lens, num_inference_steps=steps,
                               guidance_scale=guidance)

    run(0, 4.0)
    compiled = sampling._denoise_loop_jit._cache_size()
    run(1, 4.0)
    run(2, 2.5)  # the guidance scale is a runtime value
    assert sampling._denoise_loop_jit._cache_size() == compiled
    run(3, 4.0, steps=4)
    assert sampling._denoise_loop_jit._cache_size() == compiled + 1


def test_cfg_needs_negative_features(tiny_folder):
    model = ernie_jax.load_transformer(tiny_folder)
    latents = np.zeros((1, 128, 2, 2), np.float32)
    text, text_lens = np.zeros((1, 3, TINY["text_in_dim"]), np.float32), np.array([3])
    with pytest.raises(ValueError, match="negative_text_bth"):
        sampling.sample(model, latents, text, text_lens, guidance_scale=4.0)
    with pytest.raises(ValueError, match="latents"):
        sampling.sample(model, latents[:, :5], text, text_lens, guidance_scale=1.0)
