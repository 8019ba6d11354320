"""Host memory and time of loading a large transformer: whole-file load vs sharded loading vs Orbax restore.

Writes a synthetic diffusers transformer (random weights of a wide DiT config, safetensors shards with an
index as released checkpoints have) and its Orbax conversion (`python -m conversions.convert`) into a work
folder, then loads it once per method, each in a fresh process on emulated CPU devices:

- naive: every shard read whole into host memory (`safetensors.numpy.load_file`), then placed on the mesh;
- sharded: `load_transformer(folder, mesh=mesh, axis_rules=TRAINING_RULES)`, each device reading its slice
  of the memory-mapped shards (`jax.make_array_from_callback`);
- orbax: `load_transformer(converted, mesh=mesh, axis_rules=TRAINING_RULES)`, Orbax restoring into the same
  shardings;
- single: `load_transformer(folder)` onto one device.

On CPU the devices' memory is host memory, so the loaded model itself is resident. The number that matters is
the loading overhead: peak minus (the RSS right after `import jax` + the bytes the loaded model occupies).
RSS counts anonymous memory and the file-backed pages of memory-mapped files (clean page cache, dropped by
the kernel under pressure, never swapped); both are reported apart (RssAnon / RssFile of /proc/PID/status,
sampled by this process every few milliseconds), beside the child's exact total peak (`ru_maxrss`).

    python benchmarks/loading.py [--size default|small] [--workdir DIR] [--only naive,sharded,orbax,single]
                                 [--mesh fsdp=8] [--dtype float32|bfloat16]

`--size default` is the released DiT's width (hidden 4096, 32 heads, ffn 12288) with 3 blocks: 3.34 GB in
float32 over 5 files. `--size small` (hidden 1024, 2 blocks, 0.15 GB) is a quick smoke run. Without
`--workdir` the checkpoints go to a temporary folder removed at the end; with it they are written once
and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax
import numpy as np
from flax import nnx

import ernie_jax
from conversions import transformer as weights
from conversions.checkpoint_files import resolve_dtype
from conversions.common import atomic_directory
from conversions.safetensors_io import write_sharded
from ernie_jax import parallel
from ernie_jax.models.dit import PRESETS

SIZES = {
    "default": dataclasses.replace(PRESETS["full"], num_layers=3),
    "small": dataclasses.replace(PRESETS["full"], hidden_size=1024, num_attention_heads=8, num_layers=2,
                                 ffn_hidden_size=3072, text_in_dim=256),
}
METHODS = ("naive", "sharded", "orbax", "single")
SHARDS = 4  # a size bound of total / 4 per file; greedy packing makes it 4 or 5 files
POLL_SECONDS = 0.003
RESULT_PREFIX = "RESULT "
GB = 1e9


class RandomTensor:
    """A random tensor drawn only when numpy asks for its values (`__array__`), so that writing a checkpoint
    holds one shard in memory, not the whole model."""

    def __init__(self, shape: tuple[int, ...], dtype, seed: int):
        self.shape, self.dtype, self.seed = tuple(shape), np.dtype(dtype), seed
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        values = np.random.default_rng(self.seed).standard_normal(self.shape, np.float32) * np.float32(0.02)
        return values.astype(dtype or self.dtype)


def write_checkpoint(folder: Path, config, dtype) -> None:
    """A diffusers transformer folder with random weights in `dtype`, split into about `SHARDS` files."""
    shapes = weights.expected_torch_shapes(config)
    tensors = {key: RandomTensor(shape, dtype, seed) for seed, (key, shape) in enumerate(sorted(shapes.items()))}
    total = sum(t.nbytes for t in tensors.values())
    with atomic_directory(folder) as staging:
        write_sharded(staging, weights.WEIGHTS_NAME.removesuffix(".safetensors"), tensors, -(-total // SHARDS))
        (staging / "config.json").write_text(json.dumps(weights.diffusers_config(config), indent=2) + "\n")


def memory_status(pid="self") -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process in bytes (absent keys: the process has exited)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile"):
                    values[name] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def run_measured(command: list[str], env: dict) -> tuple[float, dict[str, int], str]:
    """Runs `command`, sampling its memory until it exits: (wall seconds, peak of each status field, output)."""
    peaks: dict[str, int] = {}
    with tempfile.TemporaryFile("w+") as output:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        while process.poll() is None:
            for name, value in memory_status(process.pid).items():
                peaks[name] = max(peaks.get(name, 0), value)
            time.sleep(POLL_SECONDS)
        seconds = time.perf_counter() - start
        output.seek(0)
        text = output.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{text[-3000:]}")
    return seconds, peaks, text


def load(method: str, folder: Path, converted: Path, mesh, dtype: str):
    """The transformer loaded by `method` (see the module docstring)."""
    if method == "naive":
        import safetensors.numpy

        checkpoint = weights.open_checkpoint(folder)
        state_dict = {}
        for path in checkpoint.tensors.files:
            state_dict.update(safetensors.numpy.load_file(path))
        return weights.load_checkpoint(dataclasses.replace(checkpoint, tensors=state_dict), dtype, mesh=mesh,
                                       axis_rules=parallel.TRAINING_RULES)
    if method == "single":
        return ernie_jax.load_transformer(folder, dtype)
    source = {"sharded": folder, "orbax": converted}[method]
    return ernie_jax.load_transformer(source, dtype, mesh=mesh, axis_rules=parallel.TRAINING_RULES)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (less disturbed than wall time on a busy machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(method: str, folder: Path, converted: Path, mesh_text: str, dtype: str) -> None:
    """One measurement, in its own process: prints the result as one JSON line."""
    mesh = parallel.make_mesh(parallel.parse_mesh(mesh_text))
    baseline = memory_status()
    start, start_cpu = time.perf_counter(), cpu_seconds()
    model = load(method, folder, converted, mesh, dtype)
    arrays = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))
    jax.block_until_ready(arrays)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    shard_bytes = [shard.data.nbytes for array in arrays for shard in array.addressable_shards]
    result = {"seconds": seconds, "cpu_seconds": cpu, "baseline": baseline, "after": memory_status(),
              "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "resident": sum(shard_bytes),
              "largest_parameter": max(a.nbytes for a in arrays), "largest_shard": max(shard_bytes)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def measure(method: str, folder: Path, converted: Path, args) -> dict:
    devices = math.prod(parallel.parse_mesh(args.mesh).values())
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=str(REPO))
    seconds, peaks, text = run_measured(
        [sys.executable, __file__, "--child", method, "--folder", str(folder), "--converted", str(converted),
         "--mesh", args.mesh, "--dtype", args.dtype], env)
    line = next(line for line in text.splitlines() if line.startswith(RESULT_PREFIX))
    result = json.loads(line[len(RESULT_PREFIX):])
    base = result["baseline"]
    result.update(peaks=peaks, process_seconds=seconds,
                  overhead_anon=peaks["RssAnon"] - base["RssAnon"] - result["resident"],
                  overhead_rss=result["max_rss"] - base["VmRSS"] - result["resident"])
    return result


def gb(value: float) -> str:
    return f"{value / GB:6.2f}"


def print_table(results: dict[str, dict], largest_tensor: int) -> None:
    print(f"\n{'method':8s} {'load s':>7s} {'CPU s':>6s} {'peak RSS':>9s} {'peak anon':>9s} {'peak file':>9s} "
          f"{'resident':>9s} {'base RSS':>9s} {'overhead anon':>13s} {'overhead RSS':>12s} {'anon ovh/tensor':>15s} "
          f"{'anon after':>10s}")
    for method, r in results.items():
        print(f"{method:8s} {r['seconds']:7.1f} {r['cpu_seconds']:6.1f} {gb(r['max_rss']):>9s} "
              f"{gb(r['peaks']['RssAnon']):>9s} {gb(r['peaks']['RssFile']):>9s} {gb(r['resident']):>9s} "
              f"{gb(r['baseline']['VmRSS']):>9s} {gb(r['overhead_anon']):>13s} {gb(r['overhead_rss']):>12s} "
              f"{r['overhead_anon'] / largest_tensor:15.2f} {gb(r['after']['RssAnon']):>10s}")
    print("(GB = 1e9 bytes; CPU s: user + system seconds of the load; overhead = peak - RSS after import jax - "
          "resident model bytes; ovh/tensor: anonymous overhead over the largest checkpoint tensor; anon after: "
          "RssAnon once loaded)")
    if "naive" in results:
        naive = results["naive"]
        for method in (m for m in results if m != "naive"):
            r = results[method]
            print(f"naive / {method}: anonymous overhead {naive['overhead_anon'] / max(r['overhead_anon'], 1):.1f}x, "
                  f"RSS overhead {naive['overhead_rss'] / max(r['overhead_rss'], 1):.1f}x, "
                  f"time {naive['seconds'] / r['seconds']:.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--workdir", type=Path, help="where the checkpoints are written once and kept")
    parser.add_argument("--only", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--mesh", default="fsdp=8", help="mesh of emulated CPU devices for the mesh methods")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="stored and loaded parameter dtype")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--converted", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.folder, args.converted, args.mesh, args.dtype)
        return
    methods = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--only: unknown methods {unknown}; choose from {METHODS}")

    config = SIZES[args.size]
    shapes = weights.expected_torch_shapes(config)
    itemsize = resolve_dtype(args.dtype).itemsize
    largest_key, largest_shape = max(shapes.items(), key=lambda item: math.prod(item[1]))
    largest_tensor = math.prod(largest_shape) * itemsize
    total = sum(math.prod(s) for s in shapes.values()) * itemsize
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ernie_jax_loading_"))
    try:
        folder = workdir / f"{args.size}-{args.dtype}" / "transformer"
        converted = workdir / f"{args.size}-{args.dtype}" / "converted"
        print(f"{args.size}: hidden {config.hidden_size}, {config.num_layers} blocks, ffn {config.ffn_hidden_size}, "
              f"{args.dtype} stored and loaded; {len(shapes)} tensors, {total / GB:.2f} GB; largest "
              f"{largest_key} {list(largest_shape)} {largest_tensor / GB:.3f} GB; mesh {args.mesh} (CPU)")
        if not folder.exists():
            start = time.perf_counter()
            write_checkpoint(folder, config, args.dtype)
            print(f"wrote {folder} in {time.perf_counter() - start:.0f} s: "
                  f"{', '.join(sorted(p.name for p in folder.iterdir()))}")
        if "orbax" in methods and not converted.exists():
            seconds, peaks, _ = run_measured([sys.executable, "-m", "conversions.convert", str(folder),
                                              str(converted), "--dtype", args.dtype],
                                             dict(os.environ, PYTHONPATH=str(REPO)))
            print(f"converted to Orbax in {seconds:.0f} s (one-off, one device), peak RSS {peaks['VmRSS'] / GB:.2f} "
                  f"GB (anon {peaks['RssAnon'] / GB:.2f}, file {peaks['RssFile'] / GB:.2f})")
        results = {}
        for method in methods:
            results[method] = measure(method, folder, converted, args)
            r = results[method]
            print(f"  {method}: {r['seconds']:.1f} s, peak RSS {r['max_rss'] / GB:.2f} GB, anonymous overhead "
                  f"{r['overhead_anon'] / GB:.2f} GB; largest parameter {r['largest_parameter'] / GB:.3f} GB, "
                  f"largest per-device shard {r['largest_shard'] / GB:.3f} GB", flush=True)
        print_table(results, largest_tensor)
        if args.json:
            report = {"size": args.size, "dtype": args.dtype, "mesh": args.mesh, "total": total,
                      "largest_tensor": largest_tensor, "results": results}
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
