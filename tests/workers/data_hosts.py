"""One of two JAX processes that each build the training data pipeline for their own host shard, with the
default sharding (`jax.process_index()`/`process_count()`) and the default cross-host agreement on bucket
probabilities (`mean_over_processes`, an allgather over gloo). Writes what it drew as JSON.

Usage (one command per process, same PORT):
    python tests/workers/data_hosts.py PORT PROCESS_ID OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

STEPS = 20


def main(port: int, process_id: int, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_data import TINY_BUCKETS, caption_index, tiny_records

    from ernie_jax.data.curriculum import Curriculum, Stage
    from ernie_jax.data.pipeline import PipelineConfig, build_pipeline

    data = build_pipeline(tiny_records(40), PipelineConfig(Curriculum((Stage(0, None, TINY_BUCKETS, 8),))))
    batches = [data.dataset[step] for step in range(STEPS)]
    local_mass = [float(data.tables[0].probs[data.tables[0].record_buckets == b].sum()) for b in range(3)]
    Path(out).write_text(json.dumps({
        "shard": [jax.process_index(), jax.process_count()],
        "local_mass": local_mass,
        "bucket_probs": data.tables[0].bucket_probs.tolist(),
        "buckets": [list(batch["bucket"]) for batch in batches],
        "indices": [[caption_index(caption) for caption in batch["captions"]] for batch in batches],
    }))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
