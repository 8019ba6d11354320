"""The scorer's losses (Bradley-Terry with ties, CORAL ordinal, MSE) and in-batch rank metrics against
independent torch / scipy computations, values and gradients, on random scores."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from ernie_jax.aesthetics.batch_metrics import concordance, spearman
from ernie_jax.models.aesthetic_scorer import expected_level, level_probabilities, ordinal_logits
from ernie_jax.training.objectives import aesthetic_ordinal, aesthetic_pairwise, aesthetic_regression
from ernie_jax.training.objectives.aesthetic_ordinal import ordinal_loss
from ernie_jax.training.objectives.aesthetic_pairwise import bradley_terry_loss, pair_accuracy
from ernie_jax.training.objectives.aesthetic_regression import regression_loss

TOLERANCE = 1e-6
K = 10


def torch_grads(loss_fn, *arrays):
    """(loss, gradients) of a torch function of float64 copies of `arrays`."""
    tensors = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in arrays]
    loss = loss_fn(*tensors)
    loss.backward()
    return loss.item(), [t.grad.numpy() for t in tensors]


def check(ours, reference):
    """Our float32 (loss, grads) against torch's float64 ones."""
    (loss, grads), (expected_loss, expected_grads) = ours, reference
    np.testing.assert_allclose(float(loss), expected_loss, rtol=TOLERANCE, atol=TOLERANCE)
    for grad, expected in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=TOLERANCE)


def test_bradley_terry_matches_torch_with_ties():
    rng = np.random.default_rng(0)
    scores_a, scores_b = rng.normal(0, 2, (2, 64)).astype(np.float32)
    outcome = rng.choice(np.array([1.0, 0.0, 0.5], np.float32), 64)
    assert {0.0, 0.5, 1.0} <= set(outcome.tolist())
    ours = jax.value_and_grad(bradley_terry_loss, argnums=(0, 1))(scores_a, scores_b, outcome)
    # Soft-label binary cross-entropy on the score difference is the BT loss with ties as half.
    reference = torch_grads(lambda a, b: F.binary_cross_entropy_with_logits(
        a - b, torch.tensor(outcome, dtype=torch.float64)), scores_a, scores_b)
    check(ours, reference)
    # A tie is minimised at equal scores: its gradient there is zero.
    tie_grad = jax.grad(bradley_terry_loss)(jnp.ones(1), jnp.ones(1), jnp.full(1, 0.5))
    assert float(jnp.abs(tie_grad).max()) == 0.0


def test_ordinal_loss_matches_torch():
    rng = np.random.default_rng(1)
    scores = rng.normal(0, 2, 64).astype(np.float32)
    thresholds = np.sort(rng.normal(0, 2, K - 1)).astype(np.float32)
    levels = rng.integers(1, K + 1, 64).astype(np.int32)
    levels[:2] = (1, K)  # the extremes: all thresholds below, all above
    ours = jax.value_and_grad(ordinal_loss, argnums=(0, 1))(scores, thresholds, levels)
    targets = torch.tensor(levels[:, None] > np.arange(1, K)[None, :], dtype=torch.float64)

    def coral(s, theta):
        per_threshold = F.binary_cross_entropy_with_logits(s[:, None] - theta[None, :], targets, reduction="none")
        return per_threshold.sum(dim=1).mean()

    check(ours, torch_grads(coral, scores, thresholds))


def test_level_probabilities_and_expected_level_match_torch():
    rng = np.random.default_rng(2)
    scores = rng.normal(0, 2, 16).astype(np.float32)
    thresholds = np.sort(rng.normal(0, 2, K - 1)).astype(np.float32)
    logits = ordinal_logits(jnp.asarray(scores), jnp.asarray(thresholds))
    above = torch.sigmoid(torch.tensor(scores, dtype=torch.float64)[:, None]
                          - torch.tensor(thresholds, dtype=torch.float64)[None, :])
    # P(level = k) = P(level > k - 1) - P(level > k), with P(level > 0) = 1 and P(level > K) = 0.
    cumulative = torch.cat([torch.ones(16, 1, dtype=torch.float64), above, torch.zeros(16, 1, dtype=torch.float64)], 1)
    expected = (cumulative[:, :-1] - cumulative[:, 1:]).numpy()
    probabilities = np.asarray(level_probabilities(logits))
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(expected_level(logits)), expected @ np.arange(1, K + 1), atol=1e-5)


