"""The annotated synthetic aesthetic set (ernie_jax/data/synthetic_aesthetics.py) and issue 15's study of it
(experiments/aes_shapes_study.py): the injected taste is in the training labels only, both protocols see the same
annotators and budget, and experiment E's measures behave as their definitions say."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ernie_jax.data import categories
from ernie_jax.data.synthetic_aesthetics import SyntheticAestheticsConfig, write_synthetic_aesthetics
from experiments import aes_shapes_study


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_category_bias_is_in_the_training_labels_only(tmp_path):
    config = SyntheticAestheticsConfig(num_train=96, num_heldout=16, size=16, rounds=4)
    clean = write_synthetic_aesthetics(tmp_path / "clean", config)
    biased = write_synthetic_aesthetics(tmp_path / "biased", SyntheticAestheticsConfig(
        **{**config.__dict__, "category_bias": 1.0}))
    assert _rows(clean / "heldout.csv") == _rows(biased / "heldout.csv")
    assert _rows(clean / "clean.csv") == _rows(biased / "clean.csv")
    # Equal budgets: 3 annotators x 4 rounds x 48 pairs; Likert rates each image twice per annotator.
    assert len(_rows(clean / "pairs.csv")) == 3 * 4 * 48
    summaries = {name: json.loads((folder / "annotation.json").read_text())
                 for name, folder in (("clean", clean), ("biased", biased))}
    assert summaries["clean"]["judgments_per_annotator"] == 4 * 96 // 2
    for protocol in ("swiss", "likert"):
        unbiased, shifted = (summaries[name]["labels"][protocol] for name in ("clean", "biased"))
        # Both protocols order the training images by their true quality, and both learn the shared taste.
        assert unbiased["kendall_tau_b"] > 0.5, (protocol, unbiased)
        assert shifted["category_bias"]["collage"] > unbiased["category_bias"]["collage"] + 0.3, (protocol, shifted)
    levels = [int(row["level"]) for row in _rows(clean / "levels.csv")]
    assert sorted(set(levels)) == list(range(1, 11)) and abs(np.bincount(levels)[1:] - 9.6).max() <= 1
    with pytest.raises(ValueError, match="already exists"):
        write_synthetic_aesthetics(clean, config)
    for bad, message in (({"rounds": 3}, "even rounds"), ({"biased_category": "photo"}, "biased_category 'photo'"),
                         ({"noise": {"lapse": 2.0}}, "lapse"), ({"noise": {"mood": 1}}, "noise:")):
        with pytest.raises(ValueError, match=message):
            SyntheticAestheticsConfig(**{**config.__dict__, **bad})


def test_experiment_e_measures_follow_their_definitions():
    images, quality, ids, names = aes_shapes_study.fine_pool(600, seed=0, image_side=16)
    assert images.shape == (len(quality), 16, 16, 3) and len(names) == 36
    counts = np.bincount(ids, minlength=36)
    assert counts.min() >= 1 and counts.max() > 10 * np.median(counts)  # Zipf sizes
    results = aes_shapes_study.e_metrics(ids, quality, quality, names)
    proportional, article = results["count (proportional)"], results["count x mean (article)"]
    # The article's N x mean is nearly proportional sampling (reference section 8.8): its top share moves by less
    # than the spread of the category means allows.
    assert abs(article["top_share"] - proportional["top_share"]) < 0.1
    assert results["tempered (N a)^0.5"]["top_share"] < proportional["top_share"] - 0.1
    uniform = results["uniform"]
    assert uniform["entropy"] == pytest.approx(1.0) and uniform["covered"] == pytest.approx(36 * (1 - (1 - 1 / 36) ** 100))
    assert uniform["top_share"] == pytest.approx(4 / 36)
    # The exponential form draws better images than proportional sampling, and every formula's draws beat the
    # pool's mean (the softmax inside categories).
    assert results["N^0.5 exp(a)"]["mean_quality"] > proportional["mean_quality"]
    assert min(r["mean_quality"] for r in results.values()) > quality.mean()
    record_probs, _ = categories.record_probabilities(ids, quality, names, aes_shapes_study.FORMULAS["uniform"])
    assert uniform["mean_quality"] == pytest.approx(record_probs @ quality)


def test_the_study_runs_at_test_size(tmp_path):
    per_seed = {0: aes_shapes_study.run_seed(tmp_path, 0, ("pairwise",), pool=120, small=True, steps=10,
                                              log=lambda line: None)}
    results = per_seed[0]
    assert set(results["labels"]) == {"swiss", "likert"} and set(results["scorers"]) == {"pairwise"}
    assert set(results["scorers"]["pairwise"]["category_bias"]) == {"collage", "emblem", "pattern"}
    assert set(results["e"]["learned"]) == set(aes_shapes_study.FORMULAS)
    table = aes_shapes_study.tables(per_seed)
    assert "| scorer: Swiss pairs (BT) |" in table and table.count("| count x mean (article) |") == 2
    assert (tmp_path / "seed0" / "pairwise" / "eval.json").is_file()
