"""Bradley-Terry fit against scipy's optimiser and the two-item closed form; levels, rank metrics against
scipy.stats; several annotators combined."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from ernie_jax.aesthetics import ranking


def _random_judgments(rng, num_items, count, quality=None):
    first = rng.integers(0, num_items, count)
    second = (first + rng.integers(1, num_items, count)) % num_items
    if quality is None:
        outcome = rng.choice([0.0, 0.5, 1.0], count)
    else:
        outcome = (rng.random(count) < 1 / (1 + np.exp(-(quality[first] - quality[second])))).astype(float)
    return list(zip(first.tolist(), second.tolist(), outcome.tolist(), strict=True))


def test_fit_matches_scipy_minimising_the_same_penalised_likelihood():
    rng = np.random.default_rng(0)
    num_items, prior = 25, 0.3
    judgments = _random_judgments(rng, num_items, 150)
    first, second, score = (np.array(column) for column in zip(*judgments, strict=True))

    def negative_log_posterior(strengths):
        margin = strengths[first] - strengths[second]
        return (score * np.logaddexp(0, -margin) + (1 - score) * np.logaddexp(0, margin)).sum() + prior / 2 * strengths @ strengths

    def gradient(strengths):
        residual = score - 1 / (1 + np.exp(-(strengths[first] - strengths[second])))
        return prior * strengths - np.bincount(first, residual, num_items) + np.bincount(second, residual, num_items)

    reference = optimize.minimize(negative_log_posterior, np.zeros(num_items), jac=gradient, method="BFGS",
                                  options={"gtol": 1e-11}).x
    fit = ranking.bradley_terry(num_items, judgments, prior=prior)
    np.testing.assert_allclose(fit.scores, reference, atol=1e-7)
    assert abs(fit.scores.mean()) < 1e-12
    # Outcome strings are a left/right Tournament's: "left" means a is preferred.
    as_strings = [(a, b, {1.0: "left", 0.5: "tie", 0.0: "right"}[y]) for a, b, y in judgments]
    np.testing.assert_array_equal(ranking.bradley_terry(num_items, as_strings, prior=prior).scores, fit.scores)


def test_two_items_closed_form_and_unbeaten_item_stays_finite():
    # Without a prior, two items' MLE margin is log(wins / losses), a tie counting half to each.
    wins, losses, ties = 7, 2, 3
    judgments = [(0, 1, 1)] * wins + [(1, 0, 1)] * losses + [(0, 1, 0.5)] * ties
    fit = ranking.bradley_terry(2, judgments, prior=1e-9)
    margin = fit.scores[0] - fit.scores[1]
    assert margin == pytest.approx(np.log((wins + ties / 2) / (losses + ties / 2)), abs=1e-6)
    assert fit.scores[0] == pytest.approx(-fit.scores[1])

    # An item that wins everything: finite, on top; an item never judged: exactly at the prior's 0.
    unbeaten = [(0, other, 1) for other in range(1, 5)] + [(1, 2, 1), (2, 3, 0.5), (3, 4, 0)]
    scores = ranking.bradley_terry(6, unbeaten).scores
    assert np.all(np.isfinite(scores)) and np.argmax(scores) == 0 and scores[5] == 0.0
    np.testing.assert_array_equal(ranking.bradley_terry(3, []).scores, np.zeros(3))


def test_bootstrap_intervals():
    rng = np.random.default_rng(1)
    quality = rng.normal(size=12)
    judgments = _random_judgments(rng, 12, 120, quality)
    fit = ranking.bradley_terry(12, judgments, num_bootstrap=200, confidence=0.9, seed=3)
    assert np.all(fit.lower <= fit.upper) and np.mean((fit.lower <= fit.scores) & (fit.scores <= fit.upper)) >= 0.9
    again = ranking.bradley_terry(12, judgments, num_bootstrap=200, confidence=0.9, seed=3)
    np.testing.assert_array_equal(again.lower, fit.lower)
    # Four times the judgments: intervals about half as wide (1/sqrt(4)).
    more = ranking.bradley_terry(12, judgments * 4, num_bootstrap=200, confidence=0.9, seed=3)
    ratio = np.median((more.upper - more.lower) / (fit.upper - fit.lower))
    assert 0.35 < ratio < 0.7, ratio
    no_bootstrap = ranking.bradley_terry(12, judgments)
    np.testing.assert_array_equal(no_bootstrap.lower, no_bootstrap.scores)


def test_levels_from_scores():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=100)
    rank = np.argsort(np.argsort(scores))
    np.testing.assert_array_equal(ranking.levels_from_scores(scores), 1 + rank // 10)
    # Configurable cut points: a 20/60/20 split into three levels.
    levels = ranking.levels_from_scores(scores, 3, cut_points=[0.2, 0.8])
    np.testing.assert_array_equal(levels, 1 + (rank >= 20) + (rank >= 80))
    # Equal scores share the level of the middle of their positions (cuts at positions 0.8, 1.6, 2.4, 3.2; the
    # tie spans 1..3, middle 2), not the top of the block (4); all-equal scores get the middle level, and a cut
    # exactly on a position (0.5 x 6 = 3) counts for the item there.
    np.testing.assert_array_equal(ranking.levels_from_scores([0.0, 1.0, 1.0, 1.0, 2.0], 5), [1, 3, 3, 3, 5])
    np.testing.assert_array_equal(ranking.levels_from_scores(np.zeros(7)), np.full(7, 6))
    np.testing.assert_array_equal(ranking.levels_from_scores(np.arange(7.0)), [1, 2, 4, 6, 7, 9, 10])
    for kwargs, match in (
        ({"num_levels": 3, "cut_points": [0.5]}, "cut_points must be 2"),
        ({"num_levels": 3, "cut_points": [0.6, 0.4]}, "increasing"),
        ({"num_levels": 2, "cut_points": [1.0]}, "in \\(0, 1\\)"),
        ({"num_levels": 0}, "num_levels"),
    ):
        with pytest.raises(ValueError, match=match):
            ranking.levels_from_scores(scores, **kwargs)


def test_annotators_aggregated_with_agreement():
    rng = np.random.default_rng(4)
    num_items = 40
    quality = 2 * rng.normal(size=num_items)
    annotators = [_random_judgments(rng, num_items, 200, quality) for _ in range(4)]
    aggregate = ranking.aggregate_annotators(num_items, annotators)
    fits = np.stack([ranking.bradley_terry(num_items, judgments).scores for judgments in annotators])
    np.testing.assert_allclose(aggregate.annotator_scores, fits)
    np.testing.assert_allclose(aggregate.scores, np.mean(fits / fits.std(axis=1, keepdims=True), axis=0))
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    assert aggregate.kendall_tau == pytest.approx(np.mean([stats.kendalltau(fits[a], fits[b]).statistic for a, b in pairs]))
    assert aggregate.spearman == pytest.approx(np.mean([stats.spearmanr(fits[a], fits[b]).statistic for a, b in pairs]))
    # Four annotators together rank better than each alone; annotators who see less agree less.
    combined_tau = stats.kendalltau(aggregate.scores, quality).statistic
    assert all(combined_tau > stats.kendalltau(fit, quality).statistic for fit in fits)
    noisy = [_random_judgments(rng, num_items, 200, quality / 4) for _ in range(4)]
    assert ranking.aggregate_annotators(num_items, noisy).kendall_tau < aggregate.kendall_tau - 0.2
    assert np.isnan(ranking.aggregate_annotators(num_items, annotators[:1]).kendall_tau)


def test_bad_judgments_are_one_clear_error():
    for judgments, match in (
        ([(0, 5, 1)], "not an index in \\[0, 3\\)"),
        ([(0, 0, 1)], "with itself"),
        ([(0, 1, 2)], "outcome 2"),
        ([(0, 1, "skip")], "outcome 'skip'"),
        ([(0, 1)], "not an \\(a, b, outcome\\) row"),
        ([(0.5, 1, 1)], "item a=0.5"),
    ):
        with pytest.raises(ValueError, match=match):
            ranking.bradley_terry(3, judgments)
    with pytest.raises(ValueError, match="prior must be > 0"):
        ranking.bradley_terry(3, [(0, 1, 1)], prior=0)
    with pytest.raises(ValueError, match="at least one annotator"):
        ranking.aggregate_annotators(3, [])
