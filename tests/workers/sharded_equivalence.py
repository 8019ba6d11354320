"""Runs the tiny DiT forward and a 4-step CFG loop sharded over emulated-device meshes and prints, as
JSON, their largest relative error against the single-device result and each mesh's parameter split.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/workers/sharded_equivalence.py FOLDER
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

import ernie_jax
from conversions import convert
from ernie_jax import parallel, sampling
from tests.workers.common import relative_error, tiny_inputs

MESHES = {"data=8": {"data": 8}, "fsdp=8": {"fsdp": 8}, "fsdp=4,tensor=2": {"fsdp": 4, "tensor": 2},
          "data=2,fsdp=2,tensor=2": {"data": 2, "fsdp": 2, "tensor": 2},
          "context=2,fsdp=4": {"context": 2, "fsdp": 4}}


def main(folder):
    inputs = tiny_inputs()  # the same arrays in every process
    latents, timesteps, text, text_lens, negative, negative_lens = (inputs[k] for k in (
        "latents", "timesteps", "text", "text_lens", "negative", "negative_lens"))
    reference = ernie_jax.load_transformer(folder)
    expected_forward = np.asarray(reference(latents, timesteps, text, text_lens))
    expected_loop = np.asarray(sampling.sample(reference, latents, text, text_lens, negative_text_bth=negative,
                                               negative_text_lens=negative_lens, num_inference_steps=4))
    results = {}
    for name, sizes in MESHES.items():
        mesh = parallel.make_mesh(sizes)
        rules = parallel.TRAINING_RULES
        # Read straight into the mesh: each device reads only its slice of the safetensors.
        model = ernie_jax.load_transformer(folder, mesh=mesh, axis_rules=rules)
        forward = parallel.sharded_forward(model, mesh, rules)
        loop = np.asarray(sampling.sample(model, latents, text, text_lens, negative_text_bth=negative,
                                          negative_text_lens=negative_lens, num_inference_steps=4, mesh=mesh,
                                          rules=rules))
        kernel = nnx.state(model, nnx.Param)["layers"]["mlp"]["gate_proj"]["kernel"][...]
        results[name] = dict(
            forward=relative_error(forward(latents, timesteps, text, text_lens), expected_forward),
            loop=relative_error(loop, expected_loop),
            gate_proj_shard=list(kernel.addressable_shards[0].data.shape), gate_proj=list(kernel.shape))
    # A converted (Orbax) checkpoint restores into a mesh other than the one it was written from.
    with tempfile.TemporaryDirectory() as workdir:
        convert.convert(folder, Path(workdir) / "converted")
        mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
        restored = ernie_jax.load_transformer(Path(workdir) / "converted", mesh=mesh,
                                              axis_rules=parallel.TRAINING_RULES)
        kernel = nnx.state(restored, nnx.Param)["layers"]["mlp"]["gate_proj"]["kernel"][...]
        forward = parallel.sharded_forward(restored, mesh, parallel.TRAINING_RULES)
        results["orbax_into_fsdp=4,tensor=2"] = dict(
            forward=relative_error(forward(latents, timesteps, text, text_lens), expected_forward),
            gate_proj_shard=list(kernel.addressable_shards[0].data.shape), gate_proj=list(kernel.shape))
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
