"""The whole pipeline on device meshes: each stage (text encoder, VAE decode, PE decode loop, denoising loop)
sharded gives what the single-device pipeline gives, and every component's rule table covers every parameter.

The sharded runs need 8 devices, emulated on CPU with XLA_FLAGS, which must be set before JAX starts: they
run in a subprocess (tests/workers/sharded_pipeline.py).
"""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ernie_jax import parallel
from ernie_jax.models import mistral
from ernie_jax.models.dit import PRESETS, abstract_transformer
from ernie_jax.models.vae import VAE_PRESETS, abstract_vae
from ernie_jax.pipeline import ErnieImagePipeline
from tests.conftest import run_worker

REPO = Path(__file__).resolve().parents[1]
# fsdp=4,tensor=2 is made by jax.make_mesh (Explicit axes); data=2,fsdp=4 by parallel.make_mesh.
MESHES = ("data=2,fsdp=4", "fsdp=4,tensor=2")


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    from conversions.random_checkpoint import write_random_pipeline

    folder = tmp_path_factory.mktemp("sharded_pipeline") / "pipeline"
    write_random_pipeline(folder, "tiny", with_pe=True)
    return folder


@pytest.fixture(scope="module")
def sharded_results(pipeline_folder, tmp_path_factory):
    images = tmp_path_factory.mktemp("generate_with_mesh")
    return run_worker("sharded_pipeline.py", str(pipeline_folder), str(images))


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_stages_equal_single_device(sharded_results, mesh):
    result = sharded_results[mesh]
    # Text features, VAE decode of 3 latents on 8 batch shards (padded), 2 prompts x 4 images with CFG.
    assert result["text"] <= 1e-5 and result["vae"] <= 1e-5 and result["images"] <= 1e-5, result
    # The same from text features and noise committed to one device (as the trainer's sample grids pass them).
    assert result["images_from_embeds"] <= 1e-5, result
    # The greedy rewrites of a batch of 2 prompts (32 new tokens each), token for token.
    assert result["pe_tokens_equal"] and result["pe_tokens"] == [32, 32], result


def test_weights_are_split_by_each_components_rules(sharded_results):
    full = {"text_encoder": [2, 64, 128], "pe": [131072, 64], "transformer": [2, 256, 512], "vae": [3, 3, 32, 64]}
    # Inference defaults: weights split over fsdp (embed) and tensor (mlp / vocab) for the transformer, text
    # encoder and PE; the VAE stays replicated.
    shards = {"data=2,fsdp=4": {"text_encoder": [2, 16, 128], "pe": [131072, 16], "transformer": [2, 64, 512],
                                "vae": [3, 3, 32, 64]},
              "fsdp=4,tensor=2": {"text_encoder": [2, 16, 64], "pe": [65536, 16], "transformer": [2, 64, 256],
                                  "vae": [3, 3, 32, 64]}}
    for mesh, expected in shards.items():
        weights = sharded_results[mesh]["weights"]
        assert {name: w["shape"] for name, w in weights.items()} == full
        assert {name: w["shard"] for name, w in weights.items()} == expected, mesh
        # Every weight over 64 KiB of the transformer, text encoder and PE is split (the PE's 32 MiB
        # embedding included).
        assert sharded_results[mesh]["replicated"] == {"transformer": [], "text_encoder": [], "pe": []}, mesh


def test_generate_command_with_a_mesh(sharded_results):
    assert sharded_results["generate --mesh data=2,fsdp=4"] == {"files": 4, "size": [48, 32], "mesh": "data=2,fsdp=4"}


@pytest.fixture(scope="module")
def real_size_states():
    """The nnx states (shapes and logical names, no memory) of every real-size pipeline component."""
    return {"transformer": nnx.state(abstract_transformer(PRESETS["full"])),
            "text_encoder": nnx.state(mistral.abstract_model(mistral.PRESETS["text_encoder"], encoder_only=True)),
            "pe": nnx.state(mistral.abstract_model(mistral.PRESETS["pe"])),
            "vae": nnx.state(abstract_vae(VAE_PRESETS["full"]))}


@pytest.mark.parametrize("mode", ["training", "inference"])
def test_every_parameter_of_every_real_size_component_has_a_rule(real_size_states, mode):
    rules = parallel.component_rules(mode)
    assert sorted(rules) == sorted(real_size_states)
    mesh = jax.sharding.AbstractMesh((2, 8, 1, 4), parallel.MESH_AXES)
    # Raises on a logical name without a rule.
    specs = {name: nnx.to_pure_dict(parallel.state_shardings(state, mesh, rules[name]))
             for name, state in real_size_states.items()}
    assert all(s.spec == P(*[None] * len(s.spec)) for s in jax.tree.leaves(specs["vae"]))
    # In both modes a mesh with fsdp > 1 splits the weights over it (inference too: parallel.INFERENCE_RULES).
    for decoder in ("text_encoder", "pe"):
        layer = specs[decoder]["layers"]
        assert layer["mlp"]["gate_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
        assert layer["self_attn"]["k_proj"]["kernel"].spec == P(None, "fsdp", "tensor")  # 8 KV heads * 128 / 4
    assert specs["pe"]["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
    assert specs["transformer"]["layers"]["mlp"]["gate_proj"]["kernel"].spec == P(None, "fsdp", "tensor")


def test_rule_overrides_and_their_errors():
    rules = parallel.component_rules("inference", {"text_encoder": parallel.VAE_RULES})
    assert rules["text_encoder"] is parallel.VAE_RULES and rules["transformer"] is parallel.INFERENCE_RULES
    with pytest.raises(ValueError, match=r"rules for unknown components \['unet'\]"):
        parallel.component_rules("inference", {"unet": parallel.INFERENCE_RULES})
    with pytest.raises(ValueError, match="mode must be one of"):
        parallel.component_rules("serving")
    mesh = jax.sharding.AbstractMesh((2, 2, 1, 2), parallel.MESH_AXES)
    assert parallel.batch_shard_count(mesh, parallel.VAE_RULES) == 8
    assert parallel.batch_shard_count(mesh, parallel.INFERENCE_RULES) == 4


def test_rules_without_a_mesh_are_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="pass mesh too"):
        ErnieImagePipeline.from_pretrained(tmp_path, "float32", rules={"vae": parallel.VAE_RULES})
