"""`python -m conversions.convert SRC DST`: ERNIE-Image weights (diffusers/transformers layout) -> ernie_jax.

SRC is either a whole pipeline folder (`model_index.json`: transformer, vae, text_encoder and the optional
pe are converted; tokenizers and the scheduler are copied), or one transformer (a diffusers transformer
folder, single or sharded safetensors, or a single `.safetensors` file). Each converted component folder
holds `config.json` (the source config plus a format marker) and `params/` (Orbax), and loads with the
same functions as the source (`ErnieImagePipeline.from_pretrained`, `load_transformer`, ...). DST must not
exist; it appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from flax import nnx

from conversions import checkpoint_files as files
from conversions import transformer as weights
from conversions.common import atomic_directory, run_command
from conversions.safetensors_io import CheckpointError, TensorSource

FORMAT_VERSION = 1


def _component_loaders():
    from conversions import mistral, vae

    return {"transformer": weights.load_transformer, "vae": vae.load_vae,
            "text_encoder": mistral.load_text_encoder, "pe": mistral.load_prompt_enhancer}


def write_converted(folder: Path, model, config: dict, dtype: str) -> None:
    """Writes `model`'s variables (Orbax) and `config` with the format marker into `folder`."""
    folder.mkdir(exist_ok=True)
    marked = {**config, files.CONVERTED_FORMAT_KEY: FORMAT_VERSION, files.CONVERTED_DTYPE_KEY: dtype}
    (folder / "config.json").write_text(json.dumps(marked, indent=2) + "\n")
    files.save_params(folder, nnx.to_pure_dict(nnx.state(model)))


def convert_transformer(source, staging: Path, dtype: str | None) -> None:
    checkpoint = weights.open_checkpoint(source)
    if checkpoint.converted_dtype is not None:
        raise CheckpointError(f"{source}: already an ernie_jax checkpoint")
    dtype = str(files.resolve_dtype(dtype or checkpoint.stored_dtype))
    model = weights.load_checkpoint(checkpoint, dtype)
    write_converted(staging, model, weights.diffusers_config(model.config), dtype)


def convert_component(loader, source: Path, staging: Path, dtype: str | None) -> None:
    """Converts one component folder (config.json + safetensors) with its loader."""
    config = files.read_json(source / "config.json")
    if files.is_converted(config):
        raise CheckpointError(f"{source}: already an ernie_jax checkpoint")
    weight_files = sorted(source.glob("*.safetensors"))
    if not weight_files:
        raise CheckpointError(f"{source}: no .safetensors weights")
    dtype = str(files.resolve_dtype(dtype or files.stored_dtype(TensorSource(weight_files))))
    write_converted(staging, loader(source, dtype), config, dtype)


def convert_pipeline(source: Path, staging: Path, dtype: str | None) -> list[str]:
    """Converts every model of the pipeline folder `source` into `staging`; returns the components."""
    index = files.read_json(source / "model_index.json")
    loaders = _component_loaders()
    components = [name for name, entry in index.items()
                  if not name.startswith("_") and isinstance(entry, list) and entry and entry[0] is not None]
    missing = [name for name in components if not (source / name).is_dir()]
    if missing:
        raise CheckpointError(f"{source}: model_index.json lists components with no folder: {missing}")
    for name in components:
        if name == "transformer":
            convert_transformer(source / name, staging / name, dtype)
        elif name in loaders:
            convert_component(loaders[name], source / name, staging / name, dtype)
        else:
            shutil.copytree(source / name, staging / name)
    (staging / "model_index.json").write_text(
        json.dumps({**index, files.CONVERTED_FORMAT_KEY: FORMAT_VERSION}, indent=2) + "\n")
    return components


def convert(source, destination, dtype: str | None = None) -> list[str]:
    """Converts the pipeline or transformer at `source` into `destination`; returns what was converted.

    Parameters are stored in `dtype` (default: the dtype of each component's source tensors).
    """
    source = Path(source)
    with atomic_directory(destination) as staging:
        if (source / "model_index.json").is_file():
            return convert_pipeline(source, staging, dtype)
        convert_transformer(source, staging, dtype)
        return ["transformer"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conversions.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="pipeline folder, diffusers transformer folder or .safetensors file")
    parser.add_argument("dst", help="output folder (must not exist)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype to store (default: that of the source tensors)")
    args = parser.parse_args(argv)
    converted = convert(args.src, args.dst, args.dtype)
    print(f"wrote {args.dst} ({', '.join(converted)})")


if __name__ == "__main__":
    sys.exit(run_command(main))
