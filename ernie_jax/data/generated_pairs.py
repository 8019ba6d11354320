"""Preference pairs the model makes itself: K samples per prompt from an `ErnieImagePipeline`, scored by a
reward (`ernie_jax.evaluation.rewards`), paired best against worst or every pair whose rewards differ by
more than a margin, and written as a preference folder (preferences.py) holding the pipeline's own final
latents. An offline job:

    python -m ernie_jax.data.generated_pairs --model PIPELINE_DIR (--prompts FILE | --shapes-prompts N) \\
        --out OUT_DIR [--reward shapes|package.module:callable] [--samples-per-prompt 8] \\
        [--selection best-worst|margin] [--margin 0] [--height 256 --width 256] [--steps 50] \\
        [--guidance-scale 4.0] [--seed 0] [--max-text-len 256] [--dtype float32] [--shard-size 4096] \\
        [--shard-index I --shard-count N]

Sample k of prompt i (its number in the whole prompt list) starts from the pipeline's noise for seed
`seed + i * K + k` and one image, so `pipeline(prompt, seed=that, num_images_per_prompt=1,
output_type="latent")` regenerates it (the K samples of a prompt are denoised as one batch). The prompt
enhancer is not used: the reward and the stored text features are those of the prompt itself. Images for
the reward are the decoded latents rounded to uint8, as the pipeline's PIL output. Each record's `origin`
holds `prompt_index`, `chosen` and `rejected` (sample numbers), their `seeds` and `rewards`, and every
sample's (`sample_seeds`, `sample_rewards`), for analysis. Pairs weigh 1; a pair's `source_index` is
`(i * K + chosen) * K + rejected` (or its number in the folder: `generate_pairs`' `numbered_in_order`, which
online pairs use). The metadata's `pairs` holds the counts and the mean rewards. Each host (`--shard-index`) generates the prompts
`catalog.shard_indices` gives it, into its own folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ernie_jax import parallel
from ernie_jax.data.buckets import Bucket
from ernie_jax.data.catalog import shard_indices
from ernie_jax.data.precompute import STORAGE_DTYPES, BatchEncoder, PrecomputeConfig, model_fingerprint
from ernie_jax.data.preferences import PreferenceWriter, write_metadata
from ernie_jax.evaluation.rewards import Reward, check_rewards, load_reward

SELECTIONS = ("best-worst", "margin")


def select_pairs(rewards: np.ndarray, selection: str, margin: float = 0.0) -> list[tuple[int, int]]:
    """(chosen, rejected) sample numbers of one prompt's rewards `[K]`:
      "best-worst": the highest against the lowest (the first of equal ones), if they differ by more than
        `margin`;
      "margin": every pair whose rewards differ by more than `margin`, the higher one chosen, in order of
        (chosen, rejected)."""
    rewards = np.asarray(rewards, np.float64)
    if selection == "best-worst":
        best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
        return [(best, worst)] if rewards[best] - rewards[worst] > margin else []
    if selection == "margin":
        return [(a, b) for a in range(len(rewards)) for b in range(len(rewards)) if rewards[a] - rewards[b] > margin]
    raise ValueError(f"selection {selection!r} is not one of {SELECTIONS}")


def sample_noise(seeds, shape: tuple[int, ...], dtype) -> jax.Array:
    """The pipeline's initial noise `[len(seeds), *shape]` for one image per seed (`ErnieImagePipeline`
    draws `jax.random.normal(jax.random.key(seed), [1, *shape])`)."""
    return jnp.concatenate([jax.random.normal(jax.random.key(int(seed)), (1, *shape), dtype) for seed in seeds])


def generate_pairs(pipeline, prompts: list[str], reward: Reward, out_dir, *, samples_per_prompt: int = 8,
                   selection: str = "best-worst", margin: float = 0.0, height: int = 256, width: int = 256,
                   num_inference_steps: int = 50, guidance_scale: float = 4.0, seed: int = 0,
                   max_text_len: int = 256, dtype: str = "float32", shard_size: int = 4096, shard_index: int = 0,
                   shard_count: int = 1, model: str = "", model_fingerprint: str = "", encoders=None,
                   numbered_in_order: bool = False, extra_metadata: dict | None = None,
                   progress: bool = True) -> dict | None:
    """Generates, scores and pairs the samples of this shard's prompts (module docstring) and writes them
    as the preference folder `out_dir` (atomically); returns its metadata. Prompts whose samples yield no
    pair are counted in `pairs.prompts_without_pair`; `pairs` also holds the mean reward of every sample
    (`mean_sample_reward`) and of the pairs' chosen and rejected samples.

    `encoders` (an `ErnieImagePipeline` with the text encoder and tokenizer; default `pipeline`) makes the
    prompts' text features, which `pipeline` (its transformer and VAE) samples from and which are stored.
    `out_dir` None computes everything (every program runs, e.g. as one process of a collective
    generation on a mesh) and writes nothing: returns None. `numbered_in_order`: the pairs' `source_index`
    is their number in the folder (0, 1, ...) rather than the module docstring's, so that the hosts reading
    one folder (each the pairs whose number is its index modulo the host count) get equal shares.
    `extra_metadata` adds fields to metadata.json."""
    from conversions.common import atomic_directory

    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be at least 2, got {samples_per_prompt}")
    select_pairs(np.zeros(2), selection, margin)  # validates the selection before any work
    pipeline.check_image_size(height, width)
    indices = shard_indices(len(prompts), shard_index, shard_count)
    if not indices.size:
        raise ValueError(f"no prompt in shard {shard_index} of {shard_count} of {len(prompts)} prompts")
    encoders = pipeline if encoders is None else encoders
    count = samples_per_prompt
    bucket = Bucket(height, width)
    config = PrecomputeConfig((bucket,), max_crop_fraction=0.0, max_text_len=max_text_len, batch_size=1,
                              shard_size=shard_size, dtype=dtype)
    encoder = BatchEncoder(encoders, config)
    latent_shape = (pipeline.transformer.config.in_channels, height // pipeline.vae_scale_factor,
                    width // pipeline.vae_scale_factor)
    negative = encoders.encode_prompt([""]) if guidance_scale > 1.0 else None

    def generate(staging) -> dict | None:
        writer = None if staging is None else PreferenceWriter(staging, shard_size)
        without_pair, truncated, pair_count = 0, 0, 0
        sample_rewards, chosen_rewards, rejected_rewards = [], [], []
        for prompt_index in tqdm(indices.tolist(), desc=f"pairs shard {shard_index}/{shard_count}", unit="prompt",
                                 disable=not progress):
            prompt = prompts[prompt_index]
            seeds = [seed + prompt_index * count + k for k in range(count)]
            positive = encoders.encode_prompt([prompt])
            latents = pipeline(prompt_embeds=positive, negative_prompt_embeds=negative, height=height, width=width,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               num_images_per_prompt=count,
                               latents=sample_noise(seeds, latent_shape, pipeline.transformer.dtype),
                               output_type="latent", use_pe=False).images
            images = (pipeline.decode_latents(latents) * 255).round().astype(np.uint8)
            latents = parallel.to_host(latents)  # on a mesh over several processes: gathered (a collective)
            rewards = check_rewards(reward(images, [prompt] * count), count, reward)
            pairs = select_pairs(rewards, selection, margin)
            sample_rewards.extend(rewards.tolist())
            without_pair += not pairs
            pair_count += len(pairs)
            if not pairs or writer is None:
                continue
            text = np.asarray(positive[0]).astype(encoder.dtype)
            truncated += text.shape[0] > max_text_len
            text = text[:max_text_len]
            latents = latents.astype(encoder.dtype)
            for chosen, rejected in pairs:
                chosen_rewards.append(rewards[chosen])
                rejected_rewards.append(rewards[rejected])
                origin = {"prompt_index": prompt_index, "chosen": chosen, "rejected": rejected,
                          "seeds": [seeds[chosen], seeds[rejected]],
                          "rewards": [float(rewards[chosen]), float(rewards[rejected])],
                          "sample_seeds": seeds, "sample_rewards": rewards.tolist()}
                number = writer.records if numbered_in_order else (prompt_index * count + chosen) * count + rejected
                writer.write_pair(number, prompt, 1.0, (height, width), bucket, latents[chosen], latents[rejected],
                                  text, origin)
        if not pair_count:
            raise ValueError(f"no prompt of shard {shard_index} of {shard_count} gave a pair ({selection}, margin "
                             f"{margin}): every prompt's samples scored too close")
        if writer is None:
            return None
        return write_metadata(
            staging, writer, encoder, model=model, model_fingerprint=model_fingerprint,
            source=f"generated by {model or 'a pipeline'}", source_records=len(prompts) * count * count,
            shard_index=shard_index, shard_count=shard_count, skipped={}, truncated_texts=truncated,
            # Generated latents are not crops: every crop bound keeps them (see build_precomputed_pipeline).
            max_crop_fraction=None,
            pairs={"prompts": int(indices.size), "prompts_without_pair": without_pair, "selection": selection,
                   "margin": margin, "samples_per_prompt": count, "reward": getattr(reward, "__name__", repr(reward)),
                   "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed,
                   "mean_sample_reward": float(np.mean(sample_rewards)),
                   "mean_chosen_reward": float(np.mean(chosen_rewards)),
                   "mean_rejected_reward": float(np.mean(rejected_rewards))},
            **(extra_metadata or {}))

    if out_dir is None:
        return generate(None)
    with atomic_directory(out_dir) as staging:
        return generate(staging)


def read_prompts(path: str) -> list[str]:
    """One prompt a line (blank lines skipped)."""
    prompts = [line.strip() for line in Path(path).read_text("utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def shapes_prompts(num: int) -> list[str]:
    """The captions of the first `num` records of the shapes dataset's "train" split (default config)."""
    from ernie_jax.data.shapes import ShapesConfig, caption, sample_scene, scene_rng

    config = ShapesConfig()
    return [caption(sample_scene(scene_rng(config, "train", index), config, "train")) for index in range(num)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ernie_jax.data.generated_pairs",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="ERNIE-Image pipeline folder")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", help="text file, one prompt a line")
    prompts.add_argument("--shapes-prompts", type=int, help="the first N captions of the shapes train split")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--reward", default="shapes", help="a name of rewards.REWARDS or package.module:callable")
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--selection", choices=SELECTIONS, default="best-worst")
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-text-len", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float32",
                        help="the pipeline's compute dtype and the storage dtype")
    parser.add_argument("--shard-size", type=int, default=4096, help="records per ArrayRecord file")
    parser.add_argument("--shard-index", type=int, default=0, help="this host's shard of the prompts")
    parser.add_argument("--shard-count", type=int, default=1)
    args = parser.parse_args(argv)

    shard_indices(0, args.shard_index, args.shard_count)
    if Path(args.out).exists():
        raise ValueError(f"{args.out}: already exists (refusing to overwrite)")
    reward = load_reward(args.reward)
    prompt_list = read_prompts(args.prompts) if args.prompts else shapes_prompts(args.shapes_prompts)
    from ernie_jax.pipeline import ErnieImagePipeline

    pipeline = ErnieImagePipeline.from_pretrained(args.model, args.dtype)
    metadata = generate_pairs(
        pipeline, prompt_list, reward, args.out, samples_per_prompt=args.samples_per_prompt,
        selection=args.selection, margin=args.margin, height=args.height, width=args.width,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
        max_text_len=args.max_text_len, dtype=args.dtype, shard_size=args.shard_size, shard_index=args.shard_index,
        shard_count=args.shard_count, model=str(Path(args.model).resolve()),
        model_fingerprint=model_fingerprint(args.model))
    print(f"wrote {args.out}: {metadata['records']} pairs from {metadata['pairs']['prompts']} prompts "
          f"({metadata['pairs']['prompts_without_pair']} without a pair)")


if __name__ == "__main__":
    from conversions.common import run_command

    sys.exit(run_command(main))
