"""Measuring helpers shared by the benchmark scripts: alternating timing blocks, the matmul peak of each
runtime, the DiT forward's FLOP count, and how busy other processes keep this (shared) machine."""

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


def _matmul_operand(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, n), np.float32)


def jax_matmul_seconds(n: int, dtype: str, repeats: int) -> float:
    """Median seconds of a jitted `x @ x` (n x n, `dtype`) on jax's default device, result awaited."""
    operand = jnp.asarray(_matmul_operand(n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    return median_seconds(lambda: matmul(operand).block_until_ready(), repeats)


def torch_matmul_seconds(n: int, dtype: str, repeats: int) -> float:
    """Median seconds of `torch.mm(x, x)` (n x n, `dtype`) on CUDA when available (each call synchronised),
    else on the CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    operand = torch.from_numpy(_matmul_operand(n)).to(device=device, dtype=getattr(torch, dtype))

    def call():
        torch.mm(operand, operand)
        if device == "cuda":
            torch.cuda.synchronize()

    return median_seconds(call, repeats)


def matmul_peak(repeats: int) -> float:
    """Best fp32 matmul FLOP/s of torch and jax on this machine (2048^3)."""
    n = 2048
    return 2 * n**3 / min(torch_matmul_seconds(n, "float32", repeats), jax_matmul_seconds(n, "float32", repeats))


def forward_flops(config, batch: int, num_image: int, text_len: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one DiT forward of `batch` samples, each `num_image` image tokens
    ((H/p) * (W/p)) and `text_len` padded text tokens, for an `ErnieImageConfig`. Per sample, with
    S = num_image + text_len, D hidden, F ffn width, L layers, C / C_out latent channels, p patch size:

        L * (2 S (4 D^2 + 3 D F)        q, k, v, out projections; gate, up, down of the MLP
             + 4 S^2 D)                 attention scores q k^T and their product with v, all heads
        + 2 num_image C p^2 D           patch embedding
        + 2 text_len D_text D           text projection (absent when D_text = D)
        + 2 num_image D C_out p^2       final linear (image tokens only)
        + 2 (2 D^2 + 6 D^2 + 2 D^2)     timestep MLP, shared AdaLN modulation, final norm's linear

    Padded text tokens count: both implementations compute them. Elementwise work (norms, RoPE, softmax,
    modulation) is left out; XLA's cost analysis, which counts it, comes out 1-3% higher at test sizes.
    """
    d, f, s = config.hidden_size, config.ffn_hidden_size, num_image + text_len
    patch_pixels = config.patch_size**2
    per_layer = 2 * s * (4 * d * d + 3 * d * f) + 4 * s * s * d
    embed = 2 * num_image * config.in_channels * patch_pixels * d
    if config.has_text_proj:
        embed += 2 * text_len * config.text_in_dim * d
    head = 2 * num_image * d * config.out_channels * patch_pixels + 2 * (2 * d * d + 6 * d * d + 2 * d * d)
    return float(batch * (config.num_layers * per_layer + embed + head))


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
