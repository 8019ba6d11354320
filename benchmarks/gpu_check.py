"""One-shot GPU check of the real-size ERNIE-Image DiT, ernie_jax against diffusers on the same GPU: a script
prepared to run in one call of a few minutes on one H100 / H200 and leave a JSON and a markdown table.

Parts (`--parts`, in this order by default), each measured by `benchmarks/gpu_check_parts.py` in a process
of its own (one crash, hang or OOM cannot take the others down, and each part's peak memory is its own):

  matmul    the chip's bf16 matmul rate, 8192^3, timed in jax and in torch: the peaks the other parts'
            "fraction of peak" divides by (jax rows by jax's, torch rows by torch's);
  forward   the 8B DiT (random weights, bf16), one CFG forward at 1024x1024: batch 2, 4096 image + 128 text
            tokens: ours with `cudnn` and with `xla` attention against diffusers' `ErnieImageTransformer2DModel`
            (torch SDPA) holding the same weights, latency, TFLOP/s, and the relative error of each of ours
            against diffusers' output;
  train     one training step of a DiT at the real width (hidden 4096, ffn 12288, 32 heads) with
            `--train-layers` blocks (default 12: what fits an H100's 80 GB with AdamW state, EMA and
            gradients, see benchmarks/README.md): the trainer's own step (`training.step.make_train_step`,
            fp32 master weights, bf16 compute, AdamW + EMA, full remat), batch 1 at 1024x1024: step time, MFU;
  sampling  seconds per image of the 8-step Turbo loop (guidance 1, no CFG) and the 50-step CFG loop
            (guidance 4) at 1024x1024: ours = `ernie_jax.sampling.sample`, diffusers = `ErnieImagePipeline`
            called with `prompt_embeds` and `output_type="latent"` (no text encoder, no VAE: the
            transformer, the scheduler and the CFG arithmetic are timed, nothing else);
  flops     the FLOP formula (`benchmarks.common.forward_flops`) against XLA's cost analysis of the same
            forward, 2 blocks unrolled, compiled for the CPU.

Every part writes its rows to a JSON-lines file as soon as each is measured; after each part this script
merges them into `OUT/gpu_check.json` and `OUT/gpu_check.md`, so a kill still leaves data. A failing
measurement (cudnn attention unavailable, OOM, diffusers missing) becomes an error row and the rest go
on. `--budget-s` bounds the whole run: a part is skipped when its estimated seconds exceed what is left,
and a running part is killed at twice its estimate or when the budget is spent (its rows so far are kept).

`--tiny` runs every part at test size on whatever device there is (the CPU here: fp32, the tiny preset,
all parts in one process); tests/test_benchmarks_smoke.py runs it. On a CPU the cudnn rows are error rows.

    python benchmarks/gpu_check.py --out DIR [--parts matmul,forward,train,sampling,flops] [--budget-s 450]
                                   [--train-layers 12] [--attention cudnn] [--tiny] [--one-process]

On the device machine use `bash benchmarks/gpu_check.sh` (installs the carried wheels first); see
benchmarks/README.md for the exact command.

This module imports only the standard library: the measuring processes import jax and torch, after the
environment that sizes jax's GPU allocator is set.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("matmul", "forward", "train", "sampling", "flops")

# Wall seconds each part may take on one H100, process start, weight building and compilation included:
# first-principles estimates with margin (benchmarks/README.md, "gpu_check.py"); a part is started only when
# this much of the budget is left.
H100_PART_SECONDS = {"matmul": 30, "forward": 110, "train": 100, "sampling": 160, "flops": 40}
TINY_PART_SECONDS = {part: 5 for part in PARTS}
DEFAULT_BUDGET_S = 450.0

# jax's GPU allocator: grown on demand (not preallocated), so that torch has room beside it in the same
# process and `peak_bytes_in_use` is what the part used; capped per part at a fraction of the GPU.
PART_ENVIRONMENT = {
    "matmul": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"},
    "forward": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.55"},  # the rest for diffusers' copy of the weights
    "sampling": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.55"},
    "train": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"},  # jax alone
    "flops": {"JAX_PLATFORMS": "cpu"},  # XLA CPU's cost analysis; nothing runs
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the parts measure. `latent` is the latent grid side (pixels / 16; the DiT's patch size is 1),
    `text_len` the padded text length of the CFG batch, whose unconditional row has `uncond_text_len` real
    tokens (the empty negative prompt) and whose conditional row is full."""

    tiny: bool
    preset: str
    dtype: str
    batch: int
    latent: int
    text_len: int
    uncond_text_len: int
    matmul_size: int
    repeats: int
    cfg_steps: int
    turbo_steps: int
    attention: str
    train_layers: int
    train_batch: int
    train_steps: int
    train_remat: str
    part_seconds: dict

    @property
    def image_tokens(self) -> int:
        return self.latent * self.latent


