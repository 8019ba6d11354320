"""Stage `pairs`: preference pairs the starting model makes itself, for DPO. The pipeline at
`config.init.path` samples `pairs.samples_per_prompt` images of each prompt (`pairs.prompts`: a text file,
one prompt a line, or "shapes:N", the first N captions of the shapes training split), a reward scores them
(`pairs.reward`: "shapes" or "package.module:callable", see `evaluation.rewards`), and the best sample is
paired with the worst (`pairs.selection` "best-worst") or every sample with every one it beats by more than
`pairs.margin` ("margin"). Each host writes its shard of the prompts as a preference folder,
WORKDIR/pairs/shard-I-of-N/ (`data.preferences`' format), which the train stage then reads.

With `pairs.refresh_every` N > 0 the pairs are online: the train stage makes a round of them from the policy
every N updates (`runner.online_pairs`, which reads the same settings and `pairs.prompts_per_round`,
`pairs.policy`), and this stage does nothing."""

from __future__ import annotations

import jax

from ernie_jax.runner.config import Experiment
from ernie_jax.runner.stages import say

PAIRS_DIR = "pairs"
SHAPES_PROMPTS = "shapes:"


def folders(experiment: Experiment) -> list[str]:
    """Every host's pairs folder (what training reads)."""
    count = jax.process_count()
    return [str(experiment.workdir / PAIRS_DIR / f"shard-{i:05d}-of-{count:05d}") for i in range(count)]


def prompts_of(spec: str) -> list[str]:
    from ernie_jax.data.generated_pairs import read_prompts, shapes_prompts

    if spec.startswith(SHAPES_PROMPTS):
        count = spec.removeprefix(SHAPES_PROMPTS)
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"config.pairs.prompts {spec!r}: expected 'shapes:N' with N >= 1")
        return shapes_prompts(int(count))
    return read_prompts(spec)


def run(experiment: Experiment) -> None:
    from ernie_jax.data.generated_pairs import generate_pairs
    from ernie_jax.data.precompute import model_fingerprint
    from ernie_jax.evaluation.rewards import load_reward
    from ernie_jax.pipeline import ErnieImagePipeline
    from ernie_jax.runner.online_pairs import round_settings

    config, p = experiment.config, experiment.config.pairs
    online = round_settings(config)
    if online:
        say(f"pairs: made online by the train stage every {online.refresh_every} updates")
        return
    folder = experiment.workdir / PAIRS_DIR / folders(experiment)[jax.process_index()].rsplit("/", 1)[1]
    if folder.exists():
        say(f"pairs: done ({folder})")
        return
    if not experiment.init_path:
        raise ValueError("the pairs stage samples the starting model: set config.init.path")
    reward = load_reward(p.reward)
    prompts = prompts_of(p.prompts)
    side = config.data.sides[-1]
    pipeline = ErnieImagePipeline.from_pretrained(experiment.init_path, dtype=config.model.dtype)
    metadata = generate_pairs(
        pipeline, prompts, reward, folder, samples_per_prompt=p.samples_per_prompt, selection=p.selection,
        margin=p.margin, height=side, width=side, num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale, seed=config.seed, max_text_len=config.data.max_text_len,
        dtype=config.train.encoder_dtype, shard_index=jax.process_index(), shard_count=jax.process_count(),
        model=experiment.init_path, model_fingerprint=model_fingerprint(experiment.components_dir),
        progress=jax.process_index() == 0)
    say(f"pairs: wrote {folder} ({metadata['records']} pairs from {metadata['pairs']['prompts']} prompts, "
        f"{metadata['pairs']['prompts_without_pair']} without a pair)")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("pairs")
