"""`python -m conversions.export SRC DST`: an ernie_jax (or any loadable) transformer -> diffusers format.

DST receives `config.json` and `diffusion_pytorch_model.safetensors` (sharded with an index when larger
than `--max-shard-size`), which diffusers' `ErnieImageTransformer2DModel.from_pretrained` loads.
DST must not exist; it appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import sys

from conversions import transformer as weights
from conversions.common import atomic_directory, run_command
from conversions.safetensors_io import write_sharded


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def export(source, destination, max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Writes the transformer at `source` as a diffusers folder at `destination`; returns the files written."""
    with atomic_directory(destination) as staging:
        checkpoint = weights.open_checkpoint(source)
        model = weights.load_checkpoint(checkpoint, checkpoint.stored_dtype)
        files = write_sharded(staging, "diffusion_pytorch_model", weights.transformer_state_dict(model),
                              max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(weights.diffusers_config(model.config), indent=2) + "\n")
    return files + ["config.json"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conversions.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="converted ernie_jax checkpoint (or any source load_transformer accepts)")
    parser.add_argument("dst", help="output folder (must not exist)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    args = parser.parse_args(argv)
    files = export(args.src, args.dst, parse_size(args.max_shard_size))
    print(f"wrote {args.dst}: {', '.join(files)}")


if __name__ == "__main__":
    sys.exit(run_command(main))
