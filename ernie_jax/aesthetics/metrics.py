"""Rank and correlation metrics of an aesthetic scorer against human labels, in numpy (no scipy).

Every metric takes `pred [N]` (the scorer's scores) and `target [N]` (labels: mean ratings, tiers, ...),
one entry per image, and returns a float (nan where the value is undefined, e.g. constant input).

- `srcc`: Spearman's rank correlation, ties given their average rank (ERIA's tiers have many ties);
  equals `scipy.stats.spearmanr`.
- `plcc`: Pearson's r, raw or after the 4-parameter logistic fit of image-quality work (VQEG):
  `f(x) = b2 + (b1 - b2) / (1 + exp(-(x - b3) / b4))` fitted to map scores onto labels by least squares
  (Levenberg-Marquardt), then r(f(pred), target).
- `kendall_tau_b`: Kendall's tau-b (tie-corrected), as `scipy.stats.kendalltau`.
- `bootstrap_ci`: a metric with its percentile bootstrap interval over images.
- `category_bias`: the mean residual per category (where a scorer over- or under-rates a kind of image).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]

# Rows of the pair-sign matrix computed at once by `kendall_tau_b` (memory: rows x N bytes, twice).
_KENDALL_BLOCK = 2048


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as float64 `[N]`; one clear error for mismatched, too short or non-finite input."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if pred.ndim != 1 or pred.shape != target.shape:
        raise ValueError(f"pred and target must be 1-D of one length, got shapes {pred.shape} and {target.shape}")
    if pred.shape[0] < 2:
        raise ValueError(f"need at least 2 images, got {pred.shape[0]}")
    if not (np.isfinite(pred).all() and np.isfinite(target).all()):
        raise ValueError("pred and target must be finite")
    return pred, target


def average_ranks(values) -> np.ndarray:
    """1-based ranks `[N]` with tied values sharing the mean of their ranks (`scipy.stats.rankdata`'s default)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Start and end (exclusive) of each run of equal values in sorted order.
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    ends = np.append(starts[1:], len(values))
    run_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r of two float64 vectors; nan when either is constant."""
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
    return float(np.dot(dx, dy) / denominator) if denominator > 0 else float("nan")


def srcc(pred, target) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    pred, target = _pair(pred, target)
    return pearson(average_ranks(pred), average_ranks(target))


def logistic4(x, params) -> np.ndarray:
    """`b2 + (b1 - b2) * sigmoid((x - b3) / b4)` for params (b1, b2, b3, b4)."""
    b1, b2, b3, b4 = params
    with np.errstate(over="ignore"):  # exp overflowing to inf is the curve's flat end, 1 / inf = 0
        return b2 + (b1 - b2) / (1.0 + np.exp(-(np.asarray(x, np.float64) - b3) / b4))


def fit_logistic4(pred, target, *, max_iterations: int = 200, tolerance: float = 1e-12) -> np.ndarray:
    """Least-squares (b1, b2, b3, b4) of `logistic4(pred) ~ target`, by Levenberg-Marquardt from the usual start
    (b1 = max target, b2 = min target, b3 = mean pred, b4 = std pred), the same start and objective as
    `scipy.optimize.curve_fit(logistic4, pred, target, p0=...)`.

    The scores are standardised for the iterations (the fit is invariant to it, and it keeps the normal
    equations well conditioned whatever the scorer's scale); iterations stop when the sum of squares falls by
    less than `tolerance` (relative) or no damping improves it. Raises ValueError for constant `pred`.
    """
    pred, target = _pair(pred, target)
    centre, scale = pred.mean(), pred.std()
    if scale == 0:
        raise ValueError("cannot fit a logistic to constant predictions")
    z = (pred - centre) / scale
    params = np.array([target.max(), target.min(), 0.0, 1.0])

    def residual_and_jacobian(p):
        b1, b2, b3, b4 = p
        with np.errstate(over="ignore"):  # as in logistic4
            s = 1.0 / (1.0 + np.exp(-(z - b3) / b4))
        slope = (b1 - b2) * s * (1.0 - s)
        jacobian = np.stack([s, 1.0 - s, -slope / b4, -slope * (z - b3) / b4**2], axis=1)
        return target - (b2 + (b1 - b2) * s), jacobian

    residual, jacobian = residual_and_jacobian(params)
    cost = residual @ residual
    damping = 1e-3
    for _ in range(max_iterations):
        normal = jacobian.T @ jacobian
        gradient = jacobian.T @ residual
        improved = False
        while damping < 1e16:
            # Marquardt's scaling: damp each parameter by its own curvature (plus a floor for flat directions).
            damped = normal + damping * np.diag(np.diag(normal) + 1e-12)
            try:
                candidate = params + np.linalg.solve(damped, gradient)
            except np.linalg.LinAlgError:
                damping *= 10
                continue
            candidate_residual, candidate_jacobian = residual_and_jacobian(candidate)
            candidate_cost = candidate_residual @ candidate_residual
            if np.isfinite(candidate_cost) and candidate_cost < cost:
                improved = True
                break
            damping *= 10
        if not improved:
            break
        reduction = (cost - candidate_cost) / max(cost, np.finfo(np.float64).tiny)
        params, residual, jacobian, cost = candidate, candidate_residual, candidate_jacobian, candidate_cost
        damping = max(damping / 10, 1e-12)
        if reduction < tolerance:
            break
    b1, b2, b3, b4 = params
    return np.array([b1, b2, centre + scale * b3, scale * b4])


def plcc(pred, target, fit: str | None = None) -> float:
    """Pearson's r of `pred` and `target`; with `fit="logistic4"`, of `logistic4(pred)` (fitted to `target`,
    `fit_logistic4`) and `target`. nan for constant input."""
    pred, target = _pair(pred, target)
    if fit is None:
        return pearson(pred, target)
    if fit != "logistic4":
        raise ValueError(f"fit must be None or 'logistic4', got {fit!r}")
    if pred.std() == 0:
        return float("nan")
    return pearson(logistic4(pred, fit_logistic4(pred, target)), target)


def _tied_pairs(values: np.ndarray) -> int:
    _, counts = np.unique(values, return_counts=True)
    return int(np.sum(counts * (counts - 1) // 2))


def kendall_tau_b(pred, target) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_pred) (n0 - ties_target)), n0 = N (N-1) / 2.
    nan when either input is constant. O(N^2) work in blocks of rows."""
    pred, target = _pair(pred, target)
    n = len(pred)
    signed_sum = 0
    for start in range(0, n, _KENDALL_BLOCK):
        rows = slice(start, start + _KENDALL_BLOCK)
        pred_order = np.sign(pred[rows, None] - pred[None, :]).astype(np.int8)
        target_order = np.sign(target[rows, None] - target[None, :]).astype(np.int8)
        signed_sum += int(np.sum(pred_order * target_order, dtype=np.int64))
    concordant_minus_discordant = signed_sum // 2  # every unordered pair was counted from both ends
    pairs = n * (n - 1) // 2
    denominator = np.sqrt(float(pairs - _tied_pairs(pred)) * float(pairs - _tied_pairs(target)))
    return concordant_minus_discordant / denominator if denominator > 0 else float("nan")


def bootstrap_ci(metric: Metric, pred, target, *, num_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """`(value, low, high)`: `metric(pred, target)` on all images and the percentile bootstrap interval of
    level `confidence`, from `num_resamples` resamples of the images with replacement (pairs kept together)
    drawn with `numpy.random.default_rng(seed)`. Resamples where the metric is undefined (nan, e.g. all
    one tier) are left out."""
    pred, target = _pair(pred, target)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be positive, got {num_resamples}")
    value = float(metric(pred, target))
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(pred), size=(num_resamples, len(pred)))
    statistics = np.array([metric(pred[i], target[i]) for i in indices], np.float64)
    statistics = statistics[np.isfinite(statistics)]
    if statistics.size == 0:
        raise ValueError("the metric is undefined on every bootstrap resample")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(statistics, [tail, 100 - tail])
    return value, float(low), float(high)


def category_bias(pred, target, categories: Sequence, fit: str | None = None) -> dict:
    """`{category: mean(pred - target) over its images}`: positive where the scorer rates a category too high.

    With `fit=None`, pred must be on the labels' scale; with `fit="logistic4"` the scores are first mapped
    onto it by the logistic fit over all images (`fit_logistic4`), so any scorer's scale works.
    """
    pred, target = _pair(pred, target)
    categories = np.asarray(categories)
    if categories.shape != pred.shape:
        raise ValueError(f"categories must have one entry per image: shape {categories.shape}, "
                         f"expected {pred.shape}")
    if fit is not None:
        if fit != "logistic4":
            raise ValueError(f"fit must be None or 'logistic4', got {fit!r}")
        pred = logistic4(pred, fit_logistic4(pred, target))
    residual = pred - target
    return {category.item() if hasattr(category, "item") else category: float(residual[categories == category].mean())
            for category in np.unique(categories)}


def agreement_summary(pred, target, categories: Sequence | None = None) -> dict:
    """SRCC, PLCC (raw and after the logistic fit) and Kendall tau-b of `pred` against `target`, and with
    `categories` (one per image, more than one distinct) the per-category bias of the logistic-mapped scores."""
    summary = {"srcc": srcc(pred, target), "plcc": plcc(pred, target),
               "plcc_logistic4": plcc(pred, target, fit="logistic4"), "kendall_tau_b": kendall_tau_b(pred, target)}
    if categories is not None and len(set(np.asarray(categories).tolist())) > 1:
        summary["category_bias"] = category_bias(pred, target, categories, fit="logistic4")
    return summary
