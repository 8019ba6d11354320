"""Remat policies compared: device memory, recompute and compile time of one training step, per policy.

Runs `python -m ernie_jax.plan --mode train --json` (AOT compilation on emulated devices, nothing
allocated) once per policy in `ernie_jax.models.layers.REMAT_POLICIES`. FLOPs are XLA's cost analysis
of the compiled step, which counts a scanned loop body once: the column compares the policies' recompute
in one block's forward and backward pass (plus the embedding, head and optimizer), as a ratio to "none".

    python benchmarks/remat.py [--preset small] [--resolution 512] [--batch 8] [--mesh fsdp=8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ernie_jax.models.layers import REMAT_POLICIES

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--resolution", default="512")
    parser.add_argument("--batch", default="8")
    parser.add_argument("--mesh", default="fsdp=8")
    args = parser.parse_args()
    print(f"training step, preset {args.preset}, {args.resolution}^2, batch {args.batch}, mesh {args.mesh}")
    reports = {}
    for policy in REMAT_POLICIES:
        result = subprocess.run(
            [sys.executable, "-m", "ernie_jax.plan", "--json", "--mode", "train", "--preset", args.preset,
             "--resolution", args.resolution, "--batch", args.batch, "--mesh", args.mesh, "--remat", policy],
            cwd=REPO, capture_output=True, text=True, check=True)
        reports[policy] = json.loads(result.stdout.strip().splitlines()[-1])
    for policy, report in reports.items():
        print(f"  remat {policy:22s} temporaries {report['temporaries (activations, workspace)'] / GIB:7.2f} GiB  "
              f"offloaded {report['offloaded to host'] / GIB:6.2f} GiB  total {report['total'] / GIB:7.2f} GiB "
              f"per device  FLOPs x{report['flops'] / reports['none']['flops']:.2f}  "
              f"compile {report['compile_seconds']:.0f} s")


if __name__ == "__main__":
    main()
