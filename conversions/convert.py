"""`python -m conversions.convert SRC DST`: a diffusers ERNIE-Image transformer -> an ernie_jax checkpoint.

SRC is a diffusers transformer folder (single or sharded safetensors), a pipeline folder (its
`transformer/` is converted), or a single `.safetensors` file. DST receives `config.json` (the diffusers
config plus a format marker) and `params/` (Orbax). DST must not exist; it appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import sys

from flax import nnx

from conversions import checkpoint_files as files
from conversions import transformer as weights
from conversions.common import atomic_directory, run_command
from conversions.safetensors_io import CheckpointError

FORMAT_VERSION = 1


def convert(source, destination, dtype: str | None = None) -> None:
    """Converts the transformer at `source` into an Orbax checkpoint at `destination`.

    Parameters are stored in `dtype` (default: the dtype of the source tensors).
    """
    with atomic_directory(destination) as staging:
        checkpoint = weights.open_checkpoint(source)
        if checkpoint.converted_dtype is not None:
            raise CheckpointError(f"{source}: already an ernie_jax checkpoint")
        dtype = str(files.resolve_dtype(dtype or checkpoint.stored_dtype))
        model = weights.load_checkpoint(checkpoint, dtype)
        config = {**weights.diffusers_config(model.config), files.CONVERTED_FORMAT_KEY: FORMAT_VERSION,
                  files.CONVERTED_DTYPE_KEY: dtype}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        files.save_params(staging, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conversions.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="diffusers transformer folder, pipeline folder or .safetensors file")
    parser.add_argument("dst", help="output folder (must not exist)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype to store (default: that of the source tensors)")
    args = parser.parse_args(argv)
    convert(args.src, args.dst, args.dtype)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    sys.exit(run_command(main))