def test_regression_loss_matches_torch():
    rng = np.random.default_rng(3)
    scores, ratings = rng.normal(5, 2, (2, 64)).astype(np.float32)
    ours = jax.value_and_grad(regression_loss)(scores, ratings)
    loss, (grad,) = torch_grads(lambda s: F.mse_loss(s, torch.tensor(ratings, dtype=torch.float64)), scores)
    check((ours[0], [ours[1]]), (loss, [grad]))


def test_in_batch_metrics_match_scipy():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=40).astype(np.float32)
    scores[:6] = scores[6]  # tied scores
    levels = rng.integers(1, 6, 40).astype(np.float32)  # many tied labels
    np.testing.assert_allclose(float(spearman(scores, levels)), scipy.stats.spearmanr(scores, levels).statistic,
                               atol=1e-5)
    # Pairs with distinct labels: concordant + half the score ties, over their count = (1 + Somers' D(scores|labels)) / 2.
    somers = scipy.stats.somersd(levels, scores).statistic
    np.testing.assert_allclose(float(concordance(scores, levels)), (1 + somers) / 2, atol=1e-6)
    assert float(spearman(scores, np.ones(40))) == 0.0 and float(concordance(scores, np.ones(40))) == 0.5


def test_pair_accuracy_counts_decided_pairs_only():
    scores_a = np.array([2.0, 0.0, 1.0, 5.0, 3.0], np.float32)
    scores_b = np.array([1.0, 1.0, 1.0, 0.0, 0.0], np.float32)
    outcome = np.array([1.0, 1.0, 0.0, 0.5, 0.0], np.float32)
    # right, wrong, equal scores (1/2), a tie (not counted), wrong: 1.5 of 4.
    assert float(pair_accuracy(scores_a, scores_b, outcome)) == pytest.approx(1.5 / 4)


class LinearScorer:
    """A stand-in scorer: the score is a weighted sum of an image's pixels, the thresholds given."""

    def __init__(self, weights, thresholds=None):
        self.weights, self._thresholds = weights, thresholds
        self.num_levels = 0 if thresholds is None else len(thresholds) + 1

    def score(self, images):
        return jnp.einsum("bchw,chw->b", images, self.weights)

    def thresholds(self):
        return self._thresholds


def test_objectives_read_their_batches_and_train_the_scorer():
    rng = np.random.default_rng(5)
    weights = jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)
    images = rng.normal(size=(3, 8, 3, 4, 4)).astype(np.float32)
    thresholds = jnp.linspace(-1, 1, K - 1)
    scorer = LinearScorer(weights, thresholds)
    score = lambda x: np.asarray(scorer.score(x))
    keys = jax.random.split(jax.random.key(0), 8)

    pairwise = aesthetic_pairwise.make(aesthetic_pairwise.Config())
    outcome = np.array([1, 0, 0.5, 1, 1, 0, 0.5, 0], np.float32)
    assert pairwise.batch_keys == ("images_a", "images_b", "outcome") and pairwise.trains == ("scorer",)
    loss, metrics = pairwise.loss({"scorer": scorer}, {}, {"images_a": images[0], "images_b": images[1],
                                                          "outcome": outcome}, keys)
    assert float(loss) == pytest.approx(float(bradley_terry_loss(score(images[0]), score(images[1]), outcome)))
    assert set(metrics) == {"loss", "accuracy", "margin", "score_std"}

    levels = rng.integers(1, K + 1, 8).astype(np.int32)
    ordinal = aesthetic_ordinal.make(aesthetic_ordinal.Config(num_levels=K))
    loss, metrics = ordinal.loss({"scorer": scorer}, {}, {"images": images[2], "levels": levels}, keys)
    assert float(loss) == pytest.approx(float(ordinal_loss(score(images[2]), thresholds, levels)))
    assert float(metrics["srcc"]) == pytest.approx(scipy.stats.spearmanr(score(images[2]), levels).statistic, abs=1e-5)
    with pytest.raises(ValueError, match="ordinal objective trains 5 levels but the scorer has 10"):
        aesthetic_ordinal.make(aesthetic_ordinal.Config(num_levels=5)).loss(
            {"scorer": scorer}, {}, {"images": images[2], "levels": levels}, keys)

    regression = aesthetic_regression.make(aesthetic_regression.Config(target="levels"))
    assert regression.batch_keys == ("images", "levels")
    loss, _ = regression.loss({"scorer": scorer}, {}, {"images": images[2], "levels": levels}, keys)
    assert float(loss) == pytest.approx(float(np.mean((score(images[2]) - levels) ** 2)), rel=1e-6)
    with pytest.raises(ValueError, match="num_levels >= 2"):
        aesthetic_ordinal.Config(num_levels=1)
