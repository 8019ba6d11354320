"""`python -m ernie_jax.denoise --model PATH --out latents.npy`: run the compiled denoising loop on a checkpoint.

A setup check for the transformer and sampler on their own: text features are random stand-ins (seeded)
of the model's text width, so no text encoder is needed. Prints compile and run times and writes the
final latents `[B, 128, H/16, W/16]` as .npy. `--turbo` selects ERNIE-Image-Turbo's 8 steps at
guidance 1.0; the defaults are the base model's 50 steps at guidance 4.0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

import ernie_jax
from ernie_jax import sampling

TURBO = {"steps": 8, "guidance": 1.0}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m ernie_jax.denoise", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="transformer folder, pipeline folder, .safetensors file "
                                                       "or converted checkpoint")
    parser.add_argument("--out", required=True, help="where to write the final latents (.npy)")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--turbo", action="store_true", help="ERNIE-Image-Turbo preset: 8 steps, guidance 1.0")
    parser.add_argument("--shift", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-len", type=int, default=32, help="length of the stand-in text features")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    if args.turbo:
        args.steps, args.guidance = TURBO["steps"], TURBO["guidance"]
    for name in ("height", "width"):
        if getattr(args, name) <= 0 or getattr(args, name) % 16:
            parser.error(f"--{name} must be a positive multiple of 16, got {getattr(args, name)}")
    if not args.out.endswith(".npy"):
        parser.error(f"--out must name a .npy file, got {args.out}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    model = ernie_jax.load_transformer(args.model, args.dtype)
    config = model.config
    rng = np.random.default_rng(args.seed)
    latents = rng.standard_normal((args.batch, config.in_channels, args.height // 16, args.width // 16), np.float32)
    text = rng.standard_normal((args.batch, args.text_len, config.text_in_dim), np.float32)
    negative = rng.standard_normal((args.batch, 1, config.text_in_dim), np.float32)
    run = lambda: sampling.sample(
        model, latents, text, np.full((args.batch,), args.text_len), negative_text_bth=negative,
        negative_text_lens=np.ones((args.batch,), np.int64), num_inference_steps=args.steps,
        guidance_scale=args.guidance, shift=args.shift).block_until_ready()
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = np.asarray(jax.device_get(run()), np.float32)
    steady = time.perf_counter() - start
    if not np.isfinite(result).all():
        raise ValueError("the sampler produced non-finite latents")
    tmp = f"{args.out}.tmp-{os.getpid()}.npy"
    np.save(tmp, result)
    os.replace(tmp, args.out)
    print(f"{args.steps} steps, guidance {args.guidance}, {args.height}x{args.width}, batch {args.batch} on "
          f"{jax.devices()[0].platform}: first call {first:.2f} s (with compile), then {steady:.2f} s; "
          f"latents mean {result.mean():+.4f} std {result.std():.4f} -> {args.out}")


if __name__ == "__main__":
    from conversions.common import run_command

    sys.exit(run_command(main))
