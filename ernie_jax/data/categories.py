"""Two-level category-weighted sampling: a weight per category, then a weight per record inside it.

The report weights categories by "corpus size and aggregate aesthetic quality" without a formula
(training_algorithms.md section 5). The formulas on offer, for category c with N_c eligible records
of mean aesthetic score a_c:

- "uniform":                   w_c = 1
- "count":                     w_c = N_c (plain proportional sampling)
- "count_x_aesthetic":         w_c = N_c * a_c (the article's formula; it is the category's total
                               aesthetic mass, so it stays proportional to size, section 8.8)
- "tempered":                  w_c = (N_c * a_c) ** tau (tau < 1 flattens large categories)
- "count_power_exp_aesthetic": w_c = N_c ** tau * exp(a_c / category_aesthetic_temperature)
                               (the reference's recommended form, section 8.8)

Inside a category, records are drawn by aesthetic score: "softmax" (p ~ exp(a_i / T), the
reference's choice, defined for any score scale), "proportional" (p ~ a_i, needs positive
scores) or "uniform". An optional hard floor `min_aesthetic` removes records before anything is
counted. `category_scales` multiplies the formula's weight of named categories; a scale of 0 leaves a
category out, which is how a domain expert is fine-tuned on its category alone. The default is "tempered" with tau = 0.5, because the article's formula does not curb
frequent categories, which is the report's stated goal.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CATEGORY_FORMULAS = ("uniform", "count", "count_x_aesthetic", "tempered", "count_power_exp_aesthetic")
WITHIN_CATEGORY = ("uniform", "softmax", "proportional")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How categories and records inside them are weighted (formulas in the module docstring)."""

    category_formula: str = "tempered"
    tau: float = 0.5
    category_aesthetic_temperature: float = 1.0
    within_category: str = "softmax"
    aesthetic_temperature: float = 1.0
    min_aesthetic: float | None = None
    # Category name -> factor on its formula weight (unnamed categories keep 1; 0 leaves one out).
    category_scales: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        scales = {str(name): float(scale) for name, scale in dict(self.category_scales or {}).items()}
        if any(not scale >= 0 for scale in scales.values()):
            raise ValueError(f"category_scales must be non-negative, got {scales}")
        object.__setattr__(self, "category_scales", scales)
        if self.category_formula not in CATEGORY_FORMULAS:
            raise ValueError(f"category_formula {self.category_formula!r} is not one of {CATEGORY_FORMULAS}")
        if self.within_category not in WITHIN_CATEGORY:
            raise ValueError(f"within_category {self.within_category!r} is not one of {WITHIN_CATEGORY}")
        for name in ("tau", "category_aesthetic_temperature", "aesthetic_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def category_weights(counts: np.ndarray, mean_aesthetic: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Unnormalised weight per category, 0 for empty ones. counts, mean_aesthetic: [K] -> float64 [K]."""
    counts = np.asarray(counts, np.float64)
    mean_aesthetic = np.asarray(mean_aesthetic, np.float64)
    present = counts > 0
    formula = config.category_formula
    if formula in ("count_x_aesthetic", "tempered") and np.any(mean_aesthetic[present] <= 0):
        raise ValueError(f"category_formula {formula!r} needs positive mean aesthetic scores, got a minimum "
                         f"of {mean_aesthetic[present].min():.4g}")
    if formula == "uniform":
        weights = np.ones_like(counts)
    elif formula == "count":
        weights = counts
    elif formula == "count_x_aesthetic":
        weights = counts * mean_aesthetic
    elif formula == "tempered":
        weights = (counts * mean_aesthetic) ** config.tau
    else:
        # Shifting by the largest mean only rescales all weights, and keeps exp() finite.
        shifted = np.where(present, mean_aesthetic - mean_aesthetic[present].max(), 0.0)
        weights = counts ** config.tau * np.exp(shifted / config.category_aesthetic_temperature)
    return np.where(present, weights, 0.0)


def within_category_weights(category: np.ndarray, aesthetic: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Probability of each record given its category (sums to 1 per category). [N] -> float64 [N]."""
    category = np.asarray(category, np.int64)
    aesthetic = np.asarray(aesthetic, np.float64)
    if config.within_category == "uniform":
        weights = np.ones_like(aesthetic)
    elif config.within_category == "proportional":
        if np.any(aesthetic <= 0):
            raise ValueError(f"within_category 'proportional' needs positive aesthetic scores, got a minimum "
                             f"of {aesthetic.min():.4g}")
        weights = aesthetic
    else:
        category_max = np.full(category.max(initial=0) + 1, -np.inf)
        np.maximum.at(category_max, category, aesthetic)
        weights = np.exp((aesthetic - category_max[category]) / config.aesthetic_temperature)
    totals = np.bincount(category, weights=weights, minlength=category.max(initial=0) + 1)
    return weights / totals[category]


def record_probabilities(category: np.ndarray, aesthetic: np.ndarray, category_names, config: SamplingConfig,
                         eligible: np.ndarray | None = None):
    """The mixture over records: p_i = q_c(i) * p(i | c(i)).

    Args:
      category: int [N] category ids in [0, num_categories).
      aesthetic: float [N] scores.
      category_names: the K names of the category ids (`config.category_scales` refers to them).
      eligible: bool [N] records that may be drawn at all (others get probability 0 and are not
        counted in N_c or a_c); the `min_aesthetic` floor is applied on top.
    Returns:
      (p float64 [N] summing to 1, q float64 [K] the category probabilities).
    """
    category = np.asarray(category, np.int64)
    aesthetic = np.asarray(aesthetic, np.float64)
    num_categories = len(category_names)
    unknown = sorted(set(config.category_scales) - set(category_names))
    if unknown:
        raise ValueError(f"category_scales names {unknown}, which the data does not have: its categories are "
                         f"{tuple(category_names)}")
    keep = np.ones(category.shape, bool) if eligible is None else np.asarray(eligible, bool).copy()
    if config.min_aesthetic is not None:
        keep &= aesthetic >= config.min_aesthetic
    if not keep.any():
        raise ValueError(f"no record is eligible for sampling out of {category.size} (min_aesthetic="
                         f"{config.min_aesthetic})")
    counts = np.bincount(category[keep], minlength=num_categories).astype(np.float64)
    sums = np.bincount(category[keep], weights=aesthetic[keep], minlength=num_categories)
    mean_aesthetic = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    scales = np.array([config.category_scales.get(name, 1.0) for name in category_names], np.float64)
    weights = category_weights(counts, mean_aesthetic, config) * scales
    if not weights.sum() > 0:
        raise ValueError(f"category_scales {config.category_scales} leave no category to draw from "
                         f"{tuple(category_names)}")
    category_probs = weights / weights.sum()
    probs = np.zeros(category.shape, np.float64)
    probs[keep] = category_probs[category[keep]] * within_category_weights(category[keep], aesthetic[keep], config)
    return probs, category_probs
