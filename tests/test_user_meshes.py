"""Meshes that users make the standard JAX way (`jax.make_mesh`, whose axes are Explicit in jax 0.10, and
`Mesh(devices, names)`, Auto) work wherever the project's own `parallel.make_mesh` does, with the same
results; a mesh without the project's axes is refused before anything is loaded. And what an fsdp axis means
at inference: the default rules split the weights over it.

The sharded runs need 8 devices, emulated on CPU with XLA_FLAGS, which must be set before JAX starts: they
run in a subprocess (tests/workers/user_meshes.py).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import ernie_jax
from ernie_jax import parallel
from ernie_jax.pipeline import ErnieImagePipeline
from tests.conftest import run_worker

REPO = Path(__file__).resolve().parents[1]
MESHES = ("data=8", "fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2")
KINDS = ("parallel.make_mesh", "jax.make_mesh", "Mesh(devices, names)")


@pytest.fixture(scope="module")
def user_mesh_results(tiny_folder):
    return run_worker("user_meshes.py", str(tiny_folder))


@pytest.mark.parametrize("mesh", MESHES)
def test_meshes_made_every_way_give_the_same_results(user_mesh_results, mesh):
    results = {kind: user_mesh_results[f"{mesh} {kind}"] for kind in KINDS}
    # Before parallel.normalize_mesh, jax.make_mesh's Explicit axes failed here with ShardingTypeError
    # ("Contracting dimensions are sharded and it is ambiguous how the output should be sharded").
    assert all("error" not in result for result in results.values()), results
    assert results["jax.make_mesh"]["axis_types"] == ["AxisType.Explicit"] * 4
    for kind, result in results.items():
        assert result["loop"] <= 1e-5 and result.get("forward", 0.0) <= 1e-5, (kind, result)
        # The same devices with Auto axes: the project's mesh, so the same compiled programs, bit for bit.
        assert result["loop_vs_project"] == 0.0 and result.get("forward_vs_project", 0.0) == 0.0, (kind, result)
    assert "forward" in results["jax.make_mesh"]


def test_a_users_mesh_set_as_the_context_mesh(user_mesh_results):
    # Under `with jax.set_mesh(jax.make_mesh(...))`, inputs on that mesh: before parallel.ProgramOnMesh, jit typed
    # the arguments with the context's Explicit axes ("context mesh ... should match the aval mesh").
    result = user_mesh_results["fsdp=4,tensor=2 jax.make_mesh under jax.set_mesh"]
    assert "error" not in result, result
    assert result["forward"] <= 1e-5 and result["loop"] <= 1e-5, result
    assert result["forward_vs_project"] == 0.0 and result["loop_vs_project"] == 0.0, result


def test_an_fsdp_axis_splits_the_weights_at_inference(user_mesh_results):
    full = [2, 256, 512]  # gate_proj: [layers, embed, mlp]; embed -> fsdp, mlp -> tensor by default
    shards = {"data=8": full, "fsdp=8": [2, 32, 512], "fsdp=4,tensor=2": [2, 64, 256],
              "data=2,fsdp=2,tensor=2": [2, 128, 256]}
    for mesh, shard in shards.items():
        for kind in KINDS:
            result = user_mesh_results[f"{mesh} {kind}"]
            assert result["gate_proj_shard"] == shard, (mesh, kind)
            # Data parallel without an fsdp axis; with one, no big weight (attention, MLP, modulation) whole.
            if mesh == "data=8":
                assert len(result["replicated"]) == 9 and "layers/mlp/gate_proj/kernel" in result["replicated"]
            else:
                assert result["replicated"] == [], (mesh, kind)


@pytest.mark.parametrize("axis_names, message", [
    (("fsdp",), r"mesh axes \('fsdp',\): ernie_jax needs exactly the axes"),
    (("data", "fsdp", "context", "tensor", "pipeline"), "needs exactly the axes"),
])
def test_a_mesh_without_the_projects_axes_is_refused_up_front(tiny_folder, tmp_path, axis_names, message):
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(axis_names)), axis_names)
    # Before reading any file: tmp_path is not a pipeline folder.
    with pytest.raises(ValueError, match=message):
        ErnieImagePipeline.from_pretrained(tmp_path, "float32", mesh=mesh)
    with pytest.raises(ValueError, match=message):
        ernie_jax.load_transformer(tiny_folder, mesh=mesh)
    with pytest.raises(ValueError, match=message):
        parallel.sharded_forward(ernie_jax.load_transformer(tiny_folder), mesh, parallel.INFERENCE_RULES)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh, got dict"):
        parallel.normalize_mesh({"fsdp": 8})
