"""Aesthetic scorers by spec string, for the scoring job (`score_data`) and the aesthetic reward.

A scorer is any callable `scorer(images) -> scores` with images a list of uint8 `[H, W, 3]` arrays (sizes may
differ) and scores float `[N]`, higher better. A spec is `KIND:ARGUMENT`; `SCORERS` maps each kind to a factory
`factory(argument, batch_size) -> scorer`, so another kind of scorer is one more entry:

    laion:CLIP_FOLDER,HEAD_FILE    the LAION improved aesthetic predictor (`laion.LaionAestheticScorer`): a
                                   transformers CLIP folder and the head's .pth or .safetensors file

Only the first ":" separates the kind, so paths may hold colons (gs://...); the laion argument's two paths are
separated by the last ",".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

Scorer = Callable[[list], np.ndarray]


def laion_scorer(argument: str, batch_size: int) -> Scorer:
    """`LaionAestheticScorer` of "CLIP_FOLDER,HEAD_FILE"."""
    from ernie_jax.aesthetics.laion import LaionAestheticScorer

    clip_folder, comma, head_file = argument.rpartition(",")
    if not comma or not clip_folder or not head_file:
        raise ValueError(f"scorer 'laion:{argument}': expected laion:CLIP_FOLDER,HEAD_FILE")
    if not Path(clip_folder).is_dir():
        raise ValueError(f"scorer 'laion:{argument}': CLIP folder {clip_folder} does not exist")
    if not Path(head_file).is_file():
        raise ValueError(f"scorer 'laion:{argument}': head file {head_file} does not exist")
    return LaionAestheticScorer.from_pretrained(clip_folder, head_file, batch_size=batch_size)


def trained_scorer(argument: str, batch_size: int) -> Scorer:
    """`train_scorer.load_trained_scorer` of the training run folder WORKDIR."""
    from ernie_jax.aesthetics import train_scorer

    workdir = Path(argument)
    try:
        runner = json.loads((workdir / train_scorer.CONFIG_FILE).read_text()).get("runner") if argument else None
    except (OSError, ValueError, AttributeError):
        runner = None
    if runner != train_scorer.__name__ or not (workdir / "checkpoints").is_dir():
        raise ValueError(f"scorer 'trained:{argument}': not the folder of a scorer training run (expected "
                         f"{train_scorer.CONFIG_FILE} with runner {train_scorer.__name__!r} and checkpoints/, as "
                         f"`python -m ernie_jax.main --config experiments/aes_tiny_vit.py` writes them)")
    scorer = train_scorer.load_trained_scorer(workdir, batch_size=batch_size)
    scorer.__name__ = f"trained:{argument}"
    return scorer


SCORERS: dict[str, Callable[[str, int], Scorer]] = {"laion": laion_scorer, "trained": trained_scorer}


def load_scorer(spec: str, batch_size: int = 16) -> Scorer:
    """The scorer of `spec` ("KIND:ARGUMENT", kinds in `SCORERS`) scoring `batch_size` images per compiled call."""
    kind, colon, argument = spec.partition(":")
    if not colon or kind not in SCORERS:
        raise ValueError(f"scorer {spec!r}: expected KIND:ARGUMENT with KIND one of {sorted(SCORERS)}")
    if batch_size < 1:
        raise ValueError(f"scorer batch_size must be positive, got {batch_size}")
    return SCORERS[kind](argument, batch_size)


def checked_scores(scores, count: int, scorer) -> np.ndarray:
    """`scorer`'s output as float64 [count], refusing any other shape and non-finite values."""
    values = np.asarray(scores, np.float64)
    if values.shape != (count,) or not np.isfinite(values).all():
        raise ValueError(f"scorer {getattr(scorer, '__name__', type(scorer).__name__)!r} returned "
                         f"{values.shape} scores ({np.count_nonzero(~np.isfinite(values))} not finite) for "
                         f"{count} images; expected {count} finite scores")
    return values
