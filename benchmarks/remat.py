"""Remat policies compared: XLA temporaries and compile time of one training step, per policy.

Runs `python -m ernie_jax.plan --mode train` (AOT compilation on emulated devices, nothing allocated)
once per policy in `ernie_jax.models.layers.REMAT_POLICIES`.

    python benchmarks/remat.py [--preset small] [--resolution 512] [--batch 8] [--mesh fsdp=8]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ernie_jax.models.layers import REMAT_POLICIES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--resolution", default="512")
    parser.add_argument("--batch", default="8")
    parser.add_argument("--mesh", default="fsdp=8")
    args = parser.parse_args()
    print(f"training step, preset {args.preset}, {args.resolution}^2, batch {args.batch}, mesh {args.mesh}")
    for policy in sorted(REMAT_POLICIES):
        result = subprocess.run(
            [sys.executable, "-m", "ernie_jax.plan", "--mode", "train", "--preset", args.preset, "--resolution",
             args.resolution, "--batch", args.batch, "--mesh", args.mesh, "--remat", policy], cwd=REPO,
            capture_output=True, text=True, check=True)
        temporaries = re.search(r"temporaries \(activations, workspace\)\s+(\S+) GiB", result.stdout).group(1)
        total = re.search(r"total\s+(\S+) GiB", result.stdout).group(1)
        seconds = re.search(r"compiled in (\d+) s", result.stdout).group(1)
        print(f"  remat {policy:14s} temporaries {temporaries:>7s} GiB  total {total:>7s} GiB per device  "
              f"compile {seconds} s")


if __name__ == "__main__":
    main()
