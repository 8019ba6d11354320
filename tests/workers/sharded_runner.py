"""The runner's stages and callbacks on 8 emulated devices, in one process (one start for both checks): the
export of a fully sharded EMA (export_sharded) and the sample-grid and eval-loss programs on the training
mesh (sharded_callbacks). Prints both reports as one JSON object.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/workers/sharded_runner.py WORKDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.workers import export_sharded, sharded_callbacks

if __name__ == "__main__":
    workdir = Path(sys.argv[1])
    print(json.dumps({"export": export_sharded.run(workdir / "export"),
                      "callbacks": sharded_callbacks.run(workdir / "callbacks")}))
