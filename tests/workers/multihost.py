"""One of two JAX processes that together form one 8-device mesh (4 emulated CPU devices each, gloo
collectives): loads the tiny DiT, shards it over the global mesh, runs the sharded forward and a 4-step CFG
sampling loop on the same inputs in both processes, gathers the results and, on process 0, prints as JSON
their largest relative error against the single-device result computed locally (no mesh).

Usage (one command per process, same PORT):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/workers/multihost.py FOLDER PORT PROCESS_ID [OUT]

Process 0 also writes the JSON to OUT when given (gloo logs to stdout too, so the line may not come last).

Two ways in are checked per mesh: identical host (numpy) inputs in both processes, handed to the library as
they are, and global arrays assembled from each process's own rows of the batch
(`jax.make_array_from_process_local_data`), the way a multi-host data loader feeds them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

NUM_PROCESSES = 2
LOCAL_DEVICES = 4


def process_rows(x, sharding):
    """The global array with batch sharding `sharding` built from this process's rows of host array `x` only
    (the rows its devices hold), as a multi-host loader provides them."""
    import numpy as np

    indices = sharding.addressable_devices_indices_map(x.shape).values()
    rows = sorted({index[0].indices(x.shape[0]) for index in indices})
    start, stop = rows[0][0], rows[-1][1]
    assert all(rows[i][1] == rows[i + 1][0] for i in range(len(rows) - 1)), rows  # contiguous
    return jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(x[start:stop]), x.shape)


def main(folder, port, process_id, out=None):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=NUM_PROCESSES,
                               process_id=process_id)
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    import ernie_jax
    from ernie_jax import parallel, sampling
    from tests.workers.common import relative_error, tiny_inputs

    assert jax.process_count() == NUM_PROCESSES and jax.process_index() == process_id
    assert len(jax.local_devices()) == LOCAL_DEVICES and len(jax.devices()) == NUM_PROCESSES * LOCAL_DEVICES

    inputs = tiny_inputs()  # the same arrays in every process
    latents, timesteps, text, text_lens, negative, negative_lens = (inputs[k] for k in (
        "latents", "timesteps", "text", "text_lens", "negative", "negative_lens"))
    loop_kwargs = dict(num_inference_steps=4, guidance_scale=4.0)

    results = {"process_count": jax.process_count(), "global_devices": len(jax.devices())}
    if process_id == 0:
        reference = ernie_jax.load_transformer(folder)  # this process's first device
        expected_forward = np.asarray(reference(latents, timesteps, text, text_lens))
        expected_loop = np.asarray(sampling.sample(reference, latents, text, text_lens, negative_text_bth=negative,
                                                   negative_text_lens=negative_lens, **loop_kwargs))

    meshes = {"fsdp=4,tensor=2": ({"fsdp": 4, "tensor": 2}, parallel.TRAINING_RULES),
              "data=8": ({"data": 8}, parallel.INFERENCE_RULES)}
    for name, (sizes, rules) in meshes.items():
        mesh = parallel.make_mesh(sizes)  # over jax.devices(): all 8, of both processes
        model = parallel.shard_model(ernie_jax.load_transformer(folder), mesh, rules)
        kernel = nnx.state(model, nnx.Param)["layers"]["mlp"]["gate_proj"]["kernel"][...]
        assert not kernel.is_fully_addressable and len(kernel.sharding.device_set) == len(jax.devices())
        forward = parallel.sharded_forward(model, mesh, rules)

        def global_batch(*arrays, mesh=mesh, rules=rules):
            return tuple(process_rows(x, parallel.batch_sharding(mesh, rules, x.shape)) for x in arrays)

        outputs = {
            "forward_host": forward(latents, timesteps, text, text_lens),
            "forward_global": forward(*global_batch(latents, timesteps, text, text_lens)),
            "loop_host": sampling.sample(model, latents, text, text_lens, negative_text_bth=negative,
                                         negative_text_lens=negative_lens, mesh=mesh, rules=rules, **loop_kwargs),
        }
        g_latents, g_text, g_lens, g_negative, g_negative_lens = global_batch(latents, text, text_lens, negative,
                                                                              negative_lens)
        outputs["loop_global"] = sampling.sample(model, g_latents, g_text, g_lens, negative_text_bth=g_negative,
                                                 negative_text_lens=g_negative_lens, mesh=mesh, rules=rules,
                                                 **loop_kwargs)
        entry = {"gate_proj": list(kernel.shape),
                 "gate_proj_shard": list(kernel.addressable_shards[0].data.shape)}
        for key, value in outputs.items():
            assert not value.is_fully_addressable, key  # a global array over both processes
            gathered = multihost_utils.process_allgather(value, tiled=True)
            if process_id == 0:
                entry[key] = relative_error(gathered, expected_forward if key.startswith("forward") else expected_loop)
        # The loader's own placement: each process reads only its devices' slices of the file.
        direct = ernie_jax.load_transformer(folder, mesh=mesh, axis_rules=rules)
        value = parallel.sharded_forward(direct, mesh, rules)(latents, timesteps, text, text_lens)
        gathered = multihost_utils.process_allgather(value, tiled=True)
        if process_id == 0:
            entry["forward_loaded_into_mesh"] = relative_error(gathered, expected_forward)
        results[name] = entry

    multihost_utils.sync_global_devices("multihost worker done")
    if process_id == 0:
        print(json.dumps(results), flush=True)
        if out:
            Path(out).write_text(json.dumps(results))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
