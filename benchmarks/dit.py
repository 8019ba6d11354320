"""DiT forward and 50-step sampling loop: ernie_jax (jitted) vs the diffusers reference (torch eager). The
forward is also timed as the README's plain call `model(...)` (compiled once per input shape by the model).

Both run in this process on the same machine and threads, with the same weights and inputs; warm-up
(and compilation) is excluded and each time is a median. Also measures the fp32 matmul peak here and
reports each forward's achieved FLOP/s as a fraction of it.

    python benchmarks/dit.py [--repeats 7] [--only tiny,small,loop]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import ernie_jax  # noqa: E402
from benchmarks.common import forward_flops, matmul_peak, paired_median_seconds  # noqa: E402
from ernie_jax import sampling  # noqa: E402
from ernie_jax.models.dit import PRESETS  # noqa: E402

# (preset, batch, latent height, latent width, text length): tiny as in the reference doc's timing table,
# small = 1024 image tokens.
CASES = {"tiny": ("tiny", 2, 16, 16, 32), "small": ("small", 1, 32, 32, 64)}


def reference_model(folder):
    from diffusers import ErnieImageTransformer2DModel

    return ErnieImageTransformer2DModel.from_pretrained(folder).eval()


def write_random(preset: str, folder: Path):
    from conversions.random_checkpoint import write_random_transformer

    write_random_transformer(folder, PRESETS[preset])


def bench_forward(name: str, workdir: Path, repeats: int, peak: float) -> None:
    preset, batch, height, width, text_len = CASES[name]
    folder = workdir / preset
    if not folder.exists():
        write_random(preset, folder)
    config = PRESETS[preset]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((batch, config.in_channels, height, width), np.float32)
    timesteps = np.full((batch,), 500.0, np.float32)
    text = rng.standard_normal((batch, text_len, config.text_in_dim), np.float32)
    text_lens = np.full((batch,), text_len, np.int64)

    model = ernie_jax.load_transformer(folder)
    forward = jax.jit(lambda m, *a: m(*a))
    jax_inputs = [jnp.asarray(x) for x in (latents, timesteps, text, text_lens)]
    reference = reference_model(folder)
    torch_inputs = [torch.from_numpy(x) for x in (latents, timesteps, text, text_lens)]
    with torch.no_grad():
        jax_s, plain_s, torch_s = paired_median_seconds(
            [lambda: forward(model, *jax_inputs).block_until_ready(),
             lambda: model(*jax_inputs).block_until_ready(),
             lambda: reference(*torch_inputs, return_dict=False)], repeats)

    flops = forward_flops(config, batch, height * width, text_len)
    print(f"forward {name:5s} (B={batch}, {height * width} image + {text_len} text tokens, "
          f"{flops / 1e9:.1f} GFLOP): jax {jax_s * 1e3:8.1f} ms ({flops / jax_s / peak:5.1%} of peak)  "
          f"torch {torch_s * 1e3:8.1f} ms ({flops / torch_s / peak:5.1%} of peak)  speed-up {torch_s / jax_s:.2f}x\n"
          f"              plain call model(...) {plain_s * 1e3:8.1f} ms  speed-up {torch_s / plain_s:.2f}x")


def bench_loop(workdir: Path, repeats: int) -> None:
    from diffusers import ErnieImagePipeline, FlowMatchEulerDiscreteScheduler

    preset, batch, height, width, text_len = CASES["tiny"]
    folder = workdir / preset
    if not folder.exists():
        write_random(preset, folder)
    config = PRESETS[preset]
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((1, config.in_channels, height, width), np.float32)
    positive = rng.standard_normal((1, text_len, config.text_in_dim), np.float32)
    negative = rng.standard_normal((1, 1, config.text_in_dim), np.float32)

    model = ernie_jax.load_transformer(folder)
    run_jax = lambda: sampling.sample(model, latents, positive, np.array([text_len]), negative_text_bth=negative,
                                      negative_text_lens=np.array([1]), num_inference_steps=50,
                                      guidance_scale=4.0).block_until_ready()
    pipe = ErnieImagePipeline(transformer=reference_model(folder), vae=None, text_encoder=None, tokenizer=None,
                              scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=4.0))
    pipe.set_progress_bar_config(disable=True)
    run_torch = lambda: pipe(prompt_embeds=[torch.from_numpy(positive[0])],
                             negative_prompt_embeds=[torch.from_numpy(negative[0])],
                             latents=torch.from_numpy(latents), height=16 * height, width=16 * width,
                             num_inference_steps=50, guidance_scale=4.0, output_type="latent", use_pe=False)
    jax_s, torch_s = paired_median_seconds([run_jax, run_torch], repeats)
    print(f"50-step CFG loop, tiny, {height}x{width} latents: jax {jax_s:.3f} s  torch {torch_s:.3f} s  "
          f"speed-up {torch_s / jax_s:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default="tiny,small,loop")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads")
    peak = matmul_peak(args.repeats)
    print(f"fp32 matmul peak measured here: {peak / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.only.split(","):
            if name == "loop":
                bench_loop(Path(workdir), args.repeats)
            else:
                bench_forward(name, Path(workdir), args.repeats, peak)


if __name__ == "__main__":
    main()
