"""`python -m conversions.random_checkpoint DST --preset tiny`: a random ERNIE-Image transformer in the
diffusers layout, for testing a setup end to end without downloading the real weights.

DST receives `config.json` and `diffusion_pytorch_model.safetensors`, exactly as the released
`transformer/` folder is laid out. Every weight is random (torch-like uniform init), including the
ones the reference zero-initialises, so the model's output is not trivially zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from conversions import checkpoint_files as files
from conversions import transformer as weights
from conversions.common import atomic_directory, run_command
from conversions.export import parse_size
from conversions.safetensors_io import write_sharded
from ernie_jax.models.dit import PRESETS, init_transformer


def write_random_transformer(destination, config, *, dtype: str = "float32", seed: int = 0,
                             max_shard_bytes: int = 5 * 10**9) -> None:
    """Writes a randomly initialised transformer with `config` as a diffusers folder at `destination`."""
    with atomic_directory(destination) as staging:
        model = init_transformer(config, seed=seed, param_dtype=files.resolve_dtype(dtype))
        write_sharded(staging, "diffusion_pytorch_model", weights.transformer_state_dict(model), max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(weights.diffusers_config(config), indent=2) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conversions.random_checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dst", help="output folder (must not exist)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--num-layers", type=int, help="override the preset's number of blocks")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    config = PRESETS[args.preset]
    if args.num_layers is not None:
        config = dataclasses.replace(config, num_layers=args.num_layers)
    write_random_transformer(args.dst, config, dtype=args.dtype, seed=args.seed,
                             max_shard_bytes=parse_size(args.max_shard_size))
    print(f"wrote {args.dst} ({args.preset} preset, {config.num_layers} layers, {args.dtype})")


if __name__ == "__main__":
    sys.exit(run_command(main))
