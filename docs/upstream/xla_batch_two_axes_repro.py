"""XLA SPMD partitioner: wrong dot result when the batch is split over two mesh axes and the other operand's
free dimension over the second of them.

Seen with jax/jaxlib 0.10.2 on CPU (8 emulated devices), with the Shardy partitioner (default) and with
GSPMD (`jax_use_shardy_partitioner=False`) alike: both hand the same shardings to XLA's SPMD partitioner.

    x [M, K] sharded P(("a", "b"), "c")     rows over (a, b), contraction over c
    w [K, N] sharded P("c", "b")            contraction over c, columns over b (the *second* row axis)
    x @ w    sharded P(("a", "b"), "c")     (the out sharding; sharding propagation picks it inside a
                                             model when the product feeds tensor-parallel elementwise ops)

Expected: x @ w. With w = identity the result must equal x.
Actual:   the row blocks of the shards (a=0, b=1) and (a=1, b=0) are swapped: rows 1 and 2 below.

The partitioned HLO (`jax.jit(...).lower(...).compile().as_text()`) shows why: the partitioner
collective-permutes x from rows over (a, b) to rows over (b, a) (source_target_pairs {2,4},{4,2},{3,5},{5,3}
on this mesh), all-gathers w over b, multiplies, all-reduces over c, and returns the product as if its rows
were still over (a, b); the permute back is missing.

Sweeping every 2-D sharding of x, w and the output over a 2x2x2 mesh, this pattern is the only failure
(rows over (p, q), contraction over r, w's columns over q, output columns over r), for every choice of
p, q, r. The transposed product x.T @ y (contraction over the split rows) is always right.

Workaround in ernie_jax (parallel.py): the batch rule lists "fsdp" first, batch -> ("fsdp", "data"),
so that no weight axis is ever the second batch axis (weights are split over fsdp and tensor only).

Run: python docs/upstream/xla_batch_two_axes_repro.py   (exit status 1 while the bug is present)
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def main() -> int:
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("a", "b", "c"))
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    w = np.eye(2, dtype=np.float32)
    matmul = jax.jit(jnp.matmul, in_shardings=(NamedSharding(mesh, P(("a", "b"), "c")),
                                                NamedSharding(mesh, P("c", "b"))),
                     out_shardings=NamedSharding(mesh, P(("a", "b"), "c")))
    actual = np.asarray(matmul(x, w))
    print(f"jax {jax.__version__}, shardy={jax.config.jax_use_shardy_partitioner}")
    print("expected x @ identity:\n", x)
    print("actual:\n", actual)
    if np.array_equal(actual, x):
        print("OK: the bug is fixed in this version")
        return 0
    print("WRONG: rows", np.flatnonzero((actual != x).any(axis=1)).tolist(), "differ")
    return 1


if __name__ == "__main__":
    sys.exit(main())