def settings_from_args(args: argparse.Namespace) -> Settings:
    tiny = args.tiny
    return Settings(
        tiny=tiny, preset="tiny" if tiny else "full", dtype="float32" if tiny else "bfloat16", batch=2,
        latent=16 if tiny else 64, text_len=32 if tiny else 128, uncond_text_len=4 if tiny else 8,
        matmul_size=256 if tiny else 8192, repeats=args.repeats or (2 if tiny else 6),
        cfg_steps=10 if tiny else 50, turbo_steps=4 if tiny else 8,
        attention=args.attention, train_layers=args.train_layers or (2 if tiny else 12),
        train_batch=args.train_batch, train_steps=args.train_steps or (2 if tiny else 6), train_remat="full",
        part_seconds=TINY_PART_SECONDS if tiny else H100_PART_SECONDS)


def budget_refusal(part: str, settings: Settings, deadline: float) -> str | None:
    """Why `part` must not start now (its estimate exceeds the budget left), or None."""
    left = deadline - time.time()
    needed = settings.part_seconds[part]
    return f"skipped: needs about {needed:.0f} s, {max(left, 0):.0f} s of the budget left" if needed > left else None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ running

@dataclasses.dataclass
class GroupOutcome:
    records: list[dict]
    exit_code: int | None  # None: killed at the budget
    output_tail: list[str]


def run_group(parts: list[str], settings: Settings, deadline: float, out: Path) -> GroupOutcome:
    """Runs `parts` in one measuring process until done or the deadline (for a single part, at most twice
    its estimate, so that one part stuck in compilation leaves time for the next); returns what it
    recorded."""
    records_path = out / f"records-{'-'.join(parts)}.jsonl"
    records_path.unlink(missing_ok=True)
    environment = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if len(parts) == 1:
        environment.update(PART_ENVIRONMENT[parts[0]])
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check_parts.py"), "--parts", ",".join(parts),
               "--settings", json.dumps(dataclasses.asdict(settings)), "--records", str(records_path),
               "--deadline", repr(deadline)]
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=20)

    def pump():
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))

    pump_thread = threading.Thread(target=pump, daemon=True)
    pump_thread.start()
    limit = deadline - time.time()
    if len(parts) == 1:
        limit = min(limit, 2 * settings.part_seconds[parts[0]])
    try:
        exit_code = process.wait(timeout=max(limit, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the measuring process and anything it started
        process.wait()
        exit_code = None
    pump_thread.join(timeout=5)
    return GroupOutcome(read_records(records_path), exit_code, list(tail))


def read_records(path: Path) -> list[dict]:
    """The JSON lines written so far (a line cut short by a kill is dropped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def merge(report: dict, parts: list[str], outcome: GroupOutcome) -> None:
    """Adds a group's rows, environment and part statuses to `report`. A part that did not end gets a
    status and, if the process was killed or died there (or before reaching any part), an error row saying
    why, with the process's last output."""
    started = None
    for record in outcome.records:
        if "env" in record:
            report["env"] = report["env"] or record["env"]
        elif "start" in record:
            started = record["start"]
        elif "end" in record:
            report["parts"][record["end"]] = {"status": record["status"], "seconds": record["seconds"]}
            started = None
        else:
            report["rows"].append(record)
    unfinished = [part for part in parts if part not in report["parts"]]
    if outcome.exit_code == 0 or not unfinished:
        return
    if outcome.exit_code is None:
        reason, status = "killed: the part ran past twice its estimate or the --budget-s budget", "killed"
    else:
        reason = f"the measuring process died (exit code {outcome.exit_code}): " + " | ".join(outcome.output_tail[-5:])
        status = "crashed"
    cut = started or unfinished[0]
    report["rows"].append({"part": cut, "name": "(part cut short)", "error": reason})
    report["parts"][cut] = {"status": status, "seconds": None}
    for part in unfinished:
        report["parts"].setdefault(part, {"status": f"not run (the process was {status} before it)", "seconds": None})


# ------------------------------------------------------------------------------------------------ reporting

# bf16 dense tensor-core peaks from the datasheets (FLOP/s), matched in this order against the device kind.
NOMINAL_BF16_PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12))


def nominal_peak(device_kind: str) -> float | None:
    return next((peak for name, peak in NOMINAL_BF16_PEAKS if name in device_kind), None)


