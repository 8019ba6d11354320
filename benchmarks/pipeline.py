"""End-to-end text-to-image: ernie_jax's ErnieImagePipeline (jitted) vs diffusers' (torch eager).

Both pipelines are loaded from the same random diffusers folder (written here with save_pretrained), get
the same prompt and the same initial latents (drawn in torch), and return output_type="np" images; fp32,
same process, machine and threads. For each size it reports:

  * steady state: seconds per image, warm (compiled), median of A-B-B-A blocks (and the best call), and
    the ratio;
  * ernie_jax time to first image (from_pretrained + first call, compilation included) and the next image
    with a prompt of another length at the same size (no recompilation: checked on the jit caches);
    diffusers' from_pretrained + first image for comparison;
  * the max abs difference between the two pipelines' images (values in [0, 1]);
  * the stages timed separately: text encoding (positive + negative prompt), denoising loop, VAE decode;
  * with --turbo, the same for the 8-step, guidance-1.0 (no CFG) setting;
  * how busy other processes kept the CPUs meanwhile (the torch side suffers most on a shared machine).

Sizes: `tiny` = the test pipeline of tests/reference_pipeline.py (DiT hidden 256 x 2 layers, VAE
(32, 64, 64, 64), 3-layer Mistral of width 64) at 256x256, 50 steps, guidance 4.0; `small` = DiT hidden
1024 x 4 layers, VAE (64, 128, 128, 128), 4-layer Mistral of width 256, at 256x256, 20 steps, guidance 4.0.

    python benchmarks/pipeline.py [--repeats 3] [--only tiny,small] [--turbo] [--no-stages]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import MachineLoad, paired_median_seconds  # noqa: E402
from ernie_jax import pipeline as pipeline_lib  # noqa: E402
from ernie_jax import sampling  # noqa: E402

SIZE = 256
PROMPT = "a photo of a cat sitting on a wooden table, soft light, 35mm"
OTHER_PROMPT = "a blue square at the bottom right"  # another token count, same 64-token text bucket
# (steps, guidance) per size, and of the --turbo setting.
CASES = {"tiny": (50, 4.0), "small": (20, 4.0)}
TURBO = (8, 1.0)
SMALL_DIT = dict(hidden_size=1024, num_attention_heads=8, num_layers=4, ffn_hidden_size=3072, text_in_dim=256)
SMALL_TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=32)


# ------------------------------------------------------------------------------------------- building

def build_small_pipeline(folder: Path) -> None:
    """The `small` random pipeline, built like tests/reference_pipeline.py, saved to `folder / "pipeline"`."""
    from diffusers import AutoencoderKLFlux2, ErnieImagePipeline, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, Mistral3Config, Mistral3Model

    from tests.conftest import reference_transformer
    from tests.reference_pipeline import TEXT, _perturb_norms
    from tests.tokenizer_fixtures import save_tokenizer

    torch.manual_seed(1)
    vae = AutoencoderKLFlux2(block_out_channels=(64, 128, 128, 128), latent_channels=32, layers_per_block=2,
                             norm_num_groups=32, batch_norm_eps=1e-4, patch_size=(2, 2), sample_size=128).eval()
    _perturb_norms(vae, 1)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    torch.manual_seed(1)
    config = Mistral3Config(text_config=dict(model_type="mistral", **{**TEXT, **SMALL_TEXT}), vision_config=dict(
        model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        head_dim=16, patch_size=14, image_size=28))
    text_encoder = Mistral3Model(config).eval()
    _perturb_norms(text_encoder, 1)
    tokenizer = AutoTokenizer.from_pretrained(save_tokenizer(folder / "_tokenizer_src", add_bos=True))
    pipe = ErnieImagePipeline(transformer=reference_transformer(1, **SMALL_DIT), vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, pe=None, pe_tokenizer=None,
                              scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=4.0))
    pipe.save_pretrained(folder / "pipeline")


def build(name: str, folder: Path) -> Path:
    if name == "tiny":
        from tests.reference_pipeline import build_reference_pipeline

        build_reference_pipeline(folder, with_pe=False)
    else:
        build_small_pipeline(folder)
    return folder / "pipeline"


def load_reference(path: Path):
    from diffusers import ErnieImagePipeline

    pipe = ErnieImagePipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_count(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# --------------------------------------------------------------------------------------------- timing

def jit_cache_sizes() -> tuple[int, ...]:
    return tuple(f._cache_size() for f in (pipeline_lib._encode_text, sampling._denoise_loop_jit,
                                           pipeline_lib._decode_images_jit))


def paired_timings(fns, repeats: int) -> list[tuple[float, float]]:
    """(median, best) seconds of each function: `paired_median_seconds`'s A-B-B-A medians, and the fastest
    of all its calls (its untimed warm-up calls included; everything is compiled by then). On this shared
    machine a neighbour's burst can slow one torch call many times over, so the best is printed too."""
    calls = [[] for _ in fns]

    def recorded(fn, record):
        def call():
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
        return call

    medians = paired_median_seconds([recorded(fn, record) for fn, record in zip(fns, calls, strict=True)], repeats)
    return [(median, min(record)) for median, record in zip(medians, calls, strict=True)]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def stage_functions(ours, reference, latents: torch.Tensor, steps: int, guidance: float):
    """(name, jax fn, torch fn) for text encoding, the denoising loop and the VAE decode, each doing what
    the pipelines' __call__ does in that stage; the loop gets the encoded text, the decode the loop's last
    latents (so the stages must be timed in this order)."""
    use_cfg = guidance > 1.0
    prompts = [PROMPT, ""] if use_cfg else [PROMPT]
    device = torch.device("cpu")
    results = {}

    def jax_encode():
        results["jax_text"] = [ours.encode_prompt([p])[0].block_until_ready() for p in prompts]

    def torch_encode():
        results["torch_text"] = [reference.encode_prompt([p], device)[0] for p in prompts]

    jax_latents = jnp.asarray(latents.numpy())

    def jax_loop():
        text = results["jax_text"]
        negative = dict(negative_text_bth=text[1][None], negative_text_lens=np.array([text[1].shape[0]])) \
            if use_cfg else {}
        results["jax_latents"] = sampling.sample(
            ours.transformer, jax_latents, text[0][None], np.array([text[0].shape[0]]), num_inference_steps=steps,
            guidance_scale=guidance, shift=ours.shift, text_length_multiple=ours.text_bucket,
            **negative).block_until_ready()

    def torch_loop():
        text = results["torch_text"]
        results["torch_latents"] = reference(
            prompt_embeds=text[:1], negative_prompt_embeds=text[1:] if use_cfg else None, latents=latents.clone(),
            height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
            use_pe=False).images

    vae_graphdef, vae_state = nnx.split(ours.vae)

    def jax_decode():
        return np.asarray(pipeline_lib._decode_images_jit(vae_graphdef, vae_state, results["jax_latents"],
                                                          ours.vae_tile_size))

    @torch.no_grad()
    def torch_decode():  # the reference __call__'s decode branch
        vae = reference.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-5)
        packed = reference._unpatchify_latents(results["torch_latents"] * std + mean)
        return reference.image_processor.postprocess(vae.decode(packed, return_dict=False)[0], output_type="np")

    return [("text encode", jax_encode, torch_encode), ("denoise loop", jax_loop, torch_loop),
            ("VAE decode", jax_decode, torch_decode)]


