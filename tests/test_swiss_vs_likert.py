"""Experiment D's small mode (experiments/swiss_vs_likert.py): the noise model does what its docstring says,
budgets are equal, and the findings of the full run that already hold at its size."""

from __future__ import annotations

import numpy as np
import pytest

from ernie_jax.aesthetics import simulated_annotators
from experiments import swiss_vs_likert


@pytest.fixture(scope="module")
def results():
    return swiss_vs_likert.run(small=True, log=lambda line: None)


def test_small_run_findings(results):
    settings = swiss_vs_likert.SMALL
    (by_method,) = results["budget"].values()
    for values in by_method.values():
        assert np.all(np.abs(values["kendall_tau"]) <= 1) and np.all(values["level_within_one"] >= values["level_exact"])
    # The Swiss tournament recovers the order better than as many random pairs, on every seed (measured
    # Kendall tau 0.78 against 0.63).
    assert np.all(by_method["swiss_bt"]["kendall_tau"] > by_method["random_bt"]["kendall_tau"] + 0.05)
    # Side-by-side judgments do not see an annotator's additive drift; Likert ratings lose to it (0.80 -> 0.77).
    no_drift, strong_drift = (results["drift"][value] for value in settings.drift_sweep)
    for method in ("random_bt", "swiss_bt"):
        np.testing.assert_array_equal(no_drift[method]["kendall_tau"], strong_drift[method]["kendall_tau"])
    assert strong_drift["likert"]["kendall_tau"].mean() < no_drift["likert"]["kendall_tau"].mean() - 0.01
    # At equal perception noise Likert wins at equal judgments (0.80 against 0.78); with absolute ratings three
    # times as noisy as side-by-side choices the tournament wins (0.78 against 0.62).
    (noisy_likert,) = results["absolute_noise"].values()
    assert noisy_likert["swiss_bt"]["kendall_tau"].mean() > noisy_likert["likert"]["kendall_tau"].mean() + 0.1


def test_equal_budgets():
    num_items, rounds = 16, 4
    budget = rounds * num_items // 2
    quality = np.random.default_rng(0).normal(size=num_items)
    noise = simulated_annotators.NoiseModel()
    annotators = [simulated_annotators.Annotator(np.random.default_rng(seed), noise, budget) for seed in range(2)]
    tournament_judgments, _ = simulated_annotators.swiss_tournaments(annotators, quality, rounds, seed=0)
    random_judgments = swiss_vs_likert._random_pairs(annotators, quality, budget, np.random.default_rng(1))
    active_judgments = swiss_vs_likert._active(annotators, quality, rounds, seed=0)
    for judgments in (tournament_judgments, random_judgments, active_judgments):
        assert [len(rows) for rows in judgments] == [budget, budget]
    # Active pairing plays no rematch either.
    for rows in active_judgments:
        assert len({frozenset(row[:2]) for row in rows}) == budget


def test_annotator_noise_model():
    noise = simulated_annotators.NoiseModel(perception_std=0.0, lapse=0.0, drift=1.0, position_bias=0.0)
    annotator = simulated_annotators.Annotator(np.random.default_rng(0), noise, 1000)
    rng = np.random.default_rng(1)
    # Without perception noise or lapses a rating is the rounded, clipped affine map of quality + offset + drift.
    for time_index in (0, 500, 999):
        expected = np.clip(np.round(5.5 + annotator.scale * (0.3 + annotator.offset + annotator.drift[time_index])), 1, 10)
        assert annotator.rate(rng, 0.3, time_index) == expected
    assert abs(annotator.drift[-1] - annotator.drift[0]) > 0.5 and annotator.choose(rng, 0.4, 0.3) == "left"
    # Lapses: a coin flip whatever the qualities.
    lapsing = simulated_annotators.Annotator(np.random.default_rng(0), simulated_annotators.NoiseModel(lapse=1.0), 10)
    choices = [lapsing.choose(rng, 5.0, -5.0) for _ in range(400)]
    assert 150 < choices.count("right") < 250


def test_elo_matches_the_update_rule():
    ratings = swiss_vs_likert.elo_ratings(3, [(0, 1, "left"), (1, 0, "left"), (2, 0, "tie")])
    after_first = 16.0  # K = 32 times (1 - 1/2)
    expected_one = 1 / (1 + 10 ** ((after_first - -after_first) / 400))  # player 1's expectation in game 2
    one = -after_first + 32 * (1 - expected_one)
    zero = after_first - 32 * (1 - expected_one)
    expected_two = 1 / (1 + 10 ** ((zero - 0.0) / 400))
    np.testing.assert_allclose(ratings, [zero - 32 * (0.5 - expected_two), one, 32 * (0.5 - expected_two)])


def test_plot_is_an_svg_with_a_line_per_method_and_panel(results):
    import xml.etree.ElementTree as ElementTree

    svg = ElementTree.fromstring(swiss_vs_likert.plot(results, swiss_vs_likert.SMALL))
    namespace = "{http://www.w3.org/2000/svg}"
    lines = svg.findall(f"{namespace}polyline")
    assert len(lines) == len(swiss_vs_likert.METHODS) + len(swiss_vs_likert.SWEEP_METHODS)
    # Each method keeps its legend colour in both panels.
    colours = [line.get("stroke") for line in lines]
    by_method = dict(zip(swiss_vs_likert.METHODS, colours[:len(swiss_vs_likert.METHODS)], strict=True))
    assert colours[len(swiss_vs_likert.METHODS):] == [by_method[m] for m in swiss_vs_likert.SWEEP_METHODS]
    legend = [text.text for text in svg.findall(f"{namespace}text")]
    assert all(method in legend for method in swiss_vs_likert.METHODS)
