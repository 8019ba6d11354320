"""Rankings from pairwise judgments: a Bradley-Terry fit with bootstrap intervals, quantile levels 1..L, and
several annotators' fits combined with their agreement (Kendall tau-b and Spearman, from metrics.py).

Bradley-Terry (training_algorithms.md section 3): P(a preferred to b) = sigmoid(s_a - s_b) with one log-strength
s_i per item. The fit maximises the penalised log-likelihood

    sum_k [ y_k log sigmoid(s_a - s_b) + (1 - y_k) log sigmoid(s_b - s_a) ]  -  prior / 2 * sum_i s_i^2

where y_k is the score of a in judgment k: 1 (a preferred), 0.5 (a tie: half a win to each side), 0 (b
preferred). The Gaussian prior keeps an unbeaten item's strength finite and puts an item without judgments at
0; because every judgment's gradient sums to zero over the two items, the fitted strengths have mean exactly 0.
The objective is strictly concave, so Newton's method (with step halving) reaches the unique optimum; each
Newton system is solved by conjugate gradients in O(judgments) memory.

Judgments are rows `(a, b, outcome)`: item indices in [0, num_items), and the outcome as a's score (1, 0.5,
0) or as a Swiss Tournament's outcome string with a on the left ("left" = a preferred, "right" = b preferred,
"tie").

numpy only (no scipy): the Tournament and the annotation service import this module.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from ernie_jax.aesthetics import metrics

DEFAULT_PRIOR = 0.1
_OUTCOME_SCORES = {"left": 1.0, "right": 0.0, "tie": 0.5}


class BradleyTerryFit(NamedTuple):
    """`scores` [N]: fitted log-strengths (mean 0). `lower`, `upper` [N]: the bootstrap percentile interval at
    `confidence` (both equal to `scores` when no bootstrap was asked for)."""

    scores: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    confidence: float


class AnnotatorAggregate(NamedTuple):
    """Several annotators' judgments over the same N items.

    `annotator_scores` [A, N]: each annotator's own Bradley-Terry fit. `scores` [N]: their mean after each
    annotator's fit is standardised (zero mean, unit variance), so an annotator who is more decisive (larger
    strength spread) does not outweigh the others. `kendall_tau`, `spearman`: the mean over annotator pairs of
    the rank agreement between their fits (nan for a single annotator)."""

    scores: np.ndarray
    annotator_scores: np.ndarray
    kendall_tau: float
    spearman: float


def judgments_to_arrays(num_items: int, judgments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(a, b, outcome)` rows -> (a [K] int, b [K] int, a's score [K] float). Bad rows raise ValueError."""
    if not isinstance(num_items, (int, np.integer)) or num_items < 1:
        raise ValueError(f"num_items must be a positive integer, got {num_items!r}")
    first, second, score = [], [], []
    for row_number, row in enumerate(judgments):
        try:
            a, b, outcome = row
        except (TypeError, ValueError):
            raise ValueError(f"judgment {row_number} is not an (a, b, outcome) row: {row!r}") from None
        for name, index in (("a", a), ("b", b)):
            if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or not 0 <= index < num_items:
                raise ValueError(f"judgment {row_number}: item {name}={index!r} is not an index in [0, {num_items})")
        if a == b:
            raise ValueError(f"judgment {row_number} compares item {a} with itself")
        if isinstance(outcome, str):
            if outcome not in _OUTCOME_SCORES:
                raise ValueError(f"judgment {row_number}: outcome {outcome!r} is not one of {sorted(_OUTCOME_SCORES)}")
            value = _OUTCOME_SCORES[outcome]
        elif outcome in (0, 0.5, 1) and not isinstance(outcome, (bool, np.bool_)):
            value = float(outcome)
        else:
            raise ValueError(f"judgment {row_number}: outcome {outcome!r} is not 1, 0.5, 0, 'left', 'right' or 'tie'")
        first.append(int(a))
        second.append(int(b))
        score.append(value)
    return np.asarray(first, np.int64), np.asarray(second, np.int64), np.asarray(score, np.float64)


