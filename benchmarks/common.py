"""Measuring helpers shared by the benchmark scripts: alternating timing blocks, the fp32 matmul peak, and
how busy other processes keep this (shared) machine."""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch


def alternating_times(fns, blocks: int, per_block: int, warmup: int = 1) -> list[list[float]]:
    """Wall times of each function's timed calls (warm-up excluded), in `blocks` rounds ordered A B, B A, ...

    Back-to-back calls of different runtimes disturb each other on 2 cores (torch's OpenMP and XLA's
    thread pools spin after work), so each block runs one function alone, starting with `warmup`
    untimed calls, and the mirrored order cancels slow drift of the machine. Returns, per function, its
    `blocks * per_block` times in seconds, in call order.
    """
    times = [[] for _ in fns]
    for block in range(blocks):
        order = range(len(fns)) if block % 2 == 0 else reversed(range(len(fns)))
        for index in order:
            for _ in range(warmup):
                fns[index]()
            for _ in range(per_block):
                start = time.perf_counter()
                fns[index]()
                times[index].append(time.perf_counter() - start)
    return times


def paired_median_seconds(fns, repeats: int) -> list[float]:
    """Median wall time of each function (warm-up excluded), measured in two blocks ordered A B B A."""
    return [statistics.median(record) for record in alternating_times(fns, 2, max(1, repeats // 2))]


def median_seconds(fn, repeats: int) -> float:
    return paired_median_seconds([fn], repeats)[0]


def matmul_peak(repeats: int) -> float:
    """Best fp32 matmul FLOP/s of torch and jax on this machine (2048^3)."""
    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    ta = torch.from_numpy(a)
    ja = jnp.asarray(a)
    jmm = jax.jit(lambda x: x @ x)
    torch_s = median_seconds(lambda: torch.mm(ta, ta), repeats)
    jax_s = median_seconds(lambda: jmm(ja).block_until_ready(), repeats)
    return 2 * n**3 / min(torch_s, jax_s)


class MachineLoad:
    """How busy other processes kept this machine's CPUs since creation (Linux /proc/stat minus this
    process's CPU time): a benchmark's numbers mean little when it is high."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except OSError:
            return None
        return sum(ticks), ticks[3] + ticks[4], time.process_time()

    def report(self) -> str:
        end = self._read()
        if self.start is None or end is None:
            return "machine load unknown"
        hz = os.sysconf("SC_CLK_TCK")
        total, idle, own = (b - a for a, b in zip(self.start, end, strict=True))
        other = max(0.0, (total - idle) / hz - own) / (total / hz)
        return f"other processes kept the {os.cpu_count()} CPUs {other:.0%} busy during this case"
