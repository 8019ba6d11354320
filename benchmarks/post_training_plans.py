"""The post-training table of docs/memory_plans.md: `memory_plans(config)` (ernie_image_pretrain's, which
plans a config's own objective and LoRA) of the SFT, DPO and MT-DMD configs
(experiments/ernie_image_sft.py, experiments/ernie_image_dpo.py, experiments/ernie_image_mtdmd.py; MT-DMD
with 1, 2 and 3 teachers: the base and `with_expert_teachers`' extra ones), whole DiT and LoRA, for each mesh preset:
the real-size step (`python -m ernie_jax.plan --mode train` with the config's objective, LoRA, batch, side,
mesh, remat and attention) on emulated CPU devices.

    python benchmarks/post_training_plans.py [--cache post_training_plans.json] [--meshes 8xh100,v5p-64] \
        [--configs ernie_image_mtdmd]

`--cache` keeps each compiled plan in a JSON file, so a rerun only compiles what is missing. Prints markdown.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = ("ernie_image_sft", "ernie_image_dpo", "ernie_image_mtdmd")
TEACHERS = (1, 2, 3)  # MT-DMD's committee sizes
ROWS = ("parameters", "optimizer state", "EMA weights", "frozen models", "inputs",
        "temporaries (activations, workspace)")
GIB = 2**30


def main() -> None:
    from experiments.ernie_image_pretrain import MESH_PRESETS, memory_plans

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meshes", default=",".join(MESH_PRESETS), help="comma-separated mesh presets")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated experiments")
    parser.add_argument("--cache", type=Path, help="JSON file of compiled plans, read and extended")
    args = parser.parse_args()
    plans = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
    header = ("| config | variant | mesh | batch | side | parameters | optimizer | EMA | frozen | inputs | temporaries "
              "| total | fits |")
    lines = [header, "|---" * 13 + "|"]
    for mesh in args.meshes.split(","):
        for name in args.configs.split(","):
            module = importlib.import_module(f"experiments.{name}")
            committees = TEACHERS if name == "ernie_image_mtdmd" else (1,)
            for variant, teachers in [(v, k) for v in (mesh, f"{mesh}-lora") for k in committees]:
                config = module.get_config(variant)
                key = f"{name}:{variant}"
                if name == "ernie_image_mtdmd":
                    key += f":K={teachers}"
                    experts = {f"expert{index}": f"/experts/{index}" for index in range(1, teachers)}
                    config = module.with_expert_teachers(config, experts)
                if key not in plans:
                    print(f"planning {key}", file=sys.stderr, flush=True)
                    (plans[key],) = memory_plans(config)
                    if args.cache:
                        args.cache.write_text(json.dumps(plans, indent=1))
                plan = plans[key]
                cells = " | ".join(f"{plan[row] / GIB:.2f}" for row in ROWS)
                mesh_text = ",".join(f"{axis}={size}" for axis, size in config.mesh.ici.items() if size != 1)
                label = variant + (f", K={teachers}" if name == "ernie_image_mtdmd" else "")
                lines.append(f"| {name.removeprefix('ernie_image_')} | {label} | {mesh_text} | {plan['batch']} | "
                             f"{plan['side']} | {cells} | {plan['total'] / GIB:.2f} | "
                             f"{'yes' if plan['fits'] else 'no'} ({config.plan.device_memory}) |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