def _solve_newton_system(num_items, first, second, curvature, prior, right_hand_side) -> np.ndarray:
    """Solve H x = b for the Hessian H = prior I + sum_k c_k (e_a - e_b)(e_a - e_b)^T by Jacobi-preconditioned
    conjugate gradients. H is a weighted graph Laplacian plus prior I: applying it takes two bincounts over the
    K judgments, where a dense [N, N] solve costs N^3 and runs multithreaded BLAS, which on a shared machine
    was 30x slower than one thread."""

    def apply(vector):
        flow = curvature * (vector[first] - vector[second])
        return prior * vector + np.bincount(first, flow, num_items) - np.bincount(second, flow, num_items)

    diagonal = prior + np.bincount(first, curvature, num_items) + np.bincount(second, curvature, num_items)
    solution = np.zeros(num_items)
    residual = right_hand_side.copy()
    preconditioned = residual / diagonal
    direction = preconditioned.copy()
    residual_dot = np.sum(residual * preconditioned)
    tolerance = 1e-12 * np.sqrt(np.sum(right_hand_side**2))
    for _ in range(4 * num_items + 100):
        applied = apply(direction)
        step = residual_dot / np.sum(direction * applied)
        solution += step * direction
        residual -= step * applied
        if np.sqrt(np.sum(residual**2)) <= tolerance:
            break
        preconditioned = residual / diagonal
        next_residual_dot = np.sum(residual * preconditioned)
        direction = preconditioned + (next_residual_dot / residual_dot) * direction
        residual_dot = next_residual_dot
    return solution


def _fit(num_items: int, first: np.ndarray, second: np.ndarray, score: np.ndarray, prior: float) -> np.ndarray:
    """Newton's method (step halving) on the penalised negative log-likelihood; returns s [N]."""

    def objective(strengths):
        margin = strengths[first] - strengths[second]
        log_likelihood = score * -np.logaddexp(0.0, -margin) + (1.0 - score) * -np.logaddexp(0.0, margin)
        return -log_likelihood.sum() + 0.5 * prior * np.sum(strengths**2)

    strengths = np.zeros(num_items)
    if len(score) == 0:
        return strengths
    value = objective(strengths)
    for _ in range(100):
        probability = 1.0 / (1.0 + np.exp(-(strengths[first] - strengths[second])))
        residual = score - probability
        gradient = prior * strengths - np.bincount(first, residual, num_items) + np.bincount(second, residual, num_items)
        step = _solve_newton_system(num_items, first, second, probability * (1.0 - probability), prior, gradient)
        size = 1.0
        while True:
            candidate = strengths - size * step
            candidate_value = objective(candidate)
            if candidate_value <= value or size < 1e-6:
                break
            size /= 2
        strengths, value = candidate, candidate_value
        if np.max(np.abs(size * step)) < 1e-10:
            break
    return strengths