def add_rates(report: dict) -> None:
    """TFLOP/s of every timed row with a FLOP count, as a fraction of its runtime's measured matmul peak
    (row `peak: true`) and, for the training step, of the chip's nominal bf16 peak (MFU)."""
    peaks = {row["framework"]: row["flops"] / row["seconds"] for row in report["rows"]
             if row.get("peak") and row.get("seconds")}
    nominal = nominal_peak((report["env"] or {}).get("device_kind", ""))
    for row in report["rows"]:
        if not row.get("seconds") or not row.get("flops"):
            continue
        rate = row["flops"] / row["seconds"]
        row["tflops"] = rate / 1e12
        if row.get("framework") in peaks and not row.get("peak"):
            row["fraction_of_measured_peak"] = rate / peaks[row["framework"]]
        if row["part"] == "train" and nominal:
            row["mfu_nominal"] = rate / nominal


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_number(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


NOTE_FIELDS = (("compile_seconds", "compile {:.1f} s"), ("first_call_seconds", "first call {:.1f} s"),
               ("mfu_nominal", "MFU {:.1%} of the datasheet peak"), ("xla_flops", "XLA cost analysis {:.4g} FLOP"),
               ("xla_over_formula", "XLA / formula {:.4f}"), ("layers", "{} layers"),
               ("memory_needed_bytes", "compiled needs {:.2e} B"), ("loss", "loss {:.4g}"), ("note", "{}"))


def markdown(report: dict) -> str:
    env = report["env"] or {}
    settings = {k: v for k, v in report["settings"].items() if k != "part_seconds"}
    lines = [f"# gpu_check: {env.get('device_kind', 'device unknown')}", "",
             f"jax {env.get('jax', '?')}, torch {env.get('torch', '?')}, diffusers {env.get('diffusers', '?')}, "
             f"python {env.get('python', '?')}; settings {json.dumps(settings)}", "",
             "| part | case | time | TFLOP/s | of measured peak | peak memory | max rel. error | mean rel. error "
             "| notes |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        notes = [template.format(row[key]) for key, template in NOTE_FIELDS if row.get(key) is not None]
        if row.get("error"):
            notes.insert(0, f"**error**: {row['error']}")
        memory = row.get("peak_memory_bytes")
        lines.append("| " + " | ".join([
            row["part"], row["name"], format_seconds(row.get("seconds")), format_number(row.get("tflops"), ".1f"),
            format_number(row.get("fraction_of_measured_peak"), ".1%"),
            "" if memory is None else f"{memory / 2**30:.2f} GiB", format_number(row.get("max_rel_error"), ".2e"),
            format_number(row.get("mean_rel_error"), ".2e"), "; ".join(notes).replace("|", "/")]) + " |")
    lines += ["", "| part | status | wall s |", "|---|---|---|"]
    for part, status in report["parts"].items():
        lines.append(f"| {part} | {status['status']} | {format_number(status['seconds'], '.0f')} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    add_rates(report)
    for name, text in (("gpu_check.json", json.dumps(report, indent=1) + "\n"), ("gpu_check.md", markdown(report))):
        staging = out / (name + ".partial")
        staging.write_text(text)
        staging.replace(out / name)


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the records")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall seconds for the whole run: parts that would overrun are skipped or cut short")
    parser.add_argument("--tiny", action="store_true", help="test sizes (fp32, tiny preset), all parts in one process")
    parser.add_argument("--one-process", action="store_true",
                        help="run every part in one process (implied by --tiny): faster to start, but jax's peak "
                             "memory then only grows from part to part and one crash ends the run")
    parser.add_argument("--repeats", type=int,
                        help="timed calls per forward measurement (the matmul takes 4x as many)")
    parser.add_argument("--attention", default="cudnn", choices=["cudnn", "xla"],
                        help="attention of the sampling loops and the training step (cudnn falls back to xla, "
                             "recorded, when it fails on this device)")
    parser.add_argument("--train-layers", type=int, help="blocks of the real-width training DiT (default 12)")
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--train-steps", type=int, help="timed training steps")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    for name in ("repeats", "train_layers", "train_batch", "train_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = settings_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + args.budget_s
    parts = [part for part in PARTS if part in args.parts.split(",")]
    report = {"settings": dataclasses.asdict(settings), "budget_s": args.budget_s, "env": None, "parts": {},
              "rows": []}
    log(f"gpu_check: parts {parts}, budget {args.budget_s:.0f} s, writing {out}")
    groups = [parts] if args.tiny or args.one_process else [[part] for part in parts]
    for group in groups:
        refusal = budget_refusal(group[0], settings, deadline) if len(group) == 1 else None
        if refusal:
            log(f"{group[0]}: {refusal}")
            report["rows"].append({"part": group[0], "name": "(part skipped)", "error": refusal})
            report["parts"][group[0]] = {"status": "skipped", "seconds": None}
        else:
            log(f"running {', '.join(group)} ({deadline - time.time():.0f} s of the budget left)")
            merge(report, group, run_group(group, settings, deadline, out))
        write_report(report, out)
    log(f"done in {time.time() - start:.0f} s: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    print(markdown(report), flush=True)


if __name__ == "__main__":
    main()
