"""The hardware table of docs/memory_plans.md: for each chip, mode and resolution, the smallest mesh (and,
for training, the cheapest remat policy) whose `python -m ernie_jax.plan` estimate fits with headroom.

    python benchmarks/plan_table.py [--cache plans.json] [--preset full] [--attention xla|splash]

Sampling is a CFG step (16 rows for 8 images) with the weights split over `fsdp`, and for the chips of
PIPELINE_PLANS also with the text encoder resident (`--with-text-encoder`); training is the trainer's
update (AdamW on fp32 master weights with clipping and the EMA, bf16 compute) at global batch 8. Meshes
are tried from 1 to 8 chips, then 16 (fsdp=8,tensor=2); at each, the policies from the least recompute to
the least device memory. Each plan is an AOT compilation (seconds to tens of seconds at real size), so the
search skips what monotonicity settles: a plan that
does not fit does not fit on fewer chips, at a higher resolution or on a smaller chip. `--cache` keeps
the compiled plans in a JSON file, so a rerun only compiles what is missing. Prints markdown: the
answer table, then every plan it compiled.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (name, GiB of memory per chip)
CHIPS = (("v5p-8", 95), ("8xH100", 80), ("v6e-8", 32), ("v5e-8", 16))
HEADROOM = 0.9
RESOLUTIONS = (256, 512, 1024)
# 16 chips as fsdp=8,tensor=2: training's global batch of 8 cannot be split 16 ways.
MESHES = ("fsdp=1", "fsdp=2", "fsdp=4", "fsdp=8", "fsdp=8,tensor=2")
# Least recompute first; the offloading policy last, since its host transfers are not in any estimate.
TRAIN_POLICIES = ("none", "dots_saveable", "dots", "block_outputs", "full", "offload_block_outputs")
# Meshes with tensor and context axes, planned as they are (mode, resolution, mesh, remat).
EXTRA_PLANS = (
    ("train", 1024, "fsdp=4,tensor=2", "full"), ("train", 1024, "context=2,fsdp=4", "full"),
    ("train", 2048, "fsdp=8", "full"), ("train", 2048, "fsdp=4,tensor=2", "full"),
    ("train", 2048, "context=2,fsdp=4", "full"),
    ("sample", 2048, "fsdp=8", None), ("sample", 2048, "context=2,fsdp=4", None),
)
# The whole sampling pipeline's big models on one chip kind: (chip, resolution, mesh) planned with
# `--with-text-encoder` (the DiT and the text encoder resident together, bf16, split by the inference rules).
PIPELINE_PLANS = (("v5e-8", 1024, "fsdp=8"),)
GIB = 2**30


def chips(mesh: str) -> int:
    count = 1
    for part in mesh.split(","):
        count *= int(part.partition("=")[2])
    return count


class Planner:
    """Runs (and caches) `python -m ernie_jax.plan --json` for the transformer at global batch 8."""

    def __init__(self, preset: str, attention: str, cache: Path | None):
        self.preset = preset
        self.attention = attention
        self.cache = cache
        self.plans = json.loads(cache.read_text()) if cache and cache.exists() else {}
        self.parameter_count = _parameter_count(preset)

    def __call__(self, mode: str, resolution: int, mesh: str, remat: str | None = None,
                 with_text_encoder: bool = False) -> dict:
        key = f"{self.preset} {self.attention} {mode} {resolution} {mesh} {remat}"
        key += " +text_encoder" if with_text_encoder else ""
        if key not in self.plans:
            command = [sys.executable, "-m", "ernie_jax.plan", "--json", "--mode", mode, "--preset", self.preset,
                       "--resolution", str(resolution), "--batch", "8", "--mesh", mesh, "--attention", self.attention]
            if remat:
                command += ["--remat", remat]
            if with_text_encoder:
                command += ["--with-text-encoder"]
            print(f"planning {key}", file=sys.stderr, flush=True)
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
            self.plans[key] = {"mode": mode, "resolution": resolution, "mesh": mesh, "remat": remat,
                               "with_text_encoder": with_text_encoder,
                               **json.loads(result.stdout.strip().splitlines()[-1])}
            if self.cache:
                self.cache.write_text(json.dumps(self.plans, indent=1))
        return self.plans[key]

    def known_too_big(self, mode: str, resolution: int, mesh: str, remat: str | None, budget: float) -> bool:
        """Whether a compiled plan with the same policy, at least as many chips on every axis and no higher
        resolution already exceeds `budget` (fewer chips and more pixels only need more memory)."""
        return any(p["mode"] == mode and p["remat"] == remat and p["resolution"] <= resolution
                   and _same_axes_fewer_chips(mesh, p["mesh"]) and p["total"] > budget
                   for p in self.dit_plans())

    def dit_plans(self) -> list[dict]:
        """The plans of the DiT alone (not those of the pipeline with its text encoder)."""
        return [p for p in self.plans.values() if not p.get("with_text_encoder")]


def _parameter_count(preset: str) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from ernie_jax.models.dit import PRESETS, abstract_transformer

    parameters = nnx.state(abstract_transformer(PRESETS[preset]), nnx.Param)
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(parameters))


def _same_axes_fewer_chips(mesh: str, planned: str) -> bool:
    """`mesh` is `planned` with every axis the same size or smaller."""
    sizes = dict(part.split("=") for part in mesh.split(","))
    planned_sizes = dict(part.split("=") for part in planned.split(","))
    return sizes.keys() == planned_sizes.keys() and all(int(sizes[a]) <= int(planned_sizes[a]) for a in sizes)


def search(planner: Planner, mode: str, resolution: int, budget: float):
    """(mesh, policy, plan) with the fewest chips, then the least recompute, within `budget`; or None."""
    policies = TRAIN_POLICIES if mode == "train" else (None,)
    for mesh in MESHES:
        # Weights (bf16 to sample; fp32 master weights and two fp32 Adam moments to train) split over the mesh.
        if planner.parameter_count * (12 if mode == "train" else 2) / chips(mesh) > budget:
            continue
        # The policy with the least device memory decides whether this mesh can fit at all.
        if planner.known_too_big(mode, resolution, mesh, policies[-1], budget):
            continue
        if planner(mode, resolution, mesh, policies[-1])["total"] > budget:
            continue
        for policy in policies:
            if planner.known_too_big(mode, resolution, mesh, policy, budget):
                continue
            plan = planner(mode, resolution, mesh, policy)
            if plan["total"] <= budget:
                return mesh, policy, plan
    return None


def cell(found) -> str:
    if found is None:
        return f"no ({MESHES[-1]} does not fit)"
    mesh, policy, plan = found
    note = "" if chips(mesh) <= 8 else " (16 chips)"
    return f"{mesh}{', ' + policy if policy else ''}: {plan['total'] / GIB:.1f}{note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--attention", default="xla", help="xla (scores materialized) or splash (flash kernel)")
    parser.add_argument("--cache", type=Path, help="JSON file of compiled plans, read and extended")
    args = parser.parse_args()
    planner = Planner(args.preset, args.attention, args.cache)
    header = " | ".join(f"{name} ({gib} GiB)" for name, gib in reversed(CHIPS))
    rows = [f"| mode | resolution | {header} |", "|---|---|" + "---|" * len(CHIPS)]
    for mode in ("sample", "train"):
        for resolution in RESOLUTIONS:
            # Largest chip first: plans that do not fit it are known not to fit the smaller ones.
            answers = {name: cell(search(planner, mode, resolution, HEADROOM * gib * GIB)) for name, gib in CHIPS}
            label = "sample, CFG (16 rows)" if mode == "sample" else "train, AdamW fp32 master"
            rows.append(f"| {label} | {resolution} | " + " | ".join(answers[n] for n, _ in reversed(CHIPS)) + " |")
    for resolution in RESOLUTIONS:
        planner("sample", resolution, "data=8")
    for mode, resolution, mesh, remat in EXTRA_PLANS:
        planner(mode, resolution, mesh, remat)
    print("\n".join(rows))
    print("\n| chip | resolution | mesh | denoising step + encoder weights | encoding + DiT weights | total | fits |"
          "\n|---|---|---|---|---|---|---|")
    for chip, resolution, mesh in PIPELINE_PLANS:
        plan = planner("sample", resolution, mesh, with_text_encoder=True)
        budget = HEADROOM * dict(CHIPS)[chip] * GIB
        print(f"| {chip} | {resolution} | {mesh} | {plan['denoising peak'] / GIB:.2f} | "
              f"{plan['encoding peak'] / GIB:.2f} | {plan['total'] / GIB:.2f} | "
              f"{'yes' if plan['total'] <= budget else 'no'} (90% of {dict(CHIPS)[chip]} GiB) |")
    print("\n| mode | resolution | mesh | remat | parameters | optimizer | EMA | temporaries | offloaded to host "
          "| total |\n|---|---|---|---|---|---|---|---|---|---|")
    for p in sorted(planner.dit_plans(), key=lambda p: (p["mode"], p["resolution"], chips(p["mesh"]), p["mesh"],
                                                          TRAIN_POLICIES.index(p["remat"]) if p["remat"] else 0)):
        print(f"| {p['mode']} | {p['resolution']} | {p['mesh']} | {p['remat'] or '-'} | "
              f"{p['parameters'] / GIB:.2f} | {p['optimizer state'] / GIB:.2f} | {p['EMA weights'] / GIB:.2f} | "
              f"{p['temporaries (activations, workspace)'] / GIB:.2f} | {p['offloaded to host'] / GIB:.2f} | "
              f"{p['total'] / GIB:.2f} |")


if __name__ == "__main__":
    main()