def bradley_terry(
    num_items: int,
    judgments,
    prior: float = DEFAULT_PRIOR,
    num_bootstrap: int = 0,
    confidence: float = 0.9,
    seed: int = 0,
) -> BradleyTerryFit:
    """Fit Bradley-Terry log-strengths [N] to `(a, b, outcome)` judgments (see the module docstring).

    `prior` (> 0): the precision of the Gaussian prior on each strength. `num_bootstrap` > 0 refits that many
    resamples of the judgments (drawn with replacement, seeded by `seed`) and reports the percentile interval
    holding `confidence` of them."""
    first, second, score = judgments_to_arrays(num_items, judgments)
    if not prior > 0:
        raise ValueError(f"prior must be > 0 (it keeps unbeaten items finite), got {prior!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if num_bootstrap < 0:
        raise ValueError(f"num_bootstrap must be >= 0, got {num_bootstrap!r}")
    scores = _fit(num_items, first, second, score, prior)
    if num_bootstrap == 0 or len(score) == 0:
        return BradleyTerryFit(scores, scores.copy(), scores.copy(), confidence)
    rng = np.random.default_rng(seed)
    resampled = np.empty((num_bootstrap, num_items))
    for draw in range(num_bootstrap):
        rows = rng.integers(0, len(score), len(score))
        resampled[draw] = _fit(num_items, first[rows], second[rows], score[rows], prior)
    tail = (1.0 - confidence) / 2
    lower, upper = np.quantile(resampled, [tail, 1.0 - tail], axis=0)
    return BradleyTerryFit(scores, lower, upper, confidence)


def levels_from_scores(scores, num_levels: int = 10, cut_points: Sequence[float] | None = None) -> np.ndarray:
    """Scores [N] -> levels [N] in 1..num_levels (num_levels = best), cut at quantiles of the scores.

    `cut_points`: num_levels - 1 increasing quantiles in (0, 1); the default, evenly spaced, gives equal-count
    levels. Item i gets 1 + the number of cut scores (np.quantile of `scores` at the cut points) that are <=
    its score, which for distinct scores is 1 + the number of cut points q with q (N - 1) <= the item's
    position in ascending order. Equal scores share the level of the middle of the positions they span: a
    tie block sits where its items' mean rank puts it (all-equal scores get the middle level), rather than
    at the top of the block, where a rule on scores alone would put it."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty vector, got shape {scores.shape}")
    if not isinstance(num_levels, (int, np.integer)) or num_levels < 1:
        raise ValueError(f"num_levels must be a positive integer, got {num_levels!r}")
    if cut_points is None:
        cut_points = np.arange(1, num_levels) / num_levels
    cut_points = np.asarray(cut_points, np.float64)
    if (cut_points.shape != (num_levels - 1,) or np.any(cut_points <= 0) or np.any(cut_points >= 1)
            or np.any(np.diff(cut_points) <= 0)):
        raise ValueError(f"cut_points must be {num_levels - 1} increasing quantiles in (0, 1), got {cut_points.tolist()}")
    ordered = np.sort(scores)
    first = np.searchsorted(ordered, scores, side="left")
    last = np.searchsorted(ordered, scores, side="right") - 1
    # np.quantile's cut at q lies at position q (N - 1) of the sorted scores (its default, linear method);
    # rounded so that a cut on a position (0.28 x 200) is on it, not a rounding error above it.
    cut_positions = np.round(cut_points * (scores.size - 1), 9)
    return 1 + np.searchsorted(cut_positions, (first + last) / 2, side="right")


def aggregate_annotators(num_items: int, judgments_by_annotator, prior: float = DEFAULT_PRIOR) -> AnnotatorAggregate:
    """Fit each annotator's judgments over the same `num_items` items on their own, then combine (see
    AnnotatorAggregate). `judgments_by_annotator`: a sequence (one entry per annotator) of judgment lists."""
    judgments_by_annotator = list(judgments_by_annotator)
    if not judgments_by_annotator:
        raise ValueError("aggregate_annotators needs at least one annotator's judgments")
    annotator_scores = np.stack([bradley_terry(num_items, judgments, prior).scores for judgments in judgments_by_annotator])
    spread = annotator_scores.std(axis=1, keepdims=True)
    standardised = np.divide(annotator_scores, spread, out=np.zeros_like(annotator_scores), where=spread > 0)
    taus, rhos = [], []
    for first in range(len(annotator_scores)):
        for second in range(first + 1, len(annotator_scores)):
            taus.append(metrics.kendall_tau_b(annotator_scores[first], annotator_scores[second]))
            rhos.append(metrics.srcc(annotator_scores[first], annotator_scores[second]))
    mean_tau = float(np.mean(taus)) if taus else float("nan")
    mean_rho = float(np.mean(rhos)) if rhos else float("nan")
    return AnnotatorAggregate(standardised.mean(axis=0), annotator_scores, mean_tau, mean_rho)