def bench_setting(label: str, ours, reference, latents, steps: int, guidance: float, repeats: int,
                  stages: bool, first_images=None) -> None:
    """Image difference, steady-state time per image and (optionally) the stages of one setting.
    `first_images`: both pipelines' images of PROMPT from the calls already made, else (a setting not
    compiled yet: --turbo's loop without CFG) the first ernie_jax call is timed here."""
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                  use_pe=False)
    run_jax = lambda: ours(prompt=PROMPT, latents=latents.numpy(), **kwargs).images
    run_torch = lambda: reference(prompt=PROMPT, latents=latents.clone(), **kwargs).images
    if first_images is None:
        jax_image, first_s = timed(run_jax)
        print(f"  {label}: ernie_jax first call (compiles this loop) {first_s:.2f} s")
        first_images = jax_image, run_torch()
    jax_image, torch_image = first_images
    print(f"  {label}: max |ernie_jax - diffusers| image difference {np.abs(jax_image - torch_image).max():.2e} "
          f"(images in [0, 1], std {torch_image.std():.3f})")
    (jax_s, jax_best), (torch_s, torch_best) = paired_timings([run_jax, run_torch], repeats)
    print(f"  {label}: steady state per image: ernie_jax {jax_s:.3f} s  diffusers {torch_s:.3f} s  "
          f"speed-up {torch_s / jax_s:.2f}x  (best: {jax_best:.3f} s, {torch_best:.3f} s, "
          f"{torch_best / jax_best:.2f}x)")
    if not stages:
        return
    total_jax = total_torch = 0.0
    for stage, jax_fn, torch_fn in stage_functions(ours, reference, latents, steps, guidance):
        (stage_jax, jax_best), (stage_torch, torch_best) = paired_timings([jax_fn, torch_fn], repeats)
        total_jax, total_torch = total_jax + stage_jax, total_torch + stage_torch
        print(f"  {label}:   {stage:12s} ernie_jax {stage_jax:8.4f} s  diffusers {stage_torch:8.4f} s  "
              f"speed-up {stage_torch / stage_jax:5.2f}x  (best: {jax_best:.4f} s, {torch_best:.4f} s, "
              f"{torch_best / jax_best:.2f}x)")
    print(f"  {label}:   {'rest':12s} ernie_jax {jax_s - total_jax:8.4f} s  diffusers {torch_s - total_torch:8.4f} s"
          f"  (per image minus the stages)")


