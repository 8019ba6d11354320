"""Runs the tiny random ERNIE-Image pipeline (with PE) loaded straight into emulated-device meshes and prints,
as JSON, each stage's largest relative error against the same pipeline on one device, whether the greedy PE
tokens are identical, the per-device shard shapes of big weights and the weights over 64 KiB that each
component's rules leave whole; then runs
`python -m ernie_jax.generate --mesh ...` in-process, writing into OUT.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/workers/sharded_pipeline.py FOLDER OUT
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image

from ernie_jax import generate, parallel
from ernie_jax.pipeline import ErnieImagePipeline
from tests.workers.common import relative_error

# name -> (mesh, whether it is also the context mesh), with the inference rules (weights split over fsdp and
# tensor): the project's own mesh, and one made by jax.make_mesh (Explicit axes, which every entry point takes
# as Auto: parallel.normalize_mesh) and set with jax.set_mesh around the whole run, as the flax examples do.
MESHES = {"data=2,fsdp=4": (lambda: parallel.make_mesh({"data": 2, "fsdp": 4}), False),
          "fsdp=4,tensor=2": (lambda: jax.make_mesh((1, 4, 1, 2), parallel.MESH_AXES), True)}
PROMPTS = ["a red circle at the top left", "一只猫 on a wooden table, soft light", "a blue square"]
# Weights whose shard shapes are reported: component -> path in its nnx state.
WEIGHTS = {"text_encoder": ("layers", "mlp", "gate_proj", "kernel"), "pe": ("embed_tokens", "embedding"),
           "transformer": ("layers", "mlp", "gate_proj", "kernel"), "vae": ("decoder", "conv_in", "kernel")}


def stages(pipe: ErnieImagePipeline) -> dict:
    """Each stage's outputs on fixed inputs: text features, VAE decode of 3 latents (fewer than the batch
    shards, and not a multiple of them), the greedy PE rewrites of a batch of 2 prompts as token ids, and the
    whole pipeline's images (2 prompts x 4 images, CFG)."""
    # The random PE's greedy tokens lie mostly outside the tiny tokenizer's 400 entries (they decode to
    # nothing), so the rewrites are read as their token ids; 32 new tokens at most keep the loop short.
    pipe.pe_tokenizer.decode = lambda ids, skip_special_tokens: " ".join(map(str, ids))
    pipe.pe_tokenizer.model_max_length = 32
    rng = np.random.default_rng(0)
    # Text features and noise made on one device (committed there, as the trainer's sample grids pass them):
    # the pipeline takes them whatever its mesh.
    on_one_device = lambda x: jax.device_put(np.asarray(x, np.float32), jax.devices()[0])
    width = pipe.transformer.config.text_in_dim
    embeds = [on_one_device(rng.standard_normal((length, width))) for length in (3, 5)]
    negative_embeds = [on_one_device(np.zeros((1, width)))] * 2
    noise = on_one_device(rng.standard_normal((2, 128, 2, 2)))
    return {
        "images_from_embeds": pipe(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, latents=noise,
                                   height=32, width=32, num_inference_steps=2, guidance_scale=4.0,
                                   output_type="np").images,
        "text": np.concatenate([np.asarray(h) for h in pipe.encode_prompt(PROMPTS)]),
        "vae": pipe.decode_latents(rng.standard_normal((3, 128, 2, 3), np.float32)),
        "pe_tokens": pipe.enhance_prompt(PROMPTS[:2], width=32, height=32, temperature=0),
        "images": pipe(prompt=PROMPTS[:2], negative_prompt=["", "blurry"], height=32, width=32,
                       num_inference_steps=2, guidance_scale=4.0, num_images_per_prompt=4, seed=0,
                       output_type="np", use_pe=False).images,
    }


def shard_shapes(pipe: ErnieImagePipeline) -> dict:
    shapes = {}
    for component, path in WEIGHTS.items():
        value = nnx.state(getattr(pipe, component))
        for name in path:
            value = value[name]
        value = value[...]
        shapes[component] = {"shape": list(value.shape), "shard": list(value.addressable_shards[0].data.shape)}
    return shapes


def generate_with_mesh(folder, out, mesh: str) -> dict:
    generate.main(["--model", str(folder), "--prompt", "a cat", "--height", "32", "--width", "48", "--steps", "2",
                   "--num-images", "2", "--no-pe", "--dtype", "float32", "--mesh", mesh, "--out", str(out)])
    record = json.loads((Path(out) / "000_00.json").read_text())
    return {"files": len(list(Path(out).iterdir())), "size": list(Image.open(Path(out) / "000_00.png").size),
            "mesh": record["mesh"]}


def main(folder, out):
    expected = stages(ErnieImagePipeline.from_pretrained(folder, "float32"))
    results = {}
    for name, (make_mesh, as_context) in MESHES.items():
        mesh = make_mesh()
        with jax.set_mesh(mesh) if as_context else contextlib.nullcontext():
            pipe = ErnieImagePipeline.from_pretrained(folder, "float32", mesh=mesh)
            actual = stages(pipe)
        results[name] = {stage: relative_error(actual[stage], expected[stage])
                         for stage in ("text", "vae", "images", "images_from_embeds")}
        results[name]["pe_tokens_equal"] = actual["pe_tokens"] == expected["pe_tokens"]
        results[name]["pe_tokens"] = [len(row.split()) for row in actual["pe_tokens"]]
        results[name]["weights"] = shard_shapes(pipe)
        results[name]["replicated"] = {
            component: parallel.replicated_parameters(getattr(pipe, component), pipe.mesh, pipe.rules[component],
                                                      threshold_bytes=64 * 1024)
            for component in ("transformer", "text_encoder", "pe")}
    results["generate --mesh data=2,fsdp=4"] = generate_with_mesh(folder, out, "data=2,fsdp=4")
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
