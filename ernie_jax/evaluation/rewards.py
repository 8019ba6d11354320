"""Rewards: scores of generated images against their prompts, for making preference pairs
(`ernie_jax.data.generated_pairs`) and for evaluation.

A reward is any callable `reward(images, prompts) -> scores` with images uint8 `[N, H, W, 3]`, prompts a
list of N strings and scores float `[N]`, higher better; nothing else is assumed. An aesthetic scorer is one
(`AestheticReward`, named "aesthetic:SCORER_SPEC"). `load_reward` resolves the names the command line and the
configs' `pairs.reward` take.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from ernie_jax.data.shapes import parse_caption
from ernie_jax.evaluation.shapes_detector import DetectorConfig, score

Reward = Callable[[np.ndarray, list[str]], np.ndarray]


def shapes_reward(images, prompts: list[str], config: DetectorConfig = DetectorConfig()) -> np.ndarray:
    """For each prompt of the shapes dataset (a caption in `shapes.caption`'s grammar, read back to its
    scene by `shapes.parse_caption`; raises ValueError for any other text), the fraction of the scene's
    attributes the detector reads correctly in its image. The attributes: each prompted object's colour,
    shape and cell (matched as multisets, `shapes_detector.score`), the number of objects (so extra objects
    cost), and the word when one is prompted:

        (n * (colour + shape + position) + count + text) / (3 n + 1 + [word])

    with n prompted objects and `score`'s per-metric fractions. float64 [N] in [0, 1]; 1 exactly when the
    detector reads everything back."""
    if len(images) != len(prompts):
        raise ValueError(f"shapes_reward: {len(images)} images for {len(prompts)} prompts")
    rewards = np.empty(len(prompts), np.float64)
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        scene = parse_caption(prompt)
        result = score(scene, np.asarray(image), config)
        objects = len(scene.objects)
        correct = result["count"] + (result["text"] if scene.word is not None else 0.0)
        if objects:
            correct += objects * (result["colour"] + result["shape"] + result["position"])
        rewards[index] = correct / (3 * objects + 1 + (scene.word is not None))
    return rewards


class AestheticReward:
    """An aesthetic scorer (`ernie_jax.aesthetics.scorers`) as a reward: the images' scores, prompts unused.

    Chosen in a config by its scorer spec, e.g. `config.pairs.reward = "aesthetic:laion:CLIP_FOLDER,HEAD_FILE"`.
    """

    def __init__(self, scorer_spec: str):
        from ernie_jax.aesthetics.scorers import load_scorer

        self.scorer_spec = scorer_spec
        self.scorer = load_scorer(scorer_spec)
        self.__name__ = f"aesthetic:{scorer_spec}"

    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        from ernie_jax.aesthetics.scorers import checked_scores

        if len(images) != len(prompts):
            raise ValueError(f"{self.__name__}: {len(images)} images for {len(prompts)} prompts")
        return checked_scores(self.scorer(list(images)), len(images), self.scorer)


REWARDS: dict[str, Reward] = {"shapes": shapes_reward}
# Rewards built from an argument, named "KIND:ARGUMENT".
REWARD_FACTORIES: dict[str, Callable[[str], Reward]] = {"aesthetic": AestheticReward}


def load_reward(name: str) -> Reward:
    """A reward by name: one of `REWARDS`, "KIND:ARGUMENT" with KIND one of `REWARD_FACTORIES` (built from the
    argument: "aesthetic:SCORER_SPEC"), or "package.module:attribute" naming any callable (a class or factory
    is called with no arguments first when the attribute is a class)."""
    if name in REWARDS:
        return REWARDS[name]
    kind, colon, argument = name.partition(":")
    if colon and kind in REWARD_FACTORIES:
        return REWARD_FACTORIES[kind](argument)
    module_name, attribute = kind, argument
    if not module_name or not attribute:
        raise ValueError(f"reward {name!r}: expected one of {sorted(REWARDS)}, KIND:ARGUMENT with KIND one of "
                         f"{sorted(REWARD_FACTORIES)}, or package.module:callable")
    try:
        reward = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward {name!r}: {error}") from None
    if isinstance(reward, type):
        reward = reward()
    if not callable(reward):
        raise ValueError(f"reward {name!r} is not callable")
    return reward


def check_rewards(rewards, count: int, reward: Reward) -> np.ndarray:
    """`reward`'s output as float64 [count], refusing any other shape and non-finite values."""
    values = np.asarray(rewards, np.float64)
    if values.shape != (count,) or not np.isfinite(values).all():
        raise ValueError(f"reward {getattr(reward, '__name__', reward)!r} returned {values!r}; expected {count} "
                         f"finite scores")
    return values