def bench(name: str, workdir: Path, repeats: int, turbo: bool, stages: bool) -> None:
    steps, guidance = CASES[name]
    load = MachineLoad()
    path, build_s = timed(lambda: build(name, workdir / name))
    latents = torch.randn(1, 128, SIZE // 16, SIZE // 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                  use_pe=False)

    caches = jit_cache_sizes()
    start = time.perf_counter()
    ours = pipeline_lib.ErnieImagePipeline.from_pretrained(path, dtype="float32")
    load_s = time.perf_counter() - start
    jax_image, first_s = timed(lambda: ours(prompt=PROMPT, latents=latents.numpy(), **kwargs).images)
    compiled = [b - a for a, b in zip(caches, jit_cache_sizes(), strict=True)]
    caches = jit_cache_sizes()
    _, second_s = timed(lambda: ours(prompt=OTHER_PROMPT, latents=latents.numpy(), **kwargs))
    recompiled = [b - a for a, b in zip(caches, jit_cache_sizes(), strict=True)]
    start = time.perf_counter()
    reference = load_reference(path)
    reference_load_s = time.perf_counter() - start
    torch_image, reference_first_s = timed(
        lambda: reference(prompt=PROMPT, latents=latents.clone(), **kwargs).images)

    tokens = [len(ours.tokenize(p)) for p in (PROMPT, OTHER_PROMPT)]
    print(f"{name}: DiT {parameter_count(ours.transformer) / 1e6:.1f}M, VAE {parameter_count(ours.vae) / 1e6:.1f}M, "
          f"text encoder {parameter_count(ours.text_encoder) / 1e6:.1f}M parameters; {SIZE}x{SIZE}, {steps} steps, "
          f"guidance {guidance}, batch 1 (built and saved in {build_s:.1f} s)")
    print(f"  time to first image: ernie_jax {load_s + first_s:.2f} s (from_pretrained {load_s:.2f} s + first call "
          f"{first_s:.2f} s, compiled encode/loop/decode {compiled})")
    print(f"  diffusers for comparison: {reference_load_s + reference_first_s:.2f} s (from_pretrained "
          f"{reference_load_s:.2f} s + first call {reference_first_s:.2f} s)")
    print(f"  second image ({tokens[1]}-token prompt after {tokens[0]}): ernie_jax {second_s:.2f} s, "
          f"new compilations {recompiled}")
    bench_setting(f"{steps} steps, guidance {guidance}", ours, reference, latents, steps, guidance, repeats,
                  stages, first_images=(jax_image, torch_image))
    if turbo:
        bench_setting(f"turbo {TURBO[0]} steps, guidance {TURBO[1]}", ours, reference, latents, *TURBO, repeats,
                      stages)
    print(f"  {name}: {load.report()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="tiny,small")
    parser.add_argument("--turbo", action="store_true", help="also the 8-step, guidance-1.0 setting")
    parser.add_argument("--no-stages", dest="stages", action="store_false",
                        help="skip timing text encoding, denoising loop and VAE decode separately")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; fp32")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.only.split(","):
            bench(name, Path(workdir), args.repeats, args.turbo, args.stages)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
