"""ernie_jax.aesthetics.metrics against scipy, on scores and tier labels with many ties."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize, stats

from ernie_jax.aesthetics import metrics


def tied_data(n=300, seed=0):
    """Scores rounded to one decimal (ties) against 1..10 tiers (many ties) of a shared latent quality."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=n)
    tiers = np.clip(np.round(5.5 + 2 * quality + rng.normal(scale=1.0, size=n)), 1, 10)
    scores = np.round(3 + 0.8 * np.tanh(quality) + rng.normal(scale=0.3, size=n), 1)
    return scores, tiers


def vqeg_logistic(x, b1, b2, b3, b4):
    """The 4-parameter logistic as scipy's curve_fit takes it (parameters as separate arguments)."""
    return b2 + (b1 - b2) / (1 + np.exp(-(x - b3) / b4))


def test_ties_are_present():
    scores, tiers = tied_data()
    assert len(np.unique(scores)) < 0.5 * len(scores) and len(np.unique(tiers)) <= 10


def test_average_ranks_equal_scipy():
    scores, _ = tied_data()
    np.testing.assert_array_equal(metrics.average_ranks(scores), stats.rankdata(scores))


@pytest.mark.parametrize("seed", [0, 1])
def test_srcc_equals_spearmanr(seed):
    scores, tiers = tied_data(seed=seed)
    assert metrics.srcc(scores, tiers) == pytest.approx(stats.spearmanr(scores, tiers).statistic, abs=1e-12)


def test_plcc_raw_equals_pearsonr():
    scores, tiers = tied_data()
    assert metrics.plcc(scores, tiers) == pytest.approx(stats.pearsonr(scores, tiers).statistic, abs=1e-12)


@pytest.mark.parametrize("n,seed", [(300, 0), (120, 5)])
def test_logistic_fit_matches_curve_fit(n, seed):
    scores, tiers = tied_data(n, seed)
    start = [tiers.max(), tiers.min(), scores.mean(), scores.std()]
    # Tight tolerances, so that curve_fit's own stopping point is the optimum to ~1e-7.
    reference, _ = optimize.curve_fit(vqeg_logistic, scores, tiers, p0=start, maxfev=20000, xtol=1e-14, ftol=1e-14)
    params = metrics.fit_logistic4(scores, tiers)
    reference_fit = vqeg_logistic(scores, *reference)
    ours = metrics.logistic4(scores, params)
    np.testing.assert_allclose(params, reference, rtol=1e-5)
    np.testing.assert_allclose(ours, reference_fit, rtol=0, atol=1e-5)  # measured <= 1e-6 on the 1..10 scale
    assert np.sum((ours - tiers) ** 2) == pytest.approx(np.sum((reference_fit - tiers) ** 2), rel=1e-9)
    expected = stats.pearsonr(reference_fit, tiers).statistic
    assert metrics.plcc(scores, tiers, fit="logistic4") == pytest.approx(expected, abs=1e-9)


def test_logistic_fit_recovers_a_noiseless_curve():
    x = np.linspace(-3, 5, 50)
    truth = np.array([9.0, 2.0, 1.0, 0.7])
    np.testing.assert_allclose(metrics.fit_logistic4(x, metrics.logistic4(x, truth)), truth, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 2])
def test_kendall_tau_b_equals_kendalltau(seed, monkeypatch):
    scores, tiers = tied_data(seed=seed)
    expected = stats.kendalltau(scores, tiers, variant="b").statistic
    assert metrics.kendall_tau_b(scores, tiers) == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(metrics, "_KENDALL_BLOCK", 7)  # several row blocks, the last one partial
    assert metrics.kendall_tau_b(scores, tiers) == pytest.approx(expected, abs=1e-12)


def test_constant_input_gives_nan_like_scipy():
    tiers = np.array([1.0, 2, 3, 4])
    assert np.isnan(metrics.srcc(np.ones(4), tiers))
    assert np.isnan(metrics.plcc(np.ones(4), tiers))
    assert np.isnan(metrics.plcc(np.ones(4), tiers, fit="logistic4"))
    assert np.isnan(metrics.kendall_tau_b(np.ones(4), tiers))


def test_bootstrap_interval_agrees_with_scipy_bootstrap():
    scores, tiers = tied_data(200, seed=4)
    value, low, high = metrics.bootstrap_ci(metrics.srcc, scores, tiers, num_resamples=3000, seed=0)
    reference = stats.bootstrap((scores, tiers), lambda a, b: stats.spearmanr(a, b).statistic, paired=True,
                                vectorized=False, n_resamples=3000, method="percentile", confidence_level=0.95,
                                rng=np.random.default_rng(1))
    assert value == pytest.approx(stats.spearmanr(scores, tiers).statistic, abs=1e-12)
    # Two independent Monte-Carlo draws of the same interval: the ends agree to sampling error (~0.005 here).
    assert low == pytest.approx(reference.confidence_interval.low, abs=0.02)
    assert high == pytest.approx(reference.confidence_interval.high, abs=0.02)
    assert low < value < high
    assert metrics.bootstrap_ci(metrics.srcc, scores, tiers, num_resamples=3000, seed=0) == (value, low, high)


def test_category_bias_equals_binned_means():
    scores, tiers = tied_data(300, seed=5)
    categories = np.array(["photo", "anime", "poster"])[np.arange(300) % 3]
    raw = metrics.category_bias(scores, tiers, categories)
    codes = np.unique(categories, return_inverse=True)[1]
    expected = stats.binned_statistic(codes, scores - tiers, "mean", bins=np.arange(4) - 0.5).statistic
    assert list(raw) == ["anime", "photo", "poster"]
    np.testing.assert_allclose(list(raw.values()), expected, rtol=0, atol=1e-12)
    fitted = metrics.category_bias(scores, tiers, categories, fit="logistic4")
    mapped = metrics.logistic4(scores, metrics.fit_logistic4(scores, tiers))
    expected = stats.binned_statistic(codes, mapped - tiers, "mean", bins=np.arange(4) - 0.5).statistic
    np.testing.assert_allclose(list(fitted.values()), expected, rtol=0, atol=1e-12)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one length"):
        metrics.srcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        metrics.plcc([1, np.nan, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="fit must be"):
        metrics.plcc([1, 2, 3], [1, 2, 3], fit="cubic")
    with pytest.raises(ValueError, match="one entry per image"):
        metrics.category_bias([1, 2, 3], [1, 2, 3], ["a", "b"])


def test_library_does_not_import_scipy():
    code = "import sys, ernie_jax.aesthetics.metrics; assert 'scipy' not in sys.modules, 'scipy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
