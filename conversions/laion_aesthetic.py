"""The LAION aesthetic predictor's head weights: the released torch state dict (`sac+logos+ava1-l14-linearMSE.pth`)
or the same tensors in a safetensors file.

The state dict is the `nn.Sequential`'s: `layers.{0,2,4,6,7}.weight` / `.bias` (the odd indices are dropouts).
Reading a `.pth` needs torch (`torch.load(weights_only=True)`: tensors and containers only, no code runs);
`python -m conversions.laion_aesthetic SRC.pth DST.safetensors` converts it once for machines without torch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

from conversions import checkpoint_files as files
from conversions.common import run_command
from conversions.key_table import KeyRule, check_tensors, expected_shapes, linear_rules
from conversions.safetensors_io import CheckpointError, TensorSource, write_safetensors
from ernie_jax.models.aesthetic_head import LAION_WIDTHS, AestheticHead

# Positions of the Linear layers in the released nn.Sequential (dropouts between them).
SEQUENTIAL_INDICES = (0, 2, 4, 6, 7)


def key_table() -> list[KeyRule]:
    """The released head's tensors and their paths in `AestheticHead(LAION_WIDTHS)`."""
    rules = []
    for position, index in enumerate(SEQUENTIAL_INDICES):
        rules += linear_rules(f"layers.{index}", ("projections", position), bias=True)
    return rules


class StateDictSource:
    """The read-only mapping interface of `TensorSource` over tensors already in memory."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._tensors[key]


def read_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The float tensors of a torch-saved state dict as numpy, loaded with `weights_only=True`."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path}: reading a .pth needs torch; convert it elsewhere with "
                              f"`python -m conversions.laion_aesthetic {path.name} head.safetensors`") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (pickle, zip, unsupported globals) for a bad file
        raise CheckpointError(f"{path}: not a readable torch state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return {key: value.detach().float().numpy() for key, value in state.items()}


def open_head_tensors(path) -> StateDictSource | TensorSource:
    """The head's tensors from a `.pth` / `.pt` state dict or a `.safetensors` file, every key and shape checked."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        tensors = TensorSource([path])
    elif path.suffix in (".pth", ".pt"):
        tensors = StateDictSource(read_torch_state_dict(path))
    else:
        raise CheckpointError(f"{path}: expected a .pth, .pt or .safetensors file")
    check_tensors(tensors, expected_torch_shapes(), str(path), own_patterns=[rule.pattern() for rule in key_table()])
    return tensors


def expected_torch_shapes() -> dict[str, tuple[int, ...]]:
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: AestheticHead(LAION_WIDTHS, rngs=nnx.Rngs(0)))))
    return expected_shapes(key_table(), abstract, num_layers=0)


def load_laion_head(path, dtype="float32", *, param_dtype=None, sharding=None) -> AestheticHead:
    """The LAION aesthetic head from `path` (`open_head_tensors`), placed by `sharding` (default: the first
    device)."""
    tensors = open_head_tensors(path)
    dtype, param_dtype = files.resolve_dtypes(dtype, param_dtype)
    abstract = nnx.eval_shape(lambda: AestheticHead(LAION_WIDTHS, dtype=dtype, param_dtype=param_dtype,
                                                    rngs=nnx.Rngs(0)))
    return files.load_module(abstract, files.Checkpoint(LAION_WIDTHS, Path(path), tensors=tensors), key_table(),
                             num_layers=0, sharding=sharding)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conversions.laion_aesthetic",
                                     description="Convert the LAION aesthetic head's .pth state dict to safetensors.")
    parser.add_argument("source", type=Path, help="the released .pth (e.g. sac+logos+ava1-l14-linearMSE.pth)")
    parser.add_argument("destination", type=Path, help="the .safetensors file to write (must not exist)")
    args = parser.parse_args(argv)
    if args.destination.exists():
        raise CheckpointError(f"{args.destination}: already exists (refusing to overwrite)")
    tensors = open_head_tensors(args.source)
    handle, staging = tempfile.mkstemp(prefix=f".{args.destination.name}.tmp-", dir=args.destination.parent)
    os.close(handle)
    try:
        write_safetensors(Path(staging), {key: np.asarray(tensors[key], np.float32) for key in expected_torch_shapes()})
        os.replace(staging, args.destination)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    raise SystemExit(run_command(main))
