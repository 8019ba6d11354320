"""Plain (compiled) calls of the tiny DiT with its parameters placed on an emulated fsdp=4, tensor=2 mesh, outside
and inside `parallel.activation_sharding`. Prints, as JSON, their relative errors against the single-device
plain call, one weight's shard shape, and how many times the model's math had been traced after each call.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/workers/sharded_plain_call.py FOLDER
"""

from __future__ import annotations

import json
import sys

import numpy as np
from flax import nnx

import ernie_jax
from ernie_jax import parallel
from ernie_jax.models import layers
from tests.workers.common import relative_error, tiny_inputs


def main(folder):
    traces = [0]
    timestep_sinusoid = layers.timestep_sinusoid

    def counting_sinusoid(*args, **kwargs):  # the DiT's math calls it once per trace
        traces[0] += 1
        return timestep_sinusoid(*args, **kwargs)

    layers.timestep_sinusoid = counting_sinusoid
    inputs = tiny_inputs()
    arrays = [inputs[k] for k in ("latents", "timesteps", "text", "text_lens")]
    model = ernie_jax.load_transformer(folder)
    expected = np.asarray(model(*arrays))
    counts = [traces[0]]

    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    rules = parallel.TRAINING_RULES
    parallel.shard_model(model, mesh, rules)
    sharded = np.asarray(model(*arrays))
    counts.append(traces[0])
    model(*arrays)
    counts.append(traces[0])
    with parallel.activation_sharding(mesh, rules):
        constrained = np.asarray(model(*arrays))
        counts.append(traces[0])
        model(*arrays)
        counts.append(traces[0])
    np.testing.assert_array_equal(np.asarray(model(*arrays)), sharded)
    counts.append(traces[0])
    kernel = nnx.state(model, nnx.Param)["layers"]["mlp"]["gate_proj"]["kernel"][...]
    print(json.dumps(dict(sharded=relative_error(sharded, expected), constrained=relative_error(constrained, expected),
                          gate_proj_shard=list(kernel.addressable_shards[0].data.shape), traces=counts)))


if __name__ == "__main__":
    main(sys.argv[1])
