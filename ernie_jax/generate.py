"""`python -m ernie_jax.generate --model PATH --prompt "..." --out DIR`: text to image from the command line.

Writes one PNG per image and, beside each, a JSON with the settings, the (revised) prompt and the seed.
`--turbo` selects ERNIE-Image-Turbo's recommended 8 steps at guidance 1.0; the defaults are the base
model's 50 steps at guidance 4.0. The released folders do not say which model they hold. `--mesh fsdp=8`
(axes data, fsdp, context, tensor; one may be -1) loads every component straight into a device mesh and
runs every stage sharded, with each component's inference rule table (ernie_jax.parallel.COMPONENT_RULES):
the transformer's, text encoder's and PE's weights are split over fsdp (`fsdp=8`: an eighth on each device) and
tensor; `data=8` keeps a whole copy on each device and splits the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ernie_jax import parallel
from ernie_jax.pipeline import PRESETS, ErnieImagePipeline


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m ernie_jax.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="ERNIE-Image pipeline folder (diffusers layout or converted)")
    parser.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, help="default: 50 (8 with --turbo)")
    parser.add_argument("--guidance", type=float, help="default: 4.0 (1.0 with --turbo)")
    parser.add_argument("--turbo", action="store_true", help="ERNIE-Image-Turbo preset: 8 steps, guidance 1.0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--no-pe", action="store_true", help="skip the prompt enhancer")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--mesh", help="device mesh, e.g. fsdp=8 (weights split 8 ways) or data=2,tensor=4 "
                                       "(default: one device)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    args = parser.parse_args(argv)
    preset = PRESETS["ernie-image-turbo" if args.turbo else "ernie-image"]
    args.steps = preset["num_inference_steps"] if args.steps is None else args.steps
    args.guidance = preset["guidance_scale"] if args.guidance is None else args.guidance
    for name in ("height", "width"):
        value = getattr(args, name)
        if value <= 0:
            parser.error(f"--{name} must be positive, got {value}")
    if args.steps < 1 or args.num_images < 1:
        parser.error("--steps and --num-images must be at least 1")
    if args.mesh is not None:
        try:
            args.mesh_sizes = parallel.parse_mesh(args.mesh)
        except ValueError as e:
            parser.error(f"--mesh: {e}")
    return args


def write_atomically(path: str, write) -> None:
    """`write(tmp)` then rename to `path`, so an interrupted run leaves no partial file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> None:
    from tqdm import tqdm

    args = parse_args(argv)
    out = Path(args.out)
    mesh = None if args.mesh is None else parallel.make_mesh(args.mesh_sizes)
    print(f"loading {args.model} ({args.dtype}{f', mesh {args.mesh}' if mesh is not None else ''})", file=sys.stderr)
    pipe = ErnieImagePipeline.from_pretrained(args.model, args.dtype, mesh=mesh)
    pipe.check_image_size(args.height, args.width)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(model=str(args.model), negative_prompt=args.negative_prompt, height=args.height,
                    width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    dtype=args.dtype, mesh=args.mesh)
    for prompt_index, prompt in enumerate(tqdm(args.prompt, desc="generating", unit="prompt")):
        seed = args.seed + prompt_index
        start = time.perf_counter()
        result = pipe(prompt=prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      num_images_per_prompt=args.num_images, seed=seed, use_pe=not args.no_pe)
        seconds = time.perf_counter() - start
        revised = result.revised_prompts[0] if result.revised_prompts else None
        for image_index, image in enumerate(result.images):
            stem = out / f"{prompt_index:03d}_{image_index:02d}"
            # What ran: a pipeline without a prompt enhancer ignores use_pe.
            record = dict(settings, use_pe=result.revised_prompts is not None, prompt=prompt,
                          revised_prompt=revised, seed=seed, image_index=image_index, seconds=round(seconds, 3))
            write_atomically(f"{stem}.png", lambda path, image=image: image.save(path, format="PNG"))
            write_atomically(f"{stem}.json", lambda path, record=record: Path(path).write_text(
                json.dumps(record, indent=2, ensure_ascii=False)))
        tqdm.write(f"{prompt!r}: {len(result.images)} image(s) in {seconds:.1f} s -> {out}")


if __name__ == "__main__":
    from conversions.common import run_command

    sys.exit(run_command(main))
