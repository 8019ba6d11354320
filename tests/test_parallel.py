"""Sharding: meshes, rule tables, and sharded DiT forward / sampling against the single-device result.

The sharded runs need 8 devices, emulated on CPU with XLA_FLAGS, which must be set before JAX starts:
they run in a subprocess (tests/workers/sharded_equivalence.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flax import nnx

from ernie_jax import parallel
from ernie_jax.models.dit import PRESETS, abstract_transformer
from tests.conftest import run_worker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded_results(tiny_folder):
    return run_worker("sharded_equivalence.py", str(tiny_folder))


@pytest.mark.parametrize("mesh", [
    "data=8", "fsdp=8", "fsdp=4,tensor=2", "context=2,fsdp=4",
    # Wrong with batch -> ("data", "fsdp") (an XLA bug; see parallel._BATCH_AXES).
    "data=2,fsdp=2,tensor=2",
])
def test_sharded_forward_and_loop_equal_single_device(sharded_results, mesh):
    result = sharded_results[mesh]
    assert result["forward"] <= 1e-5 and result["loop"] <= 1e-5, result


def test_orbax_checkpoint_restores_into_a_mesh(sharded_results):
    result = sharded_results["orbax_into_fsdp=4,tensor=2"]
    assert result["forward"] <= 1e-5
    assert result["gate_proj_shard"] == [2, 64, 256] and result["gate_proj"] == [2, 256, 512]


def test_parameters_are_split_not_replicated(sharded_results):
    full = [2, 256, 512]  # gate_proj: [layers, embed, mlp]; embed -> fsdp, mlp -> tensor
    expected = {"data=8": [2, 256, 512], "fsdp=8": [2, 32, 512], "fsdp=4,tensor=2": [2, 64, 256],
                "data=2,fsdp=2,tensor=2": [2, 128, 256], "context=2,fsdp=4": [2, 64, 512]}
    # Loaded straight into each mesh from safetensors (load_transformer(mesh=..., axis_rules=...)).
    for mesh, shard in expected.items():
        assert sharded_results[mesh]["gate_proj"] == full
        assert sharded_results[mesh]["gate_proj_shard"] == shard, mesh


def test_no_weight_is_split_over_a_later_batch_axis():
    # XLA mis-partitions a dot with the batch over (p, q) and a weight dimension over q
    # (docs/upstream/xla_batch_two_axes_repro.py): no rule table may ask for that.
    activation_names = {"batch", "length", "act_embed", "act_heads"}
    as_tuple = lambda axes: () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for rules in (parallel.TRAINING_RULES, parallel.INFERENCE_RULES, parallel.VAE_RULES):
        later_batch_axes = set(as_tuple(dict(rules)["batch"])[1:])
        weight_axes = {axis for name, axes in rules if name not in activation_names for axis in as_tuple(axes)}
        assert not later_batch_axes & weight_axes, rules


def test_mesh_construction_and_errors():
    import jax

    mesh = parallel.make_mesh({"fsdp": -1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": len(jax.devices()), "context": 1, "tensor": 1}
    assert parallel.parse_mesh("fsdp=4, tensor=2") == {"fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="unknown mesh axes"):
        parallel.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        parallel.make_mesh({"fsdp": -1, "data": -1})
    with pytest.raises(ValueError, match="needs 3 devices"):
        parallel.make_mesh({"data": 3})


def test_every_parameter_of_the_real_model_has_a_rule():
    state = nnx.state(abstract_transformer(PRESETS["full"]))
    mesh = parallel.make_mesh({"fsdp": -1})
    for rules in (parallel.TRAINING_RULES, parallel.INFERENCE_RULES):
        parallel.state_shardings(state, mesh, rules)  # raises on a logical name without a rule
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'mlp'"):
        parallel.logical_to_spec(("embed", "mlp"), (("embed", "fsdp"),))


def test_replicated_parameter_report():
    state = nnx.state(abstract_transformer(PRESETS["full"]))
    mesh = parallel.make_mesh({"fsdp": -1})
    # On a one-device mesh every parameter is replicated; the report lists the large ones, largest first.
    report = parallel.replicated_parameters(state, mesh, parallel.TRAINING_RULES, threshold_bytes=10**9)
    assert report[0][0].startswith("layers/mlp/") and report[0][1] == 36 * 4096 * 12288 * 4
