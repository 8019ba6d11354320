"""Simulated annotators: one perceptual noise model behind both Likert ratings and side-by-side judgments, so
that neither protocol gets an easier annotator (training_algorithms.md section 9, experiments D and F).

- Items have a latent quality q in units of its spread (q ~ N(0, 1) in experiment D; a z-scored true quality
  elsewhere). Each look at an image perceives p = q + e, e ~ N(0, perception_std^2) drawn afresh per look.
- Annotator r has an offset b_r ~ N(0, offset_std^2), a Likert scale s_r = likert_scale * exp(N(0, 0.15^2))
  (rating points per unit of quality), and a drift over their session d_r(t) = a_r * t + w_r(t), t in [0, 1]
  the share of their session's judgments made so far, a_r = +-drift (random sign), w_r a random walk whose
  standard deviation at the session's end is drift / 2. Drift and offset are in units of quality.
- Likert rating: clip(round(5.5 + s_r * (p + b_r + d_r(t))), 1, 10), the perception noise scaled by
  `absolute_noise_ratio` (judging one image alone is harder than comparing two).
- Pairwise judgment (left, right): "left" iff p_left + position_bias > p_right, with independent perceptions of
  the two images; offset and drift are the same for both images seen side by side and cancel, which is the
  mechanism the report's claim for pairwise annotation rests on.
- Lapses: with probability `lapse` a judgment is random (a uniform rating 1..10; a coin flip between sides).

A bias every annotator shares (a taste for one category, say) is not part of the noise model: it is in the
quality the caller passes (`perceived = quality + bias`), so both protocols see it alike.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ernie_jax.aesthetics import swiss


@dataclasses.dataclass(frozen=True)
class NoiseModel:
    perception_std: float = 0.5
    offset_std: float = 0.5
    likert_scale: float = 1.5
    drift: float = 0.5
    lapse: float = 0.05
    position_bias: float = 0.1
    absolute_noise_ratio: float = 1.0

    def __post_init__(self):
        negative = [field.name for field in dataclasses.fields(self) if not getattr(self, field.name) >= 0]
        if negative or self.lapse > 1:
            raise ValueError(f"NoiseModel: {negative or ['lapse']} must be >= 0 (lapse at most 1); got {self}")


class Annotator:
    """One simulated annotator (module docstring) over a session of `session_length` judgments."""

    def __init__(self, rng: np.random.Generator, noise: NoiseModel, session_length: int):
        self.noise = noise
        self.offset = rng.normal(0, noise.offset_std)
        self.scale = noise.likert_scale * np.exp(rng.normal(0, 0.15))
        steps = rng.normal(0, noise.drift / 2 / np.sqrt(session_length), session_length)
        self.drift = rng.choice([-1.0, 1.0]) * noise.drift * np.arange(session_length) / session_length + np.cumsum(steps)

    def rate(self, rng: np.random.Generator, quality: float, time_index: int) -> int:
        """A Likert rating 1..10 of an item of `quality`, the `time_index`-th judgment of the session."""
        if rng.random() < self.noise.lapse:
            return int(rng.integers(1, 11))
        perceived = quality + rng.normal(0, self.noise.perception_std * self.noise.absolute_noise_ratio)
        return int(np.clip(np.round(5.5 + self.scale * (perceived + self.offset + self.drift[time_index])), 1, 10))

    def choose(self, rng: np.random.Generator, left_quality: float, right_quality: float) -> str:
        """"left" or "right": the side judged better."""
        if rng.random() < self.noise.lapse:
            return "left" if rng.random() < 0.5 else "right"
        left = left_quality + rng.normal(0, self.noise.perception_std) + self.noise.position_bias
        right = right_quality + rng.normal(0, self.noise.perception_std)
        return "left" if left > right else "right"


def standardised_mean(per_annotator: np.ndarray) -> np.ndarray:
    """[A, N] scores per annotator -> [N]: each annotator's scores z-scored, then averaged (a constant annotator
    counts as all zeros)."""
    spread = per_annotator.std(axis=1, keepdims=True)
    return np.mean((per_annotator - per_annotator.mean(axis=1, keepdims=True)) / np.where(spread > 0, spread, 1), axis=0)


def likert_ratings(annotators, quality: np.ndarray, ratings_per_item: int, rng: np.random.Generator) -> np.ndarray:
    """[A, N]: each annotator's mean rating of each item, rated `ratings_per_item` times in a random order over
    the session (an annotator's session must hold ratings_per_item * N judgments)."""
    num_items = len(quality)
    per_annotator = []
    for annotator in annotators:
        order = np.concatenate([rng.permutation(num_items) for _ in range(ratings_per_item)])
        ratings = np.array([annotator.rate(rng, quality[item], time_index) for time_index, item in enumerate(order)])
        per_annotator.append(np.bincount(order, ratings, num_items) / ratings_per_item)
    return np.stack(per_annotator)


def swiss_tournaments(annotators, quality: np.ndarray, rounds: int, seed: int) -> tuple[list, np.ndarray]:
    """Each annotator judges their own `swiss.Tournament` of `rounds` rounds over the N items (in its listed
    order): (the judgments (left, right, outcome) per annotator, [A, N] Swiss points + Buchholz / 1000)."""
    num_items = len(quality)
    judgments, points = [], []
    for index, annotator in enumerate(annotators):
        rng = np.random.default_rng([seed, 1, index])
        tournament = swiss.Tournament(list(range(num_items)), rounds, seed=seed * 100 + index)
        while not tournament.done:
            for left, right in tournament.pairings().pairs:
                tournament.record(left, right, annotator.choose(rng, quality[left], quality[right]))
        judgments.append(tournament.judgments())
        by_item = {row.item_id: row.points + row.buchholz / 1000 for row in tournament.standings()}
        points.append(np.array([by_item[item] for item in range(num_items)]))
    return judgments, np.stack(points)
