"""Loads the tiny DiT into meshes made three ways (the project's `parallel.make_mesh`, `jax.make_mesh` with its
Explicit axes, `Mesh(devices, names)` with Auto axes; each on data, fsdp, fsdp x tensor and data x fsdp x tensor
meshes; and one jax.make_mesh mesh set as the context mesh by jax.set_mesh) with the default inference rules,
runs the sharded forward and a 2-step CFG loop, and prints, as JSON, per mesh and kind: the relative error
against the single-device result and against the project's mesh, the shard shape of a big weight and the big
weights that the mesh leaves whole.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/workers/user_meshes.py FOLDER
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ernie_jax
from ernie_jax import parallel, sampling
from tests.workers.common import relative_error, tiny_inputs

# Sizes in parallel.MESH_AXES order: data, fsdp, context, tensor.
SHAPES = {"data=8": (8, 1, 1, 1), "fsdp=8": (1, 8, 1, 1), "fsdp=4,tensor=2": (1, 4, 1, 2),
          "data=2,fsdp=2,tensor=2": (2, 2, 1, 2)}
KINDS = {
    "parallel.make_mesh": lambda shape: parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape))),
    "jax.make_mesh": lambda shape: jax.make_mesh(shape, parallel.MESH_AXES),
    "Mesh(devices, names)": lambda shape: Mesh(np.asarray(jax.devices()).reshape(shape), parallel.MESH_AXES),
}
# Weights above this many bytes count as big (the tiny DiT's attention and MLP kernels, 0.5-1 MiB).
BIG = 256 * 1024


def run(folder, mesh, inputs, with_forward: bool) -> dict:
    """The DiT read straight into `mesh` with load_transformer's default rules: its sharded forward (when
    `with_forward`) and CFG loop, the shard shape of a big weight and the big weights the mesh leaves whole."""
    model = ernie_jax.load_transformer(folder, mesh=mesh)
    result = {}
    if with_forward:
        forward = parallel.sharded_forward(model, mesh, parallel.INFERENCE_RULES)
        result["forward"] = np.asarray(forward(inputs["latents"], inputs["timesteps"], inputs["text"],
                                               inputs["text_lens"]))
    result["loop"] = np.asarray(sampling.sample(
        model, inputs["latents"], inputs["text"], inputs["text_lens"], negative_text_bth=inputs["negative"],
        negative_text_lens=inputs["negative_lens"], num_inference_steps=2, mesh=mesh, rules=parallel.INFERENCE_RULES))
    kernel = nnx.state(model, nnx.Param)["layers"]["mlp"]["gate_proj"]["kernel"][...]
    result["gate_proj_shard"] = list(kernel.addressable_shards[0].data.shape)
    result["replicated"] = [path for path, _ in parallel.replicated_parameters(model, mesh, parallel.INFERENCE_RULES,
                                                                               threshold_bytes=BIG)]
    return result


def main(folder):
    inputs = tiny_inputs()
    reference = ernie_jax.load_transformer(folder)
    expected = {"forward": np.asarray(reference(inputs["latents"], inputs["timesteps"], inputs["text"],
                                                inputs["text_lens"])),
                "loop": np.asarray(sampling.sample(reference, inputs["latents"], inputs["text"], inputs["text_lens"],
                                                   negative_text_bth=inputs["negative"],
                                                   negative_text_lens=inputs["negative_lens"], num_inference_steps=2))}
    results, projects = {}, {}
    for name, shape in SHAPES.items():
        project = None
        for kind, make in KINDS.items():
            mesh = make(shape)
            try:
                # The forward compiles anew for every mesh: run it for the project's and jax.make_mesh's only.
                result = run(folder, mesh, inputs, with_forward=kind != "Mesh(devices, names)")
            except Exception as e:  # reported, so that every mesh and kind is tried
                results[f"{name} {kind}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            project = project or result
            results[f"{name} {kind}"] = compare(mesh, result, expected, project)
        projects[name] = project
    # As flax's examples run: the user's Explicit mesh set as JAX's context mesh, the inputs placed on it.
    name = "fsdp=4,tensor=2"
    mesh = jax.make_mesh(SHAPES[name], parallel.MESH_AXES)
    try:
        with jax.set_mesh(mesh):
            on_mesh = {key: jax.device_put(value, NamedSharding(mesh, P("fsdp"))) for key, value in inputs.items()}
            result = compare(mesh, run(folder, mesh, on_mesh, with_forward=True), expected, projects[name])
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}"[:300]}
    results[f"{name} jax.make_mesh under jax.set_mesh"] = result
    print(json.dumps(results))


def compare(mesh, result: dict, expected: dict, project: dict) -> dict:
    """What the test reads of one run: errors against the single-device and the project's-mesh results."""
    outputs = [output for output in ("forward", "loop") if output in result]
    return {"axis_types": [str(t) for t in mesh.axis_types],
            **{output: relative_error(result[output], expected[output]) for output in outputs},
            **{f"{output}_vs_project": relative_error(result[output], project[output]) for output in outputs},
            "gate_proj_shard": result["gate_proj_shard"], "replicated": result["replicated"]}

if __name__ == "__main__":
    main(sys.argv[1])
